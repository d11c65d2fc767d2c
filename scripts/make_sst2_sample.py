"""Make the SST-2 sample bundled in gradkit (src/gradkit/data/sst2/).

train.tsv: the header plus 4,000 rows drawn without replacement, with a fixed seed, from the full
SST-2 train file (kept in their original order, so the sample is easy to diff against the source).
test.tsv: the 872 rows of the GLUE dev set (our test file), copied byte for byte.

Run from the repository root:  python scripts/make_sst2_sample.py [--source data/sst2]
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

SEED = 0
TRAIN_ROWS = 4000
REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO / "data" / "sst2"
DEST = REPO / "src" / "gradkit" / "data" / "sst2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="folder with train.tsv and test.tsv"
    )
    parser.add_argument("--dest", type=Path, default=DEST)
    args = parser.parse_args()

    # raw lines, not parsed rows: the sample keeps the source's bytes exactly
    header, *rows = (args.source / "train.tsv").read_bytes().splitlines(keepends=True)
    picked = sorted(random.Random(SEED).sample(range(len(rows)), TRAIN_ROWS))
    args.dest.mkdir(parents=True, exist_ok=True)
    (args.dest / "train.tsv").write_bytes(header + b"".join(rows[i] for i in picked))
    shutil.copyfile(args.source / "test.tsv", args.dest / "test.tsv")

    labels = [rows[i].rstrip(b"\r\n").rsplit(b"\t", 1)[1] for i in picked]
    print(
        f"train.tsv: {TRAIN_ROWS} of {len(rows)} rows (seed {SEED}); label counts:",
        {lab.decode(): labels.count(lab) for lab in sorted(set(labels))},
    )
    print("test.tsv: copied from", args.source / "test.tsv")


if __name__ == "__main__":
    main()
