"""What the Slicer module computes, without Qt or MRML: model/encoding caches, the analysis job, find-in-scan.

The module's logic runs ``analyze`` in a ``ctvl.jobs.BackgroundJob`` (worker thread) and hands the returned
``AnalysisResults`` to ``ctvl.scene.apply_results`` on the main thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from ctvl.errors import CTVLInputError
from ctvl.geometry import Volume
from ctvl.runtime import scaled_progress

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelledFn = Callable[[], bool]


@dataclass
class AnalysisResults:
    """Everything one analysis writes: probabilities, heatmaps on the input grid, optional query scores."""

    probabilities: Mapping[str, float] = field(default_factory=dict)
    heatmaps: Mapping[str, Volume] = field(default_factory=dict)
    shown_heatmap: Optional[str] = None
    query: Optional[str] = None
    slice_scores: Optional[Sequence[float]] = None
    slice_positions: Optional[Sequence[float]] = None
    hits: Sequence[Any] = ()
    peak_ras: Optional[np.ndarray] = None


@dataclass
class FindResult:
    """Find-in-scan answer: ranked hits (slice, position_mm, score), the score curve, and where to centre."""

    text: str
    hits: list
    scores: np.ndarray
    positions: np.ndarray
    peak_ras: np.ndarray

    @property
    def best(self) -> Any:
        return self.hits[0]


class ModelCache:
    """Loaded models keyed by ``(name_or_path, device)``; loading is serialised by a lock."""

    def __init__(self, loader: Callable[[str, str], Any] | None = None) -> None:
        self._loader = loader
        self._models: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, name_or_path: str, device: str = "auto") -> Any:
        key = (str(name_or_path), str(device))
        with self._lock:
            if key not in self._models:
                loader = self._loader
                if loader is None:
                    from ctvl.inference import load_model as loader
                self._models.clear()  # one model in memory at a time
                self._models[key] = loader(str(name_or_path), str(device))
            return self._models[key]


class EncodingCache:
    """LRU of VolumeEncodings with a visible key: (node id, image MTime, dims, model, device)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(node_id: str, mtime: int, dims: Sequence[int], model: str, device: str,
            ijk_to_ras: Sequence[float] = ()) -> tuple:
        """Voxels (image MTime + dims) and geometry identify the input; model and device the encoder."""
        geometry = tuple(round(float(v), 6) for v in np.asarray(ijk_to_ras, dtype=np.float64).reshape(-1))
        return (node_id, int(mtime), tuple(int(d) for d in dims), geometry, str(model), str(device))

    def keys(self) -> list:
        with self._lock:
            return list(self._items)

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: Hashable, encoding: Any) -> None:
        with self._lock:
            self._items[key] = encoding
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def check_query(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise CTVLInputError(None, "The search text is empty", "Type a finding, e.g. 'nodule in the right lung'")
    return text.strip()


def peak_near_position(heatmap: Volume, position_mm: float) -> np.ndarray:
    """RAS of the heatmap's maximum within its slice closest to RAS S ``position_mm``."""
    slice_index = int(np.argmin(np.abs(heatmap.slice_positions_mm() - position_mm)))
    plane = np.take(heatmap.array, slice_index, axis=heatmap.slice_axis)
    a, b = np.unravel_index(int(np.nanargmax(plane)), plane.shape)
    kji = [int(a), int(b)]
    kji.insert(heatmap.slice_axis, slice_index)
    return heatmap.ijk_to_ras_points(np.array(kji[::-1], dtype=np.float64))[0]


def heatmap_peak(heatmap: Volume) -> tuple[int, np.ndarray]:
    """``(slice_index, ras)`` of the heatmap's maximum voxel (slice along the volume's slice axis)."""
    kji = np.unravel_index(int(np.nanargmax(heatmap.array)), heatmap.array.shape[:3])
    ras = heatmap.ijk_to_ras_points(np.array(kji[::-1], dtype=np.float64))[0]
    return int(kji[heatmap.slice_axis]), ras


def find_in_scan(encoding: Any, text: str, top_k: int = 5) -> FindResult:
    """Top-k slices for ``text``, the per-slice score curve, and the heatmap peak near the best slice (fast:
    the heatmap is taken on the model grid, the peak is then projected onto the best input slice by the scene)."""
    text = check_query(text)
    hits = list(encoding.locate(text, top_k=top_k))
    if not hits:
        raise CTVLInputError(None, f"No slice matched '{text}'", "try other words")
    scores = np.asarray(encoding.slice_scores(text), dtype=np.float64)
    positions = np.asarray(encoding.volume.slice_positions_mm(), dtype=np.float64)
    heatmap = encoding.heatmap(text, grid="model")
    peak = peak_near_position(heatmap, float(hits[0].position_mm))
    return FindResult(text, hits, scores, positions, peak)


def analyze(volume: Volume, get_model: Callable[[], Any], progress: ProgressFn | None = None,
            cancelled: CancelledFn | None = None, encoding: Any = None, heatmap_labels: int = 1,
            query: str | None = None, encode_fn: Callable[..., Any] | None = None) -> tuple[Any, AnalysisResults]:
    """Worker-thread part of 'Analyze': load model, encode once (unless ``encoding`` is given), probabilities,
    heatmaps on the input grid for the ``heatmap_labels`` most probable findings, optional query scores."""
    report = progress or (lambda fraction, message: None)
    if encoding is None:
        report(0.0, "loading model")
        model = get_model()
        if cancelled is not None and cancelled():
            from ctvl.errors import CTVLCancelled

            raise CTVLCancelled("analysis cancelled")
        if encode_fn is None:
            from ctvl.inference import encode as encode_fn
        encoding = encode_fn(volume, model, progress=scaled_progress(progress, 0.1, 0.8), cancel=cancelled)
    report(0.8, "disease probabilities")
    probabilities = dict(encoding.disease_probabilities())
    ranked = sorted(probabilities, key=lambda label: -probabilities[label])
    heatmaps: dict[str, Volume] = {}
    if heatmap_labels > 0 and hasattr(encoding, "prepare_heatmaps"):  # label heatmaps' encoder passes, every label
        encoding.prepare_heatmaps(progress=scaled_progress(progress, 0.82, 0.85), cancel=cancelled,
                                  labels=ranked)  # (guided ones too), so that showing another one later is instant
    for n, label in enumerate(ranked[: max(0, heatmap_labels)]):
        report(0.85 + 0.1 * n / max(1, heatmap_labels), f"heatmap: {label}")
        heatmaps[label] = encoding.heatmap(label, grid="input")
    results = AnalysisResults(probabilities, heatmaps, shown_heatmap=ranked[0] if heatmaps else None)
    if query:
        report(0.95, "find in scan")
        found = find_in_scan(encoding, query)
        results.query, results.slice_scores, results.slice_positions = found.text, found.scores, found.positions
        results.hits, results.peak_ras = found.hits, found.peak_ras
    report(1.0, "done")
    return encoding, results
