"""Forward+backward time per volume of the vision side of CTVL models on CPU (prints; writes results JSON).

Wall time is what matters; on a shared machine (load > threads) also read the process CPU time: with 1 thread,
cpu s/vol is the work per volume, and ~cpu/1.8 is the wall time to expect with 2 idle cores.

Usage: .venv/bin/python benchmarks/model_speed.py [--threads 2] [--batch 4] [--steps 3] [--preset demo-hybrid ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from ctvl.model import PRESETS, CTVLModel, count_parameters


def measure(name: str, batch: int, steps: int) -> dict:
    cfg = PRESETS[name]()
    model = CTVLModel(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(batch, 1, *cfg.input_shape)
    times, cpu = [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        emb = model.encode_image(x)
        loss = emb.pooled.sum() + emb.bins.sum() + emb.tokens.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # first step is warm-up
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    n_params = count_parameters(model, trainable_only=True)
    saved = sum(model.state_dict()[k].numel() for k in model.saved_state_keys())
    return {"preset": name, "input_shape": cfg.input_shape, "spacing": cfg.spacing, "token_grid": cfg.token_grid(),
            "bin_mm": cfg.bin_size_mm(), "batch": batch, "s_per_volume": min(times) / batch,
            "s_per_volume_median": sorted(times)[len(times) // 2] / batch,
            "cpu_s_per_volume": min(cpu) / batch, "load_avg_1min": os.getloadavg()[0],
            "trainable_params": n_params, "weights_mb": saved * 4 / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--preset", nargs="*", default=["demo-hybrid", "demo-vit"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.preset:
        r = measure(name, args.batch, args.steps)
        results.append(r)
        print(f"{name:14s} grid {r['token_grid']} bins {r['bin_mm']:.0f} mm  fwd+bwd {r['s_per_volume']:.3f} s/vol "
              f"(median {r['s_per_volume_median']:.3f}, cpu {r['cpu_s_per_volume']:.3f} s/vol, "
              f"load {r['load_avg_1min']:.1f})  params {r['trainable_params'] / 1e6:.2f} M  "
              f"weights {r['weights_mb']:.1f} MB")
    out = Path(__file__).parent / "results" / "model_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
