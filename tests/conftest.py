import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CLIPS = REPO.parent / "shared" / "clips"


def make_video(path: Path, frames: int = 12, size: int = 32) -> Path:
    """A small real H.264 file (ffmpeg's test pattern)."""
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}x{size}:rate=8",
         "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The embedded demo dataset at a tiny size: 4 classes, 6 train and 2 val clips each."""
    from tsmtrain.synthetic import generate_demo_dataset

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("tiny_demo")
    generate_demo_dataset(root, num_classes=4, train_per_class=6, val_per_class=2, frames=8, size=32)
    return root
