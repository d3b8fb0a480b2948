import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_recipe_reference_matches_schema():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "recipe_reference.py")],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() in (REPO / "README.md").read_text(), "run scripts/recipe_reference.py and paste it into README.md"
