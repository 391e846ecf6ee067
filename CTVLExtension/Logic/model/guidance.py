"""Input-guided label heatmaps: a coarse label map sharpened by the label score's input x gradient.

A label heatmap's cells score boxes of 2 x 4 x 4 model voxels (6.4 x 17.6 x 17.6 mm in the demo) even when
shift-and-stitch samples them at every voxel (`ctvl.model.stitch`), so its maximum lands on the box that holds the
most evidence, often half a box beside a small finding or on the edge of a band (an effusion's lung interface).
As Guided Grad-CAM (Selvaraju et al., 2017) multiplies a class map by a pixel-level attribution, the guided map is

    sigmoid(coarse logit, resampled to the model grid) * A / max(A),
    A = 3-voxel mean of sum_c max(0, x_c * d(label's MIL logit)/d x_c)

over the model input's channels (the image and its blobness channels): the voxels whose intensity raises the
label's volume score, inside the boxes that the coarse map scores high. `ModelConfig.heatmap_guidance` turns it on
for the label heatmaps (`training evaluate`, `VolumeEncoding.heatmap`); free-text maps stay on tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from ctvl.model.config import GUIDANCE_MODES
from ctvl.model.stitch import stitched_ijk_to_ras
from ctvl.tokengrid import separable_resample
from torch import Tensor

__all__ = ["GUIDANCE_MODES", "guided_heatmap", "label_attribution", "to_model_grid"]

SMOOTH_VOXELS = 3  # box mean of the attribution: one voxel's gradient is noisy, a finding spans several


def label_attribution(model, x: Tensor, labels: list[str], pos: Tensor, neg: Tensor) -> Tensor:
    """[L, D, H, W] input x gradient attribution of each label's MIL logit for one input x [1, 1(+S), D, H, W]
    (one encoder forward, one backward per label; gradients on, whatever the caller's mode)."""
    if x.shape[0] != 1:
        raise ValueError(f"label_attribution takes one input, got a batch of {x.shape[0]}")
    with torch.enable_grad():
        xg = model.vision.with_blobs(x.detach().float()).detach().requires_grad_(True)
        emb = model.encode_image(xg)
        logits = model.mil_logits(model.label_tokens(emb), pos, neg, labels, evidence=emb.evidence)[0]
        maps = []
        for i in range(len(labels)):
            (grad,) = torch.autograd.grad(logits[i], xg, retain_graph=i < len(labels) - 1)
            maps.append((grad * xg.detach()).clamp_min(0).sum(1)[0])
    a = torch.stack(maps).float()
    return F.avg_pool3d(a[:, None], SMOOTH_VOXELS, 1, SMOOTH_VOXELS // 2, count_include_pad=False)[:, 0]


def guided_heatmap(coarse_logits: Tensor, attribution: Tensor) -> Tensor:
    """sigmoid(coarse_logits) * attribution / max(attribution), both on the model grid [..., D, H, W] (one label);
    an all-zero attribution (a label score the input does not raise) leaves sigmoid(coarse) alone."""
    top = attribution.max()
    if not torch.isfinite(top) or top <= 0:
        return torch.sigmoid(coarse_logits.float())
    return torch.sigmoid(coarse_logits.float()) * (attribution.float() / top)


def to_model_grid(maps: Tensor, patch: tuple[int, int, int], subdivision: tuple[int, int, int],
                  shape: tuple[int, int, int]) -> Tensor:
    """[L, d*n_d, h*n_h, w*n_w] maps on the stitched grid (`ctvl.model.stitch`; n = (1, 1, 1): tokens) -> [L, D, H, W]
    on the model grid (trilinear; outside half a cell of the grid's edge: the map's minimum)."""
    src = stitched_ijk_to_ras(np.eye(4), patch, subdivision)
    out = [separable_resample(m.float().cpu(), src, np.eye(4), shape, float(m.min())) for m in maps]
    return torch.from_numpy(np.stack(out)).to(maps.device)
