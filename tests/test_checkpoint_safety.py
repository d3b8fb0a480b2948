"""A checkpoint file never runs code (issue 30, item 1), and ``model.pretrained`` errors are one line.

* Every file is read with ``torch.load(weights_only=True)``; a file made with a ``__reduce__``
  payload (``os.system('touch MARKER')``) is refused with one line naming it and why, and
  ``MARKER`` never appears: through ``load_checkpoint``, a resumed run (refused, not skipped),
  ``test --checkpoint``, ``test`` and ``run`` with it as the run directory's latest checkpoint,
  ``extract --checkpoint``, ``predict --checkpoint``, and ``test`` of a head on features whose
  ``index.json`` was edited to name it (the recorded SHA-256 is checked before it is opened).
* Random states are stored as tensors and plain values; a checkpoint written the old way (NumPy's
  state as ``np.random.get_state()`` returns it) still loads (its exact resume: tests/test_checkpoint.py).
* ``model.pretrained`` that is empty, garbage, of other keys, or holds a list: one ``error:``
  line naming the file, exit 2, no traceback.
"""

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import run_cli, tiny_recipe
from tsmtrain.train import TrainingError
from tsmtrain.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
REFUSED = "refused: it holds Python objects that could run code (posix.system); tsmtrain loads tensors and plain values only"


class _Evil:
    """Unpickled, it runs ``touch MARKER``: its ``__reduce__`` names ``os.system``, not this class."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path) -> Path:
    """The issue's crafted file: unpickling it runs ``touch MARKER`` (legacy: the pre-zip format).
    Written in this process: the pickle holds ``posix.system`` and its argument, nothing of this module."""
    torch.save({"model": {}, "x": _Evil(marker)}, path, _use_new_zipfile_serialization=path.suffix != ".legacy")
    return path


def cli(*args, cwd=REPO):
    return run_cli(*args, cwd=cwd)  # in this process: 11 children cost a minute of imports


def one_error_line(proc, *parts):
    """Exit 2 and exactly one ``error:`` line holding every one of ``parts``; no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- the library


@pytest.mark.parametrize("name", ["evil.pt", "evil.legacy"])
def test_a_file_that_carries_code_is_refused_unread(tmp_path, name):
    marker = tmp_path / "MARKER"
    evil = write_evil(tmp_path / name, marker)
    assert not marker.exists()
    with pytest.raises(ckpt.UnsafeCheckpointError) as err:
        ckpt.read_tensors(evil)
    assert str(err.value) == f"{evil}: {REFUSED}" and err.value.names == ["posix.system"]
    if name == "evil.pt":
        with pytest.raises(ckpt.UnsafeCheckpointError):
            ckpt.load_checkpoint(evil)
    assert not marker.exists()


def test_garbage_is_one_line_without_advice_to_load_unsafely(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all " * 40)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_tensors(garbage)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(b"\x80\x02garbage, not a torch file" * 50)  # torch's unpickler reads it, and refuses
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.read_tensors(pickled)
    message = str(err.value)  # torch 2.14: (Unsupported operand 103)
    assert message.startswith(f"{pickled}: not a file of tensors and plain values (") and "()" not in message
    assert "\n" not in message and "weights_only" not in message
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="empty"):
        ckpt.read_tensors(tmp_path / "empty.pt")


def test_random_states_are_tensors_and_plain_values(tmp_path):
    gen = torch.Generator().manual_seed(3)
    np.random.seed(5)
    np.random.standard_normal()  # a cached Gaussian half of the state
    state = ckpt.rng_state(gen)
    torch.save({"rng": [state]}, tmp_path / "s.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "s.pt") == []
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0]  # no allow-list needed
    expected = (np.random.rand(4), random.random(), torch.rand(3), torch.rand(2, generator=gen))
    np.random.seed(0), random.seed(0), torch.manual_seed(0), gen.manual_seed(0)
    ckpt.set_rng_state(loaded, gen)
    again = (np.random.rand(4), random.random(), torch.rand(3), torch.rand(2, generator=gen))
    assert np.array_equal(expected[0], again[0]) and expected[1] == again[1]
    assert torch.equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


@pytest.mark.parametrize("numpy_module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_a_checkpoint_written_the_old_way_loads_and_restores_numpy(tmp_path, numpy_module):
    np.random.seed(7)
    np.random.standard_normal()
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    expected = np.random.rand(5)
    path = tmp_path / "checkpoint-00000002.pt"
    torch.save({"model": {"w": torch.ones(3)}, "step": 2, "recipe": {}, "rng": [old]}, path)  # as the old code did
    if numpy_module == "numpy.core.multiarray":  # as written under NumPy 1
        _rename_in_pickle(path, b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert f"{numpy_module}._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    state = ckpt.load_checkpoint(path)
    np.random.seed(0)
    ckpt.set_rng_state(state["rng"][0])
    assert np.array_equal(np.random.rand(5), expected)
    with pytest.raises(pickle.UnpicklingError):  # the allow-list lives only inside load_checkpoint
        torch.load(path, weights_only=True)


def _rename_in_pickle(path: Path, old: bytes, new: bytes) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)
    path.write_bytes(buf.getvalue())


def test_a_resumed_run_refuses_a_latest_checkpoint_that_carries_code(tmp_path):
    marker = tmp_path / "MARKER"
    good = tmp_path / "checkpoint-00000002.pt"
    torch.save({"model": {"w": torch.ones(3)}, "step": 2, "recipe": {}}, good)
    evil = write_evil(tmp_path / "checkpoint-00000099.pt", marker)

    class Rank0:
        rank, size = 0, 1

        def allgather_object(self, obj, name="object"):
            return [obj]

    with pytest.raises(TrainingError) as err:  # an attack, not damage: the run stops
        ckpt.resume_checkpoint(Rank0(), tmp_path, None)
    assert str(err.value) == f"{evil}: {REFUSED}"
    assert evil.exists() and good.exists() and not marker.exists()  # nothing renamed, nothing run


# ---------------------------------------------------------------- the five entry points (issue 30, item 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    """A tiny run trained for 1 step, its features extracted, and the crafted file beside them."""
    from tsmtrain.recipe import load_recipe
    from tsmtrain.train import train
    from tsmtrain.eval.extract import extract_features

    tmp = tmp_path_factory.mktemp("safety")
    path = tiny_recipe(tmp / "r.yaml", tiny_demo, "r", dist={"engine": "none"},
                       data={"workers": 0, "input_size": 8, "num_segments": 2},
                       schedule={"epochs": 1, "warmup_epochs": 0}, train={"stop_after_steps": 1})
    recipe = load_recipe(path)
    assert train(recipe).step == 1
    extract_features(recipe, tmp / "features")
    return tmp, path, recipe


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["test --checkpoint", "test latest", "run latest", "extract --checkpoint",
                                   "predict --checkpoint", "test head on features"])
def test_no_entry_point_runs_the_crafted_file(trained, tiny_demo, tmp_path, entry):
    tmp, path, recipe = trained
    marker = tmp_path / "MARKER"
    evil = write_evil(tmp_path / "evil.pt", marker)
    video = sorted(tiny_demo.rglob("*.mp4"))[0]
    if entry in ("test latest", "run latest"):
        run_dir = tmp_path / "runs" / "r"
        run_dir.mkdir(parents=True)
        evil = run_dir / "checkpoint-00000099.pt"
        (tmp_path / "evil.pt").rename(evil)
        args = [entry.split()[0], path, "--set", f"run.dir={tmp_path / 'runs'}"]
        expected = [str(evil), REFUSED]
    elif entry == "extract --checkpoint":
        args = ["extract", path, "--checkpoint", evil, "--out", tmp_path / "out"]
        expected = [str(evil), REFUSED]
    elif entry == "predict --checkpoint":
        args = ["predict", path, video, "--checkpoint", evil]
        expected = [str(evil), REFUSED]
    elif entry == "test head on features":
        features = tmp_path / "features"
        import shutil

        shutil.copytree(tmp / "features", features)
        index = features / "train" / "index.json"
        doc = json.loads(index.read_text())
        good = doc["checkpoint"]
        doc["checkpoint"] = str(evil)  # the attack: the index names the crafted file
        index.write_text(json.dumps(doc))
        args = ["test", path, "--set", f"data.features={features}", "--checkpoint", good]
        expected = [str(evil), "is not the checkpoint the features were extracted from", "SHA-256"]
    else:
        args = ["test", path, "--checkpoint", evil]
        expected = [str(evil), REFUSED]
    one_error_line(cli(*args, cwd=tmp_path), *expected)
    assert not marker.exists()
    if entry == "run latest":
        assert evil.exists() and not list(evil.parent.glob("*.corrupt"))  # refused, not skipped
        assert not (evil.parent / "metrics.jsonl").exists()  # no step taken


# ---------------------------------------------------------------- model.pretrained (issue 30, item 4)


def _pretrained(tmp_path, kind):
    path = tmp_path / "pretrained.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x80\x02garbage, not a torch file" * 50)
    elif kind == "wrong keys":
        torch.save({"bogus": torch.zeros(1)}, path)
    elif kind == "a list":
        torch.save([torch.zeros(1), 3], path)
    elif kind == "code":
        write_evil(path, tmp_path / "MARKER")
    return path


@pytest.mark.parametrize("kind, why", [("empty", "empty (0 bytes)"), ("garbage", "not a file"),
                                       ("wrong keys", "not weights of a format tsmtrain reads"),
                                       ("a list", "not a state_dict (it holds a list)"), ("code", REFUSED)])
def test_unusable_pretrained_files_are_one_line(tmp_path, kind, why):
    from tsmtrain.models import VideoNet

    path = _pretrained(tmp_path, kind)
    with pytest.raises(TrainingError) as err:
        VideoNet("resnet18", 4, 2, pretrained=path)
    message = str(err.value)
    assert message.startswith(f"model.pretrained {path}: ") and why in message and "\n" not in message
    assert "weights_only" not in message and not (tmp_path / "MARKER").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["empty", "garbage", "wrong keys", "a list", "a YAML list"])
def test_run_with_an_unusable_pretrained_file_is_one_error_line(tmp_path, tiny_demo, kind):
    path = tiny_recipe(tmp_path / "r.yaml", tiny_demo, "p", dist={"engine": "none"}, data={"workers": 0})
    doc = yaml.safe_load(path.read_text())
    if kind == "a YAML list":
        doc["model"]["pretrained"] = [str(_pretrained(tmp_path, "wrong keys"))] * 2
    else:
        doc["model"]["pretrained"] = str(_pretrained(tmp_path, kind))
    path.write_text(yaml.safe_dump(doc))
    line = one_error_line(cli("run", path, cwd=tmp_path), "model.pretrained")
    if kind != "a YAML list":
        assert str(tmp_path / "pretrained.pth") in line
    assert not (tmp_path / "runs" / "p" / "metrics.jsonl").exists()  # before the first step
