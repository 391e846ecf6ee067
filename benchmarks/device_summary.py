"""Summarise the files that `benchmarks/device_check.sh` leaves in $OUT into benchmarks/results/device_check.json.

Reads any of: ct_ckpt.csv / ct_plain.csv / ct_torchrun.csv (log.csv of real `training train` runs of
ct-rate.yaml), speed.jsonl (`benchmarks/train_step_speed.py` lines), ct_infer.log (export -> analyze -> evaluate on
cuda). The first logged interval of a run (cuDNN autotuning, cache warm-up) is left out of its s/step.

Usage: python -m benchmarks.device_summary DIR [DIR ...] [--note TEXT] [--out benchmarks/results/device_check.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

RUNS = {"ct_ckpt.csv": "ct-rate.yaml, gradient checkpointing", "ct_plain.csv": "ct-rate.yaml, no checkpointing",
        "ct_torchrun.csv": "ct-rate.yaml under torchrun (NCCL), gradient checkpointing"}


def summarise(dirs: list[Path]) -> dict:
    out: dict = {"end_to_end": [], "compute_only": [], "cuda_inference": None}
    for d in dirs:
        for name, what in RUNS.items():
            f = d / name
            if not f.is_file():
                continue
            rows = list(csv.DictReader(f.open()))
            steady = [float(r["s_per_step"]) for r in rows[1:]] or [float(r["s_per_step"]) for r in rows]
            out["end_to_end"].append({
                "run": what, "steps": int(rows[-1]["step"]), "s_per_step_median": statistics.median(steady),
                "gpu_peak_gib": max(float(r.get("gpu_peak_gib") or 0) for r in rows),
            })
        f = d / "speed.jsonl"
        if f.is_file():
            out["compute_only"] += [json.loads(line) for line in f.read_text().splitlines() if line.startswith("{")]
        f = d / "ct_infer.log"
        if f.is_file():
            rc = [line for line in f.read_text().splitlines() if line.startswith("cuda inference rc=")]
            out["cuda_inference"] = rc[-1] if rc else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "device_check.json")
    args = ap.parse_args()
    result = summarise(args.dirs)
    result["note"] = args.note
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["end_to_end"]:
        print(f"{r['run']:58s} {r['s_per_step_median']:.2f} s/step  peak {r['gpu_peak_gib']:.1f} GiB")
    for r in result["compute_only"]:
        print(f"compute only: {Path(r['config']).name} batch {r['batch']} ckpt {r['grad_checkpointing']}: "
              f"{r['s_per_step_median']:.3f} s/step, peak {r.get('gpu_peak_gib', 0):.1f} GiB on {r['device']}")
    print(result["cuda_inference"])


if __name__ == "__main__":
    main()
