"""Hessian blobness: a fixed (parameter-free) filter that marks bright 3D blobs (nodules) and not tubes (vessels).

The classical nodule-enhancement filter of CAD systems (Li, Sone & Doi, Med. Phys. 2003; Frangi et al. 1998 for
vessels): at scale s, the Hessian of the Gaussian-smoothed image (scale-normalised, s^2 H) has three negative
eigenvalues inside a bright blob, two inside a bright tube (the third ~ 0 along its axis) and one on a bright
plate. With the eigenvalues ordered |l1| >= |l2| >= |l3|, Li's dot response is l3^2 / |l1| where all three are
negative, else 0: a tube's near-zero l3 drives it to ~0, so a 1-cm nodule stands out from the vessel
cross-sections that look like it in any one slice. The eigenvalues come in closed form (the trigonometric solution
for symmetric 3x3 matrices), elementwise.

Used as extra input channels of the vision encoder (`ModelConfig.input_blob_scales_mm`), one per scale, and with
`ModelConfig.blob_tokens` as per-token features (`token_blob_features`). Cost for two scales on one CPU thread:
~0.1 s per volume on the demo grid (96 x 80 x 80), ~0.7 s on the 2.2 mm grid (96 x 160 x 160). Training caches the
raw response, which is linear in the image's intensity scale, so intensity augmentation scales it exactly. The
network sees `compress`ed values: the raw response is heavy-tailed, and in a scratch probe a per-token linear MIL
head stayed at chance for nodules on it and learned them after log1p(10 x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# a bright isotropic Gaussian blob of amplitude a and width s reads a / (4 sqrt 2) ~ a / 5.7 at scale s; GAIN
# brings a soft-tissue nodule in lung (+900 HU: a ~ 0.45 in the [-1000, 1000] HU window) to ~ 1
GAIN = 12.0
LOG_GAIN = 10.0  # compress: log1p(LOG_GAIN * blobness)


def gaussian_derivative_kernels(sigma_vox: float, step_mm: float) -> Tensor:
    """[3, 2r+1]: taps of the normalised Gaussian and of its first and second derivatives (per mm, per mm^2),
    radius r = ceil(3 sigma) (at least 1)."""
    radius = max(1, math.ceil(3.0 * sigma_vox))
    s = max(float(sigma_vox), 1e-6)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / s) ** 2)
    g = g / g.sum()
    d1 = -x / s**2 * g / step_mm
    d2 = (x**2 / s**4 - 1.0 / s**2) * g
    d2 = (d2 - d2.mean()) / step_mm**2  # zero response to a constant, as the continuous kernel
    return torch.stack([g, d1, d2]).float()


def correlate1d(x: Tensor, taps: list[float], dim: int) -> Tensor:
    """x [B,C,D,H,W] correlated with odd-length `taps` along `dim` (2, 3 or 4), edges replicated: what `F.conv3d`
    with a 1-D kernel computes on the replicate-padded x, as a sum of shifted views. On the CPU, conv3d with one
    channel takes its slow im2col path: 13 taps over 96 x 160 x 160 voxels cost 0.14 s there and 0.01 s here."""
    radius = len(taps) // 2
    pad = [0] * 6
    pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = radius
    xp = F.pad(x, pad, mode="replicate")
    n = x.shape[dim]
    out = xp.narrow(dim, 0, n) * taps[0]
    for k in range(1, len(taps)):
        out.add_(xp.narrow(dim, k, n), alpha=taps[k])
    return out


# the six Hessian entries (dd, hh, ww, dh, dw, hw) as derivative orders along (d, h, w)
HESSIAN_ORDERS = ((2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0), (1, 0, 1), (0, 1, 1))


def symmetric_eigenvalues(a: Tensor, d: Tensor, f: Tensor, b: Tensor, c: Tensor, e: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Ascending eigenvalues of the symmetric matrices [[a, b, c], [b, d, e], [c, e, f]] (elementwise tensors).

    Closed form (Smith, CACM 1961): with q = trace / 3 and p = sqrt(|A - qI|_F^2 / 6), the eigenvalues are
    q + 2p cos(phi + 2 pi k / 3), phi = acos(det((A - qI) / p) / 2) / 3.
    """
    q = (a + d + f) / 3.0
    off = b * b + c * c + e * e
    p2 = ((a - q) ** 2 + (d - q) ** 2 + (f - q) ** 2 + 2.0 * off) / 6.0
    p = p2.sqrt()
    safe = torch.where(p > 1e-12, p, torch.ones_like(p))  # p = 0: A = qI, every eigenvalue q
    a1, d1, f1 = (a - q) / safe, (d - q) / safe, (f - q) / safe
    b1, c1, e1 = b / safe, c / safe, e / safe
    r = (a1 * (d1 * f1 - e1 * e1) - b1 * (b1 * f1 - e1 * c1) + c1 * (b1 * e1 - d1 * c1)) / 2.0
    phi = torch.acos(r.clamp(-1.0, 1.0)) / 3.0
    hi = q + 2.0 * p * torch.cos(phi)
    lo = q + 2.0 * p * torch.cos(phi + 2.0 * math.pi / 3.0)
    return lo, 3.0 * q - hi - lo, hi


class HessianBlobness(nn.Module):
    """x [B,1,D,H,W] (image in [0,1], voxel spacing `spacing` mm) -> [B,S,D,H,W]: blobness at each scale (mm).

    No parameters; computed in float32 outside autocast (second differences of a bf16 image are noise).
    """

    def __init__(self, scales_mm: tuple[float, ...], spacing: tuple[float, float, float]) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales_mm)
        self.spacing = tuple(float(s) for s in spacing)
        # taps[scale][axis][order]: plain floats (fixed by the config; no device copies, no syncs)
        self.taps = [[gaussian_derivative_kernels(s / self.spacing[axis], self.spacing[axis]).tolist()
                      for axis in range(3)] for s in self.scales]

    def _filter(self, x: Tensor, i: int, orders: tuple[int, int, int]) -> Tensor:
        """x [B,1,D,H,W] convolved with the separable Gaussian derivative of `orders` at scale i."""
        for axis, order in enumerate(orders):
            x = correlate1d(x, self.taps[i][axis][order], 2 + axis)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected images [B,1,D,H,W], got {tuple(x.shape)}")
        out = []
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.float()
            for i, s in enumerate(self.scales):
                h = [self._filter(x32, i, o)[:, 0] * s**2 for o in HESSIAN_ORDERS]
                lo, mid, hi = symmetric_eigenvalues(*h)  # ascending; a bright blob: all < 0
                out.append(torch.where(hi < 0, hi * hi / (-lo).clamp_min(1e-12), torch.zeros_like(hi)) * GAIN)
        return torch.stack(out, dim=1).to(x.dtype)


def compress(blobness: Tensor) -> Tensor:
    """The scale the network sees: log1p(LOG_GAIN * blobness) (monotone, 0 -> 0; tames the heavy tail)."""
    return blobness.clamp_min(0.0).mul_(LOG_GAIN).log1p_()  # in place on clamp_min's copy: 2x faster on the CPU


def token_blob_features(blobness: Tensor, token_size: tuple[int, int, int], grid: tuple[int, int, int]) -> Tensor:
    """[B,S,D,H,W] raw blobness -> [B,S,d,h,w]: the `compress`ed maximum over each token's voxels (one nodule
    voxel marks its token; an average would dilute it), on `grid` (adaptive max pooling where it differs)."""
    out = F.max_pool3d(blobness.float(), kernel_size=token_size, stride=token_size)
    if tuple(out.shape[2:]) != tuple(grid):
        out = F.adaptive_max_pool3d(out, tuple(grid))
    return compress(out)  # monotone: the compressed maximum, at 1/32 of the cost on the demo grid


__all__ = ["HessianBlobness", "correlate1d", "gaussian_derivative_kernels", "symmetric_eigenvalues", "HESSIAN_ORDERS",
           "GAIN", "LOG_GAIN", "compress", "token_blob_features"]
