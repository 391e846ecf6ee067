"""A geometry-transparent stand-in for CTVLModel: token features are patch means of the windowed CT.

With the text "bright" the heatmap is exactly the patch-mean intensity, so outputs are a known function of the
input's RAS content: a ramp in RAS S must come back as the same ramp on the input grid, and a bright lesion's
heatmap peak and best slice must land on the lesion, whatever the input's orientation.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from ctvl.geometry import Volume
from torch import nn


class StubConfig:
    name = "stub"
    version = "0.0"
    encoder = "stub"
    input_shape = (16, 24, 24)
    spacing = (3.0, 3.0, 3.0)
    hu_window = (-1000.0, 1000.0)
    labels = ("Lung nodule", "Emphysema")

    def downsample(self) -> tuple[int, int, int]:
        return (2, 2, 2)


class StubModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = StubConfig()
        self.pool = nn.Sequential(nn.AvgPool3d(2))  # a container, so cancel hooks have something to attach to
        self.scale = nn.Parameter(torch.ones(()))
        self.text_calls = 0
        self.image_calls = 0
        self.prompts = {label: ([f"{label} present", "bright"], [f"no {label}", "dark"])
                        for label in self.config.labels}

    def encode_image(self, x: torch.Tensor) -> SimpleNamespace:
        self.image_calls += 1
        v = self.pool(x)[:, 0] * self.scale  # [B, d, h, w]
        tokens = torch.stack([v, 1.0 - v, torch.zeros_like(v), torch.zeros_like(v)], dim=-1)
        bins = nn.functional.normalize(tokens.mean(dim=(2, 3)), dim=-1)
        pooled = nn.functional.normalize(tokens.mean(dim=(1, 2, 3)), dim=-1)
        return SimpleNamespace(tokens=tokens, bins=bins, pooled=pooled)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.text_calls += 1
        out = []
        for text in texts:
            if text == "bright":
                vec = torch.tensor([1.0, 0.0, 0.0, 0.0])
            elif text == "dark":
                vec = torch.tensor([0.0, 1.0, 0.0, 0.0])
            else:
                gen = torch.Generator().manual_seed(abs(hash(text)) % (2**31))
                vec = torch.randn(4, generator=gen)
            out.append(nn.functional.normalize(vec, dim=0))
        return torch.stack(out)

    def heatmap_logits(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bdhwe,e->bdhw", tokens, text)

    def bin_logits(self, bins: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return torch.einsum("bde,e->bd", bins, text) / 0.1

    def disease_logits(self, pooled: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, labels=None) -> torch.Tensor:
        return 10.0 * (pooled @ pos.t() - pooled @ neg.t())  # [B, L]


def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    cz, sz = np.cos(np.radians(z_deg)), np.sin(np.radians(z_deg))
    cx, sx = np.cos(np.radians(x_deg)), np.sin(np.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


ORIENTATIONS = {
    "ras": np.eye(3),
    "lps": np.diag([-1.0, -1.0, 1.0]),
    "inferior_first": np.diag([-1.0, -1.0, -1.0]),
    "oblique": rotation(25.0, 15.0),
    "sagittal_stack": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),  # i -> S
}


def make_volume(direction: np.ndarray, shape_kji=(45, 37, 41), spacing_ijk=(1.3, 1.1, 2.5),
                centre_ras=(10.0, -20.0, 30.0)) -> Volume:
    """An empty (-1000 HU) volume whose grid centre sits at ``centre_ras``."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(spacing_ijk)
    centre_ijk = (np.array(shape_kji[::-1], dtype=np.float64) - 1) / 2
    m[:3, 3] = np.asarray(centre_ras) - m[:3, :3] @ centre_ijk
    return Volume(np.full(shape_kji, -1000.0, dtype=np.float32), m)


def voxel_ras(volume: Volume) -> np.ndarray:
    """RAS of every voxel, shaped like the array plus a trailing 3."""
    k, j, i = np.indices(volume.array.shape, dtype=np.float64)
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    return volume.ijk_to_ras_points(ijk).reshape(*volume.array.shape, 3)
