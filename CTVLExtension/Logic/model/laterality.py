"""Which token columns of the model grid lie on the patient side a text names ("nodule in the right upper lobe").

The model grid is axis-aligned LPS (`ctvl.geometry.model_grid`): its w axis runs toward the patient's left, the
same for every scan, so the side is a range of token columns. The split is the body's midline, the centroid column
of the voxels above `BODY_HU` (the grid is centred on the volume, not on the patient); the column that straddles it
counts on both sides. The label-grounded depth scores (`CTVLModel.label_bin_logits`) then take a named label's
heatmap peak per depth bin on that side only, with `ModelConfig.locate_laterality`.
"""

from __future__ import annotations

import torch
from torch import Tensor

BODY_HU = -500.0  # above: body (soft tissue, bone, fluid); below: air and aerated lung


def body_midline(image: Tensor, hu_window: tuple[float, float]) -> float:
    """Fractional model-grid column of the body's centroid; the grid's centre when no voxel is body.

    image [D,H,W], windowed to [0, 1] by `hu_window` (the model input's first channel)."""
    low, high = float(hu_window[0]), float(hu_window[1])
    body = image.float() > (BODY_HU - low) / (high - low)
    per_column = body.sum(dim=(0, 1)).double()  # [W]
    total = float(per_column.sum())
    if total == 0.0:
        return (image.shape[-1] - 1) / 2.0
    cols = torch.arange(image.shape[-1], dtype=torch.float64, device=per_column.device)
    return float((per_column * cols).sum() / total)


def side_columns(image: Tensor, side: str | None, token_w: int, hu_window: tuple[float, float]) -> Tensor | None:
    """[W // token_w] bool: the token columns on the patient's `side` ('right' or 'left'); None for no side."""
    if side is None:
        return None
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right', 'left' or None, got {side!r}")
    mid = body_midline(image, hu_window)
    n = image.shape[-1] // int(token_w)
    centres = torch.arange(n, dtype=torch.float64) * token_w + (token_w - 1) / 2.0
    half = token_w / 2.0
    keep = centres < mid + half if side == "right" else centres > mid - half  # w runs toward the patient's left
    return keep.to(image.device)
