"""Training augmentation, applied to the whole batch on the training device.

The dataset draws each volume's parameters from its per-(seed, epoch, index) generator (`sample_params`, a few
scalars, so resume stays exact) and the engine applies them after the batch reaches the device (`apply`):
intensity scale, intensity shift, Gaussian noise and an in-plane translation by whole voxels (border values
repeated). No left-right flips (reports name sides) and no depth shift (snippet depth targets stay exact).

Why not per-sample MONAI transforms in the loader: on the ct-rate grid (128 x 320 x 320) they cost 0.2-1.5 s per
volume on one CPU thread, and one H100 then waited on its 8 loader workers (measured 3.5-4.3 s/step against
0.63 s/step of model compute; `benchmarks/device_check.sh`, `benchmarks/train_step_speed.py`). Here the loader only
reads the cached float16 array; the arithmetic runs where the model runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

N_PARAMS = 6  # scale factor, intensity offset, noise std, noise seed, row shift, column shift
IDENTITY = np.zeros(N_PARAMS, dtype=np.float64)


def sample_params(cfg: Any, rng: np.random.Generator) -> np.ndarray:
    """Parameters [N_PARAMS] for one volume; each augmentation is on with probability ``cfg.prob``.

    Scale: x * (1 + f), f ~ U(-intensity_scale, intensity_scale); shift: x + o, o ~ U(-intensity_shift, ...);
    noise: std ~ U(0, noise_std), seeded; translation: whole voxels, round(U(-translate_vox, translate_vox)).
    """
    p = IDENTITY.copy()
    on = rng.random(4) < float(cfg.prob)
    draws = rng.uniform(-1.0, 1.0, 5)  # always drawn, so every volume consumes the same amount of randomness
    seed = int(rng.integers(2**31 - 1))
    if on[0]:
        p[0] = draws[0] * float(cfg.intensity_scale)
    if on[1]:
        p[1] = draws[1] * float(cfg.intensity_shift)
    if on[2]:
        p[2] = abs(draws[2]) * float(cfg.noise_std)
        p[3] = seed
    if on[3]:
        p[4] = round(draws[3] * float(cfg.translate_vox))
        p[5] = round(draws[4] * float(cfg.translate_vox))
    return p


def _shift_plane(x: Tensor, dy: int, dx: int) -> Tensor:
    """x [C,D,H,W] moved by (dy, dx) voxels in-plane; the edge row/column fills the gap."""
    h, w = x.shape[-2:]
    if dy:
        rows = (torch.arange(h, device=x.device) - dy).clamp_(0, h - 1)
        x = x.index_select(-2, rows)
    if dx:
        cols = (torch.arange(w, device=x.device) - dx).clamp_(0, w - 1)
        x = x.index_select(-1, cols)
    return x


def apply(images: Tensor, params: Tensor | None) -> Tensor:
    """images [B,C,D,H,W] (any float dtype, on the training device) -> float32 with each row of params applied
    (intensity offset and noise to channel 0, the image; scale and translation to every channel).

    params [B, N_PARAMS] (float64, any device) from `sample_params`; None or all-zero rows leave images unchanged.
    """
    x = images.float()
    if params is None:
        return x
    p = params.detach().to("cpu", torch.float64)
    if not bool(p.any()):
        return x
    b = x.shape[0]
    scale = (1.0 + p[:, 0]).to(x.device, x.dtype).view(b, *([1] * (x.ndim - 1)))
    offset = p[:, 1].to(x.device, x.dtype).view(b, *([1] * (x.ndim - 1)))
    # channel 0 is the image; later channels (precomputed blobness) are homogeneous in the intensity: they take the
    # scale and the translation, not the offset or the noise
    x = x * scale
    x[:, :1] += offset
    rows = p.tolist()
    out = []
    for i in range(b):
        xi = x[i]
        std, seed, dy, dx = rows[i][2], int(rows[i][3]), int(rows[i][4]), int(rows[i][5])
        if std > 0:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(seed)
            noise = std * torch.randn(xi[:1].shape, generator=gen, device=x.device, dtype=x.dtype)
            xi = torch.cat([xi[:1] + noise, xi[1:]])
        if dy or dx:
            xi = _shift_plane(xi, dy, dx)
        out.append(xi)
    return torch.stack(out)
