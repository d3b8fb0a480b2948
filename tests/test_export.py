"""``tsmtrain export`` and :mod:`tsmtrain.models.export`: the network as ONNX and TorchScript files
whose logits match PyTorch's on real clips, with the temporal shift as standard operators."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import SHARED_CLIPS, run_cli, tiny_recipe
from tsmtrain.models import VideoNet
from tsmtrain.models.export import (ExportError, export_model, load_exported, max_relative_difference,
                                    run_exported)
from tsmtrain.models.shift import temporal_shift

LIMIT = 1e-4
CLIPS = ["mmaction2_test.mp4", "moviepy_chaplin.mp4", "decord_flipping_a_pancake.mkv"]
SEGMENTS, SIZE, CLASSES = 2, 64, 5


# -- the shift's export path -------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("t, c, div", [(4, 16, 8), (3, 10, 4), (1, 8, 8), (2, 3, 8)])
def test_shift_export_path_is_bitwise_the_eager_shift(t, c, div, channels_last):
    x = torch.randn(2 * t, c, 5, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    eager = temporal_shift(x, t, div)
    seen = []

    def shift(v):
        seen.append(temporal_shift(v, t, div))
        return seen[-1]

    traced = torch.jit.trace(shift, (x,), check_trace=False)
    assert torch.equal(seen[0], eager)  # what tracing computed
    assert torch.equal(traced(x), eager)  # what the recorded graph computes
    kinds = _kinds(traced)
    assert "aten::cat" in kinds and not [k for k in kinds if "tsmtrain" in k or "copy_" in k], kinds


def _kinds(script_module) -> set[str]:
    """The operators of a TorchScript graph (``aten::cat``, ``prim::Constant``; source comments aside)."""
    return {node.kind() for node in script_module.inlined_graph.nodes()}


def test_shift_under_onnx_export_takes_the_cat_form(monkeypatch):
    from tsmtrain.models import shift as shift_module

    x = torch.randn(8, 16, 3, 3)
    eager = temporal_shift(x, 4)
    calls = []
    real = shift_module._shifted_by_cat
    monkeypatch.setattr(shift_module, "_shifted_by_cat", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.equal(temporal_shift(x, 4), eager)
    assert len(calls) == 1


# -- exported networks against PyTorch on real clips ---------------------------------------------

@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory):
    from tsmtrain.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("export")
    path = tiny_recipe(tmp / "r.yaml", tmp / "data", "e", data={"num_segments": SEGMENTS, "input_size": SIZE,
                                                                "short_side": SIZE, "workers": 0},
                       model={"num_classes": CLASSES}, dist={"engine": "none"})
    return load_recipe(path, check_files=False)


@pytest.fixture(scope="module")
def real_clips(small_recipe):
    """Three real clips as the test pipeline makes them: float32 (3, T, 3, S, S)."""
    from tsmtrain.eval.export_check import decode_view

    missing = [c for c in CLIPS if not (SHARED_CLIPS / c).is_file()]
    if missing:
        pytest.skip(f"the real clips {', '.join(missing)} are not in {SHARED_CLIPS}")
    return torch.cat([decode_view(small_recipe, SHARED_CLIPS / c) for c in CLIPS])


def _network(arch: str, shift: bool) -> VideoNet:
    torch.manual_seed(0)
    model = VideoNet(arch=arch, num_classes=CLASSES, num_segments=SEGMENTS, shift=shift).eval()
    with torch.no_grad():  # logits of some size, not all near zero
        model.fc.weight.normal_(0, 0.5)
    return model


def _graph_ops(path) -> set[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(path))
    functions = {(f.domain, f.name) for f in graph.functions}
    return {(n.domain, n.op_type) for n in graph.graph.node} | functions


CASES = [pytest.param(arch, shift, fmt, id=f"{'tsm' if shift else 'tsn'}-{arch}-{fmt}",
                      marks=[pytest.mark.slow] if (fmt == "onnx" or arch != "resnet18") else [])
         for arch in ("resnet18", "resnet50", "mobilenet_v2") for shift in (True, False)
         for fmt in ("onnx", "torchscript")]


@pytest.mark.parametrize("arch, shift, fmt", CASES)
def test_exported_network_gives_pytorchs_logits_on_real_clips(tmp_path, real_clips, arch, shift, fmt):
    model = _network(arch, shift)
    path = export_model(model, tmp_path / f"net.{fmt}", fmt, tuple(real_clips.shape[1:]))
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    run = load_exported(path, fmt)
    for n in (1, 3):  # the batch size is free (the example traced had 2)
        with torch.no_grad():
            expected = model(real_clips[:n])
        got = run(real_clips[:n])
        assert got.shape == (n, CLASSES)
        assert max_relative_difference(got, expected) <= LIMIT
    if fmt == "onnx":
        ops = _graph_ops(path)
        assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, ops
        assert not [op for _, op in ops if "shift" in op.lower() or "tsmtrain" in op.lower()]
        assert ("", "Conv") in ops and (("", "Concat") in ops) == shift  # the shift is the concatenation
    else:
        kinds = _kinds(torch.jit.load(str(path)))
        assert ("aten::_convolution" in kinds or "aten::conv2d" in kinds) and ("aten::cat" in kinds) == shift
        assert not [k for k in kinds if not k.startswith(("aten::", "prim::"))], kinds


def test_torchscript_file_runs_in_a_process_without_tsmtrain(tmp_path, real_clips):
    model = _network("resnet18", True)
    path = export_model(model, tmp_path / "net.pt", "torchscript", tuple(real_clips.shape[1:]))
    torch.save(real_clips[:1].clone(), tmp_path / "x.pt")
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]);"
            "torch.save(m(x), sys.argv[3]); assert 'tsmtrain' not in sys.modules")
    subprocess.run([sys.executable, "-I", "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, capture_output=True)
    with torch.no_grad():
        expected = model(real_clips[:1])
    assert max_relative_difference(torch.load(tmp_path / "y.pt"), expected) <= LIMIT


def test_max_relative_difference_is_relative_to_the_reference():
    b = torch.tensor([[2.0, -4.0]])
    assert max_relative_difference(b + torch.tensor([[0.0, 0.4]]), b) == pytest.approx(0.1)
    assert max_relative_difference(torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        max_relative_difference(torch.zeros(2), torch.zeros(3))


def test_unknown_format_and_foreign_file_are_export_errors(tmp_path):
    model = _network("resnet18", False)
    with pytest.raises(ExportError, match="'tflite'"):
        export_model(model, tmp_path / "x", "tflite", (SEGMENTS, 3, 32, 32))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ExportError, match="junk.onnx: cannot load it as"):
            run_exported(tmp_path / "junk.onnx", fmt, torch.zeros(1, SEGMENTS, 3, 32, 32))


@pytest.mark.parametrize("missing, fmt", [("onnxscript", "export"), ("onnx", "export"), ("onnxruntime", "run")])
def test_missing_onnx_packages_say_how_to_install_them(tmp_path, monkeypatch, missing, fmt):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if it were not installed
    with pytest.raises(ExportError, match=rf"{missing}, which is not installed: pip install tsmtrain\[export\]"):
        if fmt == "export":
            export_model(_network("resnet18", False), tmp_path / "x.onnx", "onnx", (SEGMENTS, 3, 32, 32))
        else:
            run_exported(tmp_path / "x.onnx", "onnx", torch.zeros(1, SEGMENTS, 3, 32, 32))
    assert not list(tmp_path.iterdir())


# -- the command ---------------------------------------------------------------------------------

@pytest.fixture
def trained(tmp_path):
    """A tiny recipe (TSM-ResNet18, 4 segments, 32 px; its data files do not exist) and a
    checkpoint of it in its run directory."""
    from tsmtrain.models import create_model
    from tsmtrain.recipe import load_recipe
    from tsmtrain.train.checkpoint import save_checkpoint

    path = tiny_recipe(tmp_path / "r.yaml", tmp_path / "nowhere", "x", dist={"engine": "none"})
    recipe = load_recipe(path, check_files=False)
    torch.manual_seed(0)
    model = create_model(recipe.model, recipe.data.num_segments)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.5)
    weights = save_checkpoint({"model": model.state_dict(), "recipe": recipe.model_dump(mode="json")},
                              recipe.run_dir, 1)
    return path, weights


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_export_command_writes_and_checks_the_file(tmp_path, trained, fmt):
    recipe, weights = trained
    out = tmp_path / f"net.{fmt}"
    result = run_cli("export", recipe, "--format", fmt, "--out", out)  # the run directory's latest checkpoint
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} ({fmt}, {out.stat().st_size:,} bytes") and str(weights) in lines[0]
    assert "probe" in lines[1] and "max relative difference" in lines[1]
    difference = float(lines[1].split("max relative difference ")[1].split()[0])
    assert difference <= LIMIT
    assert "time per clip, 1 thread:" in lines[2] and "PyTorch eager" in lines[2]
    clip = SHARED_CLIPS / CLIPS[0]
    if clip.is_file():  # --weights and --clip
        again = run_cli("export", recipe, "--weights", weights, "--format", fmt, "--out", tmp_path / "again",
                        "--clip", clip)
        assert again.returncode == 0, again.stderr
        assert f"checked on {clip}:" in again.stdout and (tmp_path / "again").is_file()


def test_export_command_fails_over_the_limit(tmp_path, trained, monkeypatch):
    from tsmtrain.eval import export_check

    monkeypatch.setattr(export_check, "max_relative_difference", lambda a, b: 3e-3)
    recipe, _ = trained
    result = run_cli("export", recipe, "--format", "torchscript", "--out", tmp_path / "net.pt")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'net.pt'}: its logits differ from PyTorch's by "
                                          f"3.00e-03 relative, more than 1e-04"]


def _bad(tmp_path, trained, *args):
    recipe, _ = trained
    result = run_cli("export", recipe, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.pt"))
    return result.stderr.strip()


def test_export_command_refuses_bad_input(tmp_path, trained):
    assert _bad(tmp_path, trained, "--format", "tflite", "--out", tmp_path / "x.onnx") == (
        "error: --format 'tflite': use one of onnx, torchscript")
    assert _bad(tmp_path, trained, "--format", "onnx", "--out", tmp_path / "no" / "x.onnx") == (
        f"error: --out {tmp_path / 'no' / 'x.onnx'}: the folder {tmp_path / 'no'} does not exist")
    (tmp_path / "file").write_text("")
    assert _bad(tmp_path, trained, "--format", "onnx", "--out", tmp_path / "file" / "x.onnx") == (
        f"error: --out {tmp_path / 'file' / 'x.onnx'}: {tmp_path / 'file'} is not a folder")
    assert _bad(tmp_path, trained, "--format", "onnx", "--out", tmp_path / "x.onnx", "--weights",
                tmp_path / "gone.pt") == f"error: --weights {tmp_path / 'gone.pt'}: no such file"
    assert _bad(tmp_path, trained, "--format", "torchscript", "--out", tmp_path / "x.pt", "--clip",
                tmp_path / "gone.mp4") == f"error: --clip {tmp_path / 'gone.mp4'}: no such file"
    (tmp_path / "notes.mp4").write_text("not a video")
    assert _bad(tmp_path, trained, "--format", "torchscript", "--out", tmp_path / "x.pt", "--clip",
                tmp_path / "notes.mp4").startswith(f"error: --clip {tmp_path / 'notes.mp4'}: cannot decode it")


def test_export_command_refuses_an_unwritable_folder(tmp_path, trained, monkeypatch):
    import os

    from tsmtrain.cli import export as export_cli

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: the folder answers as it would to a user
        real = os.access
        monkeypatch.setattr(export_cli.os, "access", lambda p, mode: False if p == locked else real(p, mode))
    assert _bad(tmp_path, trained, "--format", "onnx", "--out", locked / "x.onnx") == (
        f"error: --out {locked / 'x.onnx'}: the folder {locked} is not writable")
