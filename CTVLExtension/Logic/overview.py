"""`overview.png`: a montage of the top findings' and the queries' best axial slices with heatmaps overlaid.

Every panel is an axial plane resampled (through ``ctvl.geometry.resample``) from the input CT and from the
heatmap's token grid at one RAS S position, displayed in radiological convention (patient left on the right,
anterior at the top), so the picture is right whatever the input's orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ctvl.atomic import atomic_file
from ctvl.geometry import Volume

LUNG_WINDOW = (-1350.0, 150.0)
PLANE_SIZE = 320


@dataclass
class Panel:
    title: str
    z_mm: float
    query: str  # label or free text whose heatmap is overlaid


def axial_plane(encoding, z_mm: float, size: int = PLANE_SIZE) -> np.ndarray:
    """4x4 IJK->RAS of a ``size`` x ``size`` axial plane spanning the model grid's field of view at S=z_mm."""
    _d, h, w = encoding.model_shape
    fw, fh = w / size, h / size
    scale = np.diag([fw, fh, 1.0, 1.0])
    scale[:3, 3] = [(fw - 1.0) / 2.0, (fh - 1.0) / 2.0, 0.0]
    plane = encoding.model_ijk_to_ras @ scale
    plane[2, 3] = z_mm
    return plane


def _plane_images(encoding, panel: Panel, size: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    from ctvl.geometry import resample

    plane = axial_plane(encoding, panel.z_mm, size)
    ct = resample(encoding.volume, plane, (1, size, size), order=1, fill=-1024.0).array[0]
    heat_scores, heat_grid = encoding.heatmap_scores(panel.query)
    scores = heat_scores.cpu().numpy().astype(np.float32)
    tok = Volume(scores, heat_grid)
    heat = resample(tok, plane, (1, size, size), order=1, fill=float(scores.min())).array[0]
    return np.asarray(ct, np.float32), np.asarray(heat, np.float32), (float(scores.min()), float(scores.max()))


def best_z_for(encoding, label_or_text: str) -> float:
    """RAS S (mm) of the maximum of the heatmap the panel shows (`VolumeEncoding.heatmap`, model grid; the
    module's finding view jumps to the same peak), clamped to the input's slice range."""
    from ctvl.workflow import heatmap_peak

    z = float(heatmap_peak(encoding.heatmap(label_or_text, grid="model"))[1][2])
    zs = encoding.volume.slice_positions_mm()
    return float(np.clip(z, zs.min(), zs.max()))


def nearest_slice(encoding, z_mm: float) -> int:
    return int(np.argmin(np.abs(encoding.volume.slice_positions_mm() - z_mm)))


def write_overview(encoding, panels: list[Panel], path: str | Path, size: int = PLANE_SIZE,
                   suptitle: str = "") -> Path:
    """Render ``panels`` (2-4 columns) to a PNG at ``path`` (atomic write); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    n = max(1, len(panels))
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3.6 * cols, 3.9 * rows + (0.5 if suptitle else 0)), dpi=100)
    fig.patch.set_facecolor("black")
    for idx in range(rows * cols):
        ax = fig.add_subplot(rows, cols, idx + 1)
        ax.set_axis_off()
        if idx >= len(panels):
            continue
        panel = panels[idx]
        ct, heat, (lo, hi) = _plane_images(encoding, panel, size)
        ax.imshow(ct, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], interpolation="bilinear")
        norm_heat = (heat - lo) / max(hi - lo, 1e-6)
        ax.imshow(np.ma.masked_less(norm_heat, 0.5), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.45,
                  interpolation="bilinear")
        ax.set_title(panel.title, color="white", fontsize=9, wrap=True)
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
        ax.text(0.98, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=8, va="center", ha="right")
    if suptitle:
        fig.suptitle(suptitle, color="white", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as fh:
        fig.savefig(fh, format="png", facecolor=fig.get_facecolor())
    return path
