"""``python -m tsmtrain`` is the ``tsmtrain`` command."""

from .cli import app

app(prog_name="tsmtrain")
