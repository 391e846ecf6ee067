"""Small shared helpers for training: atomic writes, distributed info, CPU bf16 support."""

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


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """True if the x86 CPU flags list avx512_bf16 or amx_bf16 (bf16 math in hardware), False if not, None if
    unknown (no /proc/cpuinfo, as on macOS and Windows, or no x86 "flags" line, as on ARM)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = [line.partition(":")[2].split() for line in text.splitlines() if line.startswith("flags")]
    if not flags:
        return None
    return bool({f for line in flags for f in line} & {"avx512_bf16", "amx_bf16"})
