"""Shared helpers for tests/test_training_*.py: a tiny synthetic CT-RATE dataset and the tiny config."""

from __future__ import annotations

from pathlib import Path

import torch

from training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny-test.yaml"


def tiny_config(data: Path, cache: Path | None = None, **over):
    overrides = [f"data.root={data}"]
    if cache is not None:
        overrides.append(f"data.cache_dir={cache}")
    overrides += [f"{k}={v}" for k, v in over.items()]
    return load_config(TINY, overrides)


def make_data(root: Path, n: int = 6, seed: int = 0, split: str = "train") -> Path:
    from training.synthetic import write_synthetic_dataset

    write_synthetic_dataset(root, n=n, seed=seed, split=split)
    return root


def weights_of(model) -> dict[str, torch.Tensor]:
    from training.engine import trainable_state

    return trainable_state(model)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from training.engine import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))["model"]
