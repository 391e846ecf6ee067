"""CTVL: 3D chest-CT vision-language models for 3D Slicer and the command line."""

from ctvl.errors import CTVLCancelled, CTVLDependencyError, CTVLError, CTVLInputError, CTVLWeightsError

__version__ = "0.1.0"

__all__ = [
    "CTVLCancelled",
    "CTVLDependencyError",
    "CTVLError",
    "CTVLInputError",
    "CTVLWeightsError",
    "__version__",
]
