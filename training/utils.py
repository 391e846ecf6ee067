"""Small shared helpers for training: atomic writes, distributed info."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from ctvl.atomic import atomic_write_bytes


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torch.distributed or the torchrun environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
