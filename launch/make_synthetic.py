r"""Writes the synthetic chest-CT demo dataset: NIfTI volumes + manifest.csv.

  python launch/make_synthetic.py --out demo_out/raw --num 200 --seed 0 [--size demo] \
      [--difficulty demo|realistic] [--masks] [--series 2]

Each volume is a chest phantom with an independent random subset of the 18 CT-RATE
findings drawn into it and a findings + impression report that states them; see
docs/data_synthetic.md. --difficulty sets the findings' sizes and contrasts: `demo` (the
default for --size demo) draws them large enough to survive the demo preset (5 mm, 64^3)
and the demo's 32^3 views, `realistic` (the default for --size realistic) at clinical sizes.
--series 2 adds a second series per example (the same chest at another slice thickness,
volumes/<id>_s1.nii.gz, listed as `first;second` in the manifest's volume column) for the
msvlm encoder's multi-series data (prepare with --keep-slices; docs/msvlm.md).
Same --seed, --num, --size and --difficulty -> byte-identical output.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from t3d_jax.data import synthetic  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (volumes/, manifest.csv, findings.jsonl)")
    parser.add_argument("--num", type=int, default=200, help="number of volumes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="demo", choices=sorted(synthetic.SIZES),
                        help="grid size: demo (capped voxel count) or realistic (0.6-1.5 mm in-plane)")
    parser.add_argument("--difficulty", default=None, choices=sorted(synthetic.RENDER),
                        help="findings' sizes/contrasts: demo (survive 5 mm / 32^3 views) or realistic "
                             "(clinical); default: demo for --size demo, else realistic")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    parser.add_argument("--masks", action="store_true",
                        help="also write a label map per volume (masks/<id>.nii.gz, manifest column 'mask', "
                             "classes.json); volumes and reports are unchanged")
    parser.add_argument("--series", type=int, default=1, choices=(1, synthetic.SERIES_MAX),
                        help="series per example: 2 adds the same chest at another slice thickness "
                             "(manifest volume 'first;second'; prepare with --keep-slices)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = synthetic.write_dataset(args.out, args.num, args.seed, size=args.size,
                                       workers=args.workers, progress=True, difficulty=args.difficulty,
                                       masks=args.masks, series=args.series)
    difficulty = args.difficulty or synthetic.default_difficulty(args.size)
    print(f"wrote {args.num} volumes ({difficulty} difficulty) and {manifest} in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
