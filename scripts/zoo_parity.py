"""Format x architecture: does a model-zoo file load into tsmtrain's network, and how far are its
logits from those of the network it came from? Prints a Markdown table (docs/model-zoo.md,
"Parity with the reference code"); everything is measured in this one run.

Each source network is built by ``tests/zoo_reference.py`` (the TSM repository's TSN/TSM and
mmaction2's Recognizer2D, written after their code without tsmtrain) with random weights and
random BatchNorm statistics, saved in that project's container, loaded by
:func:`tsmtrain.models.weights.load_weights`, and both are run on one real clip: 8 segments at
224x224 decoded from ``../shared/clips/mmaction2_test.mp4`` as ``tsmtrain test`` decodes it. The
difference is ``max |ours - theirs| / max |theirs|`` over the 400 logits. A torchvision or timm
file is a backbone: its row compares the per-frame pooled features of the backbone alone.

    PYTHONPATH=. .venv/bin/python scripts/zoo_parity.py [--clip VIDEO] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import zoo_reference as ref  # noqa: E402
from tsmtrain.eval.export_check import decode_view  # noqa: E402
from tsmtrain.models import VideoNet  # noqa: E402
from tsmtrain.models.export import max_relative_difference  # noqa: E402
from tsmtrain.models.weights import WeightsError, load_weights  # noqa: E402
from tsmtrain.recipe import load_recipe  # noqa: E402

T, K = 8, 400
OURS = {"resnet18": "resnet18", "resnet50": "resnet50", "mobilenetv2": "mobilenet_v2"}


def clip_tensor(clip: Path, size: int) -> torch.Tensor:
    recipe = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    recipe.write(f"data: {{root: {clip.parent}, train_list: t.txt, num_segments: {T}, input_size: {size}}}\n")
    recipe.close()
    return decode_view(load_recipe(recipe.name, check_files=False), clip)


def row(fmt: str, arch: str, shift: bool, x: torch.Tensor, folder: Path) -> tuple[str, str, str, str]:
    name = f"{'TSM' if shift else 'TSN'}-{OURS[arch]}"
    net = VideoNet(OURS[arch], K, T, shift=shift).eval()
    if fmt == "tsm":
        source = ref.official_tsn(arch, K, T, is_shift=shift, seed=1)
        path = folder / ref.official_file_name(arch, T, shift)
        ref.official_checkpoint(source, path, with_optimizer=False)
        theirs = ref.official_logits(source, x)
    elif fmt.startswith("mmaction2"):
        source = ref.mmaction2_recognizer(arch, K, T, is_shift=shift, seed=2)
        path = folder / "tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb_20220831-64d69186.pth"
        if fmt == "mmaction2":
            ref.mmaction2_published(source, path)
        else:
            path = folder / "epoch_50.pth"
            ref.mmaction2_checkpoint(source, path, with_objects=True)
        theirs = ref.mmaction2_logits(source, x)
    else:  # a backbone: compare the pooled per-frame features
        tv = ref.timm_resnet50_state_dict(seed=3) if fmt == "timm" else \
            ref.randomize_(getattr(torchvision.models, OURS[arch])(weights=None), seed=3).state_dict()
        path = folder / f"{fmt}-{arch}.pth"
        torch.save(tv, path)
        backbone = getattr(torchvision.models, OURS[arch])(weights=None)
        backbone.load_state_dict(tv)
        if hasattr(backbone, "fc"):
            backbone.fc = torch.nn.Identity()
        else:
            backbone.classifier = torch.nn.Identity()
        with torch.no_grad():
            theirs = backbone.eval()(x.flatten(0, 1)).view(x.shape[0], T, -1).mean(1)
    try:
        report = load_weights(net, path, need_classifier=fmt not in ("torchvision", "timm"))
    except WeightsError as err:
        return fmt, name, "no", str(err)
    with torch.no_grad():
        ours = net.features(x) if fmt in ("torchvision", "timm") else net(x)
    what = "features" if fmt in ("torchvision", "timm") else "logits"
    return fmt, name, f"yes ({report.loaded} tensors)", f"{max_relative_difference(ours, theirs):.1e} ({what})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=str(ROOT.parent / "shared" / "clips" / "mmaction2_test.mp4"))
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(2)
    x = clip_tensor(Path(args.clip), args.size)
    cases = [("tsm", a, s) for a in ("resnet18", "resnet50", "mobilenetv2") for s in (True, False)]
    cases += [("mmaction2", a, s) for a in ("resnet18", "resnet50", "mobilenetv2") for s in (True, False)]
    cases += [("mmaction2 training checkpoint", "resnet50", True)]
    cases += [("torchvision", a, False) for a in ("resnet18", "resnet50", "mobilenetv2")] + [("timm", "resnet50", False)]
    print(f"clip {args.clip}: {T} segments at {args.size}x{args.size}; {K} classes; random weights and BatchNorm statistics\n")
    print("| format | network | loaded | max relative difference |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, arch, shift in cases:
            print("| " + " | ".join(row(fmt, arch, shift, x, Path(tmp))) + " |", flush=True)
            for f in Path(tmp).iterdir():
                f.unlink()


if __name__ == "__main__":
    main()
