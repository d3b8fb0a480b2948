"""``tsmtrain convert``: a network's weights from one project's format to another's.

* ``convert SRC --recipe RECIPE --out FILE [--to tsmtrain|tsm|mmaction2]`` ->
  :func:`tsmtrain.models.weights.convert_weights`: prints the key report of the load, the file
  written and any note (the file name the TSM repository's ``test_models.py`` needs)

Like ``render`` and ``model-info``, it needs no data file to exist.
"""

from __future__ import annotations

import typer

from .common import SET_HELP, fail, load
from ..errors import UserError

__all__ = ["convert"]


def convert(
    src: str = typer.Argument(..., help="weights file: tsmtrain, TSM repository, mmaction2 (or a torchvision backbone)"),
    recipe: str = typer.Option(..., "--recipe", help="YAML recipe of the network the weights are for"),
    out: str = typer.Option(..., "--out", help="file to write"),
    to: str = typer.Option("tsmtrain", "--to", help="format to write: tsmtrain, tsm (the TSM repository's main.py "
                                                   "and test_models.py) or mmaction2"),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Write weights in another project's format (tsmtrain, TSM repository, mmaction2), every key accounted for."""
    from ..data.modality import modality_of
    from ..models import create_model
    from ..models.weights import convert_weights

    if to not in ("tsmtrain", "tsm", "mmaction2"):
        fail(f"--to {to}: choose tsmtrain, tsm or mmaction2")
    cfg = load(recipe, sets, check_files=False)
    model = create_model(cfg.model.model_copy(update={"pretrained": None}), cfg.data.num_segments,
                         modality_of(cfg.data).in_channels)
    try:
        report, notes = convert_weights(model, src, to, out, cfg.model_dump(mode="json"))
    except UserError as err:
        fail(str(err).splitlines())
    for line in report.lines():
        print(line)
    print(f"wrote {out} ({to} format, {report.loaded} tensors)")
    for note in notes:
        print(f"note: {note}")
