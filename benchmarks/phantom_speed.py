"""Phantom generator speed at the default size, one process: generation only, and generation + NIfTI writing.

Usage: python benchmarks/phantom_speed.py [--n 8] [--seed 0]
Prints volumes/s and writes benchmarks/results/phantom_speed.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from ctvl.phantom import generate_case, write_dataset

    generate_case(args.seed, 10_000)  # warm-up (imports, allocator)
    times, voxels = [], []
    for i in range(args.n):
        t = time.perf_counter()
        c = generate_case(args.seed, i)
        times.append(time.perf_counter() - t)
        voxels.append(c.volume.array.size)
    gen = args.n / sum(times)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_dataset(tmp, args.n, args.seed, progress=False)
        total = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.nii.gz"))
    res = {"n": args.n, "generation_volumes_per_s": round(gen, 3),
           "generation_s_per_volume_median": round(float(np.median(times)), 3),
           "generate_write_volumes_per_s": round(args.n / total, 3),
           "mean_voxels": int(np.mean(voxels)), "mb_per_volume_on_disk": round(size / args.n / 1e6, 2)}
    print(f"generation only     : {res['generation_volumes_per_s']:.2f} volumes/s "
          f"(median {res['generation_s_per_volume_median']:.3f} s, {res['mean_voxels'] / 1e6:.1f} Mvoxel)")
    print(f"generate + write    : {res['generate_write_volumes_per_s']:.2f} volumes/s "
          f"({res['mb_per_volume_on_disk']:.1f} MB per volume + mask)")
    out = Path(__file__).parent / "results" / "phantom_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
