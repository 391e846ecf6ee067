"""Time one optimizer step of a training config on synthetic inputs: model compute alone, no data loading.

The same `TrainStep` (all enabled objectives), optimizer and autocast as `python -m training train`, fed random
volumes in [0, 1] on the config's grid, short synthetic reports and 4 snippets per volume. Compare its s/step
with the `s_per_step` column of a real run's log.csv to see whether that run waits on its data loader.

Usage: python -m benchmarks.train_step_speed --config training/configs/ct-rate.yaml --device cuda --batch 8 \
           [--grad-checkpointing] [--override model.text_model=DIR] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from ctvl.allocator import retain_freed_memory

from training.config import load_config
from training.engine import TrainStep, amp_dtype, build_model, build_optimizer, freeze_parameters

FINDINGS = ["A solid nodule in the right upper lobe.", "Bilateral pleural effusion.", "Emphysema in both lungs.",
            "Coronary artery calcification.", "No pericardial effusion.", "Consolidation in the left lower lobe."]


def synthetic_batch(model, batch: int, rng: np.random.Generator, device: torch.device) -> dict:
    cfg = model.config
    n_bins = cfg.input_shape[0] // model.bin_size
    texts = [" ".join(rng.choice(FINDINGS, 4, replace=False)) for _ in range(batch)]
    snippets = [str(rng.choice(FINDINGS)) for _ in range(4 * batch)]
    return {
        # image + the blobness channels that training reads precomputed from its cache (training.data)
        "image": torch.rand(batch, 1 + len(cfg.input_blob_scales_mm), *cfg.input_shape, device=device),
        "text": texts,
        "labels": torch.from_numpy(rng.integers(0, 2, (batch, 18)).astype(np.float32)).to(device),
        "bin_valid": torch.ones(batch, n_bins, dtype=torch.bool, device=device),
        "snippets": snippets,
        "snippet_bins": torch.from_numpy(rng.uniform(0, n_bins - 1, 4 * batch).astype(np.float32)).to(device),
        "snippet_owner": torch.arange(batch, device=device).repeat_interleave(4),
    }


def measure(config: str, overrides: list[str], device: str, batch: int, steps: int, checkpointing: bool) -> dict:
    retained = retain_freed_memory()  # as `python -m training` does (ctvl.allocator; CTVL_RETAIN_FREED_MEMORY=0: off)
    cfg = load_config(config, overrides)
    dev = torch.device(device)
    if dev.type == "cpu" and cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg)
    freeze_parameters(model, cfg.train.freeze)
    if checkpointing:
        model.config.grad_checkpointing = True
        model.vision.grad_checkpointing = True
    model.to(dev).train()
    step = TrainStep(model, cfg.loss)
    optimizer, _ = build_optimizer(model, cfg)
    amp = amp_dtype(cfg.train, dev)
    rng = np.random.default_rng(0)
    batch_data = synthetic_batch(model, batch, rng, dev)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps (cuDNN autotuning, text cache)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = step(batch_data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    out = {"config": config, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "batch": batch, "amp": str(amp), "grad_checkpointing": checkpointing, "retain_freed_memory": retained,
           "s_per_step_median": float(np.median(times)), "s_per_step_min": float(np.min(times))}
    if dev.type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args()
    r = measure(args.config, args.override, args.device, args.batch, args.steps, args.grad_checkpointing)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
