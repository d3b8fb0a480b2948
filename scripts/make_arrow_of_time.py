"""Build the "arrow of time" dataset from the real footage in ../shared/clips.

Windows of about 2 s cut from each real-footage source, each written forward (label 0) and
time-reversed (label 1), train and validation split by source (see tsmtrain/prep/arrow_of_time.py):

    python scripts/make_arrow_of_time.py [--clips DIR] [--out DIR] [--window 2.0] ...

Exit status 2 when the clips folder is missing.
"""

import argparse
import sys
from pathlib import Path

from tsmtrain.prep.arrow_of_time import build_arrow_of_time

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default=str(REPO.parent / "shared" / "clips"), help="folder of the real clips")
    parser.add_argument("--out", default=str(REPO / "data" / "arrow_of_time"), help="output folder")
    parser.add_argument("--window", type=float, default=2.0, help="window length in seconds")
    parser.add_argument("--short-side", type=int, default=128, help="short side of the written videos, pixels")
    parser.add_argument("--val-sources", type=int, default=3, help="footage groups held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    args = parser.parse_args(argv)
    try:
        train, val = build_arrow_of_time(args.clips, args.out, args.window, args.short_side, args.val_sources, args.seed)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_train, n_val = (len(p.read_text().splitlines()) for p in (train, val))
    print(f"arrow of time: {n_train} train clips, {n_val} validation clips in {Path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
