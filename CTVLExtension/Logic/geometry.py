"""`Volume`: a voxel array plus its exact IJK->RAS geometry, and helpers that keep geometry intact.

Conventions (used everywhere in `ctvl`, Slicer and SimpleITK agree with them):

- ``Volume.array`` is indexed ``[k, j, i]`` (numpy order, as ``SimpleITK.GetArrayFromImage`` and
  ``slicer.util.arrayFromVolume`` return it), so ``array.shape == (n_k, n_j, n_i)``.
- ``Volume.ijk_to_ras`` is a 4x4 float64 matrix mapping the column vector ``(i, j, k, 1)`` to RAS millimetres.
- "slice" means an index along the voxel axis whose direction is closest to superior-inferior, in the file's own
  voxel order (see ``Volume.slice_axis``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """A 3D scalar image (HU for CT) with its IJK->RAS matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be 4x4, got {self.ijk_to_ras.shape}")

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Voxel counts along (i, j, k)."""
        k, j, i = self.array.shape[:3]
        return int(i), int(j), int(k)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (i, j, k)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the i, j, k axes."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """RAS position (mm) of voxel (0, 0, 0)'s centre."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def slice_axis_ijk(self) -> int:
        """Which voxel axis (0=i, 1=j, 2=k) is closest to superior-inferior."""
        return int(np.argmax(np.abs(self.direction[2, :])))

    @property
    def slice_axis(self) -> int:
        """The numpy axis of ``array`` that indexes slices (2 - ``slice_axis_ijk``)."""
        return 2 - self.slice_axis_ijk

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[self.slice_axis])

    @property
    def slices_toward_superior(self) -> bool:
        """True when increasing slice index moves toward the head (+S)."""
        return bool(self.direction[2, self.slice_axis_ijk] > 0)

    def slice_positions_mm(self) -> np.ndarray:
        """RAS S coordinate (mm) of the centre of every slice, in slice-index order (at the volume's centre)."""
        n = self.n_slices
        axis = self.slice_axis_ijk
        centre = (np.array(self.shape_ijk, dtype=np.float64) - 1.0) / 2.0
        ijk = np.tile(np.append(centre, 1.0), (n, 1))
        ijk[:, axis] = np.arange(n)
        return (ijk @ self.ijk_to_ras.T)[:, 2]

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel (i, j, k) coordinates to RAS mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Map (N, 3) RAS mm points to continuous voxel (i, j, k) coordinates."""
        ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        inv = np.linalg.inv(self.ijk_to_ras)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def with_array(self, array: np.ndarray) -> Volume:
        """A new Volume with the same geometry and another array of the same shape."""
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(f"shape {array.shape} does not match {self.array.shape}")
        return Volume(array, self.ijk_to_ras.copy())
