"""CT-RATE-layout datasets (real CT-RATE and the phantom corpus): volumes, reports, labels, snippet pairs.

Layout: ``<split>/<patient>/<scan>/<VolumeName>.nii.gz``, ``radiology_text_reports/<split>_reports.csv``,
``multi_abnormality_labels/<split>_predicted_labels.csv``, ``metadata/<split>_metadata.csv``.

Preprocessing is ``ctvl.geometry.to_model_space`` (the one shared with inference) after the CT-RATE fixes
(`load_ctrate_volume`). Preprocessed volumes are cached as float16 ``.npy`` keyed by file path + size + mtime +
preprocessing hash, with a ``.json`` sidecar holding the geometry needed to map report images to model depth.
Items carry the float16 image and, when augmenting, per-volume parameters (`training.augment`) that the engine
applies on the training device.

Snippet pairs: report -> ``ctvl.snippets.mine_references`` -> image -> slice (file order) -> RAS z -> fractional
model depth index -> fractional depth bin. Verified annotations (``data.annotations``) override mined slices
(accepted/corrected) or drop pairs (rejected). Targets outside the model grid are dropped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ctvl.errors import CTVLInputError
from ctvl.prompts import LABELS, snippet_labels

from training.augment import IDENTITY, sample_params

LABEL_INDEX = {lab: i for i, lab in enumerate(LABELS)}

log = logging.getLogger(__name__)

CACHE_VERSION = 1
BLOB_VERSION = 1  # bump when ctvl.model.blobness changes its output


# ----------------------------------------------------------------------------------------------- layout / CSVs


def volume_path(root: Path, split: str, name: str) -> Path:
    """``train_12_a_1.nii.gz`` -> ``<root>/train/train_12/train_12_a/train_12_a_1.nii.gz``."""
    stem = name.split(".")[0]
    parts = stem.split("_")
    if len(parts) < 4:
        return Path(root) / split / name
    return Path(root) / split / "_".join(parts[:2]) / "_".join(parts[:3]) / name


def read_csv_by_name(path: Path) -> dict[str, dict[str, str]]:
    """Rows of a CT-RATE CSV keyed by VolumeName ({} if the file is missing)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["VolumeName"]: row for row in csv.DictReader(fh) if row.get("VolumeName")}


def _floats(value: Any) -> list[float]:
    """'[0.75, 0.75]' / '0.75' / 0.75 -> [0.75, 0.75] / [0.75]."""
    if value is None or value == "":
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    text = str(value).strip().strip("[]()")
    return [float(x) for x in text.replace(",", " ").split()]


# ------------------------------------------------------------------------------------------ volume reading


def nifti_scaling(path: Path) -> tuple[float, float] | None:
    """(scl_slope, scl_inter) from a NIfTI-1 header, or None when unset (slope 0/NaN) or not NIfTI-1."""
    import gzip
    import struct

    name = str(path).lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    try:
        with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as fh:
            head = fh.read(348)
    except OSError:
        return None
    if len(head) < 348:
        return None
    for order in "<>":
        if struct.unpack(order + "i", head[:4])[0] == 348:
            slope, inter = struct.unpack(order + "ff", head[112:120])
            if not np.isfinite(slope) or slope == 0:
                return None
            return float(slope), float(inter) if np.isfinite(inter) else 0.0
    return None


def load_ctrate_volume(path: Path, meta: dict[str, str] | None):
    """Read a CT-RATE volume in HU with the metadata fixes; returns a ``ctvl.geometry.Volume``.

    CT-RATE convention (see ``ctvl/phantom.py``): HU come from the header *or* from the metadata, never both.
    The fixed release (and the phantom) store int16 values with ``scl_slope``/``scl_inter`` in the header, which
    the reader applies; the first release had blank headers, so CT-CLIP computes
    ``HU = RescaleSlope * stored + RescaleIntercept`` from the metadata row. Rule here: the metadata rescale is
    applied only when the header has no scaling (unset or identity) and the values do not already look like HU
    (minimum >= -100, i.e. no air at -1000). Spacing: when the header spacing is the blank default (1, 1, 1) and
    the metadata has XYSpacing / ZSpacing, the metadata spacing is used (direction and volume centre kept).
    """
    from ctvl.geometry import Volume
    from ctvl.io import read_volume, validate_ct

    vol = read_volume(path, validate=False)
    arr = vol.array.astype(np.float32)
    meta = meta or {}
    slope = _floats(meta.get("RescaleSlope"))
    intercept = _floats(meta.get("RescaleIntercept"))
    header = nifti_scaling(path)
    header_rescales = header is not None and header != (1.0, 0.0)
    if (slope or intercept) and not header_rescales and float(arr.min()) >= -100.0:
        arr = arr * (slope[0] if slope else 1.0) + (intercept[0] if intercept else 0.0)
    affine = vol.ijk_to_ras.copy()
    xy, z = _floats(meta.get("XYSpacing")), _floats(meta.get("ZSpacing"))
    if xy and z and np.allclose(vol.spacing, 1.0):
        want = np.array([xy[0], xy[-1], z[0]], dtype=np.float64)
        centre_ijk = (np.array(vol.shape_ijk, dtype=np.float64) - 1) / 2
        centre = vol.ijk_to_ras_points(centre_ijk)[0]
        affine[:3, :3] = vol.direction * want
        affine[:3, 3] = centre - affine[:3, :3] @ centre_ijk
    out = Volume(arr, affine)
    validate_ct(out, path)
    return out


# ---------------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """The model grid: spacing (sd, sh, sw) mm, shape (D, H, W), HU window; blobness scales (mm) of extra channels.

    The image cache depends on the grid and window only (`key`); blobness channels live in a sidecar file per
    scale set (`blob_key`), computed from the cached image, so switching them on reuses the image cache.
    """

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    hu_window: tuple[float, float]
    blob_scales_mm: tuple[float, ...] = ()
    antialias: bool = False  # the Gaussian prefilter of to_model_space (ModelConfig.input_antialias)

    @classmethod
    def from_model_config(cls, mc: Any) -> Preprocess:
        get = mc.get if isinstance(mc, dict) else lambda k, d=None: getattr(mc, k, d)
        return cls(
            tuple(float(x) for x in get("spacing")),
            tuple(int(x) for x in get("input_shape")),
            tuple(float(x) for x in get("hu_window")),
            tuple(float(x) for x in get("input_blob_scales_mm", ()) or ()),
            bool(get("input_antialias", False)),
        )

    def key(self) -> str:
        fields = [CACHE_VERSION, self.spacing, self.shape, self.hu_window] + (["antialias"] if self.antialias else [])
        text = json.dumps(fields)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def blob_key(self) -> str:
        text = json.dumps([BLOB_VERSION, self.spacing, self.blob_scales_mm])
        return hashlib.sha1(text.encode()).hexdigest()[:8]


def blob_channels(arr: np.ndarray, pre: Preprocess) -> np.ndarray:
    """float16 [S,D,H,W]: `ctvl.model.blobness.HessianBlobness` of the cached image [D,H,W] at each scale."""
    from ctvl.model.blobness import HessianBlobness

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32))[None, None]
        out = HessianBlobness(pre.blob_scales_mm, pre.spacing)(x)[0]
    return out.numpy().astype(np.float16)


def _blob_path(cache_dir: Path, key: str, pre: Preprocess) -> Path:
    return cache_dir / f"{key}.blob-{pre.blob_key()}.npy"


def _ensure_blobs(cache_dir: Path, key: str, arr: np.ndarray, pre: Preprocess) -> np.ndarray:
    """The blobness sidecar of one cached image: read, or computed and written (atomic) when missing or damaged."""
    from training.utils import atomic_write_bytes

    path = _blob_path(cache_dir, key, pre)
    if path.is_file():
        try:
            blobs = np.load(path)
            if tuple(blobs.shape) == (len(pre.blob_scales_mm), *pre.shape):
                return blobs
        except (OSError, ValueError) as exc:  # damaged or truncated: recompute
            log.warning("recomputing blobness sidecar %s: %s", path.name, exc)
    blobs = blob_channels(arr, pre)
    buf = io.BytesIO()
    np.save(buf, blobs)
    atomic_write_bytes(path, buf.getvalue())
    return blobs


def cache_key(path: Path, pre: Preprocess) -> str:
    st = os.stat(path)
    text = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{pre.key()}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def preprocess_volume(path: Path, meta: dict | None, pre: Preprocess) -> tuple[np.ndarray, dict]:
    """Read + CT-RATE fixes + ``to_model_space``: (float16 [D,H,W] in [0,1], geometry sidecar dict)."""
    from ctvl.geometry import to_model_space

    vol = load_ctrate_volume(path, meta)
    arr, model_affine = to_model_space(vol, pre.spacing, pre.shape, hu_window=pre.hu_window,
                                       antialias_input=pre.antialias)
    info = {
        "model_ijk_to_ras": np.asarray(model_affine, dtype=np.float64).tolist(),
        "n_slices": vol.n_slices,
        "slices_toward_superior": vol.slices_toward_superior,
        "slice_positions_mm": vol.slice_positions_mm().tolist(),
        "input_spacing": vol.spacing.tolist(),
        "input_shape_ijk": list(vol.shape_ijk),
    }
    return np.asarray(arr, dtype=np.float16), info


def _save_cache(cache_dir: Path, key: str, arr: np.ndarray, info: dict) -> None:
    from training.utils import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(cache_dir / f"{key}.npy", buf.getvalue())
    atomic_write_bytes(cache_dir / f"{key}.json", json.dumps(info).encode())


def _cache_one(args: tuple) -> tuple[str, str | None]:
    """Worker: make sure one volume is cached. Returns (name, error message or None)."""
    name, path, meta, pre, cache_dir = args
    try:
        key = cache_key(path, pre)
        if (cache_dir / f"{key}.json").is_file() and (cache_dir / f"{key}.npy").is_file():
            if pre.blob_scales_mm and not _blob_path(cache_dir, key, pre).is_file():
                _ensure_blobs(cache_dir, key, np.load(cache_dir / f"{key}.npy"), pre)
            return name, None
        arr, info = preprocess_volume(path, meta, pre)
        _save_cache(cache_dir, key, arr, info)
        if pre.blob_scales_mm:
            _ensure_blobs(cache_dir, key, arr, pre)
        return name, None
    except Exception as exc:  # noqa: BLE001 - any unreadable volume is skipped, never fatal
        return name, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------- dataset


@dataclass
class Record:
    name: str
    path: Path
    text: str
    labels: np.ndarray  # float32 [18], NaN where the CSV lacks the label
    meta: dict
    references: list = field(default_factory=list)  # mined ImageReference objects
    snippets: list = field(default_factory=list)  # [(snippet text, model depth, fractional bin, input slice)]
    bin_valid: np.ndarray | None = None  # bool [n_bins]: depth bins that overlap the scan (not padding)
    guide: list | None = None  # [(label index, fractional bin)] per label each snippet names (built on first use)


class CTRateDataset(torch.utils.data.Dataset):
    """One split of a CT-RATE-layout dataset.

    ``prepare()`` builds the cache (parallel, tqdm) and the snippet targets; ``__getitem__`` returns a dict or
    ``None`` for a volume that cannot be read (the collate function drops it).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        pre: Preprocess,
        *,
        cache_dir: str | Path | None = None,
        bin_depth: int = 1,
        augment: Any = None,
        seed: int = 0,
        max_volumes: int | None = None,
        annotations: str | Path | None = None,
        image_convention: str = "superior_first",
        max_snippets: int = 4,
        report_fields: tuple[str, ...] = ("Findings_EN", "Impressions_EN"),
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.pre = pre
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".ctvl_cache"
        self.bin_depth = int(bin_depth)
        self.augment_cfg = augment
        self.seed = int(seed)
        self.epoch = 0
        self.annotations = annotations
        self.image_convention = image_convention
        self.max_snippets = int(max_snippets)
        self.bad: set[str] = set()
        self.snippet_stats: dict[str, int] = {}
        self.records = self._read_tables(report_fields, max_volumes)

    # -- tables
    def _read_tables(self, fields: tuple[str, ...], max_volumes: int | None) -> list[Record]:
        reports_csv = self.root / "radiology_text_reports" / f"{self.split}_reports.csv"
        reports = read_csv_by_name(reports_csv)
        if not reports:
            raise CTVLInputError(reports_csv, "no reports found", "Point --data at a CT-RATE-layout folder")
        labels = read_csv_by_name(self.root / "multi_abnormality_labels" / f"{self.split}_predicted_labels.csv")
        metadata = read_csv_by_name(self.root / "metadata" / f"{self.split}_metadata.csv")
        records = []
        for name in sorted(reports, key=_natural_key):
            row = reports[name]
            text = " ".join((row.get(f) or "").strip() for f in fields).strip()
            lab = labels.get(name, {})
            y = np.array([float(lab[c]) if lab.get(c, "") != "" else np.nan for c in LABELS], dtype=np.float32)
            records.append(Record(name, volume_path(self.root, self.split, name), text, y, metadata.get(name, {})))
        if max_volumes:
            records = records[: int(max_volumes)]
        return records

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- cache + snippet targets
    def prepare(self, workers: int = 1, progress: bool = True) -> None:
        """Cache every volume (once; parallel) and compute snippet targets. Unreadable volumes are skipped."""
        from tqdm.auto import tqdm

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        for r in self.records:
            if not r.path.is_file():
                self._mark_bad(r.name, f"missing file {r.path}")
                continue
            jobs.append((r.name, r.path, r.meta, self.pre, self.cache_dir))
        desc = f"cache {self.split}"
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                results = list(tqdm(pool.map(_cache_one, jobs), total=len(jobs), desc=desc, disable=not progress))
        else:
            results = [_cache_one(j) for j in tqdm(jobs, desc=desc, disable=not progress)]
        for name, err in results:
            if err:
                self._mark_bad(name, err)
        self._build_snippets()

    def _mark_bad(self, name: str, why: str) -> None:
        if name not in self.bad:
            log.warning("skipping volume %s: %s", name, why)
        self.bad.add(name)

    def _info(self, r: Record) -> dict | None:
        try:
            key = cache_key(r.path, self.pre)
            return json.loads((self.cache_dir / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def _build_snippets(self) -> None:
        from ctvl.snippets import image_to_slice, mine_references

        stats = {"mined": 0, "unmappable": 0, "rejected": 0, "outside_grid": 0, "kept": 0, "verified": 0}
        candidates: list[dict] = []
        infos: dict[str, dict] = {}
        for r in self.records:
            if r.name in self.bad:
                continue
            info = self._info(r)
            if info is None:
                continue
            infos[r.name] = info
            r.bin_valid = self.valid_bins(info)
            r.guide = None  # rebuilt from the pairs below on first use
            for ref in mine_references(r.text):
                stats["mined"] += 1
                try:
                    mined = image_to_slice(
                        ref.image, info["n_slices"], info["slices_toward_superior"], convention=self.image_convention
                    )
                except CTVLInputError:
                    stats["unmappable"] += 1
                    continue
                candidates.append(
                    {"volume": r.name, "report_id": r.name, "snippet": ref.snippet, "series": ref.series,
                     "image": ref.image, "mined_slice": int(mined)}
                )
        if self.annotations:
            from ctvl.annotations import apply_verified, pair_key

            keys = {pair_key(c) for c in candidates}
            pairs = apply_verified(candidates, self.annotations)
            stats["verified"] = sum(1 for p in pairs if p.get("status") in ("accepted", "corrected"))
            stats["rejected"] = len(keys) - len({pair_key(p) for p in pairs} & keys)
        else:
            pairs = [{**c, "slice": c["mined_slice"]} for c in candidates]
        by_name = {r.name: r for r in self.records}
        for p in pairs:
            r, info = by_name.get(p["volume"]), infos.get(p["volume"])
            if r is None or info is None:
                continue
            depth = self.slice_to_depth(info, int(p["slice"]))
            if depth is None:
                stats["outside_grid"] += 1
                continue
            r.snippets.append((p["snippet"], depth, self.depth_to_bin(depth), int(p["slice"])))
            stats["kept"] += 1
        self.snippet_stats = stats
        log.info("snippet pairs (%s): %s", self.split, stats)

    def slice_to_depth(self, info: dict, slice_index: int) -> float | None:
        """Input slice -> fractional model depth index (None when outside the model grid or the volume)."""
        positions = info["slice_positions_mm"]
        if not 0 <= slice_index < len(positions):
            return None
        z = positions[slice_index]
        affine = np.asarray(info["model_ijk_to_ras"], dtype=np.float64)
        depth = float((z - affine[2, 3]) / affine[2, 2])  # model grid: d (= k) along S, in-plane axes perpendicular
        if depth < -0.5 or depth > self.pre.shape[0] - 0.5:
            return None
        return depth

    def valid_bins(self, info: dict) -> np.ndarray:
        """Depth bins with at least one model slice inside the scan's slab (the rest is padding)."""
        pos = np.asarray(info["slice_positions_mm"], dtype=np.float64)
        half = abs(pos[1] - pos[0]) / 2 if len(pos) > 1 else 0.5
        lo, hi = pos.min() - half, pos.max() + half
        a = np.asarray(info["model_ijk_to_ras"], dtype=np.float64)
        z = a[2, 3] + a[2, 2] * np.arange(self.pre.shape[0])
        inside = (z >= lo) & (z <= hi)
        n_bins = self.pre.shape[0] // self.bin_depth
        return inside[: n_bins * self.bin_depth].reshape(n_bins, self.bin_depth).any(1)

    def depth_to_bin(self, depth: float) -> float:
        """Fractional bin: bin b covers model slices [b*pd, (b+1)*pd), its centre is at b*pd + (pd-1)/2."""
        return (depth + 0.5) / self.bin_depth - 0.5

    # -- items
    def load_array(self, index: int) -> np.ndarray | None:
        r = self.records[index]
        if r.name in self.bad:
            return None
        try:
            key = cache_key(r.path, self.pre)
            path = self.cache_dir / f"{key}.npy"
            if not path.is_file():
                arr, info = preprocess_volume(r.path, r.meta, self.pre)
                _save_cache(self.cache_dir, key, arr, info)
            else:
                arr = np.load(path)
            if tuple(arr.shape) != tuple(self.pre.shape):
                raise ValueError(f"cached shape {arr.shape} != {self.pre.shape}")
            if self.pre.blob_scales_mm:  # [1+S,D,H,W]: image and its blobness channels
                return np.concatenate([arr[None], _ensure_blobs(self.cache_dir, key, arr, self.pre)])
            return arr
        except Exception as exc:  # noqa: BLE001 - skip, never crash mid-epoch
            self._mark_bad(r.name, f"{type(exc).__name__}: {exc}")
            return None

    @staticmethod
    def _guide(r: Record) -> list:
        """Every pair of the record (not only the sampled ones) as (label index, fractional bin), once per label its
        snippet names: report-guided MIL's citations (training.losses.guided_token_mask). Cached on the record."""
        if r.guide is None:
            r.guide = [(LABEL_INDEX[lab], s[2]) for s in r.snippets for lab in snippet_labels(s[0])]
        return r.guide

    def __getitem__(self, index: int) -> dict | None:
        arr = self.load_array(index)
        if arr is None:
            return None
        r = self.records[index]
        image = torch.from_numpy(np.asarray(arr, dtype=np.float16))  # float16: half the IPC bytes
        if image.ndim == 3:
            image = image[None]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        aug = IDENTITY
        if self.augment_cfg is not None and self.augment_cfg.enabled:
            aug = sample_params(self.augment_cfg, rng)  # applied on the device (training.augment.apply)
        snippets = list(r.snippets)
        if len(snippets) > self.max_snippets:
            keep = rng.choice(len(snippets), self.max_snippets, replace=False)
            snippets = [snippets[i] for i in sorted(keep)]
        return {
            "image": image,
            "augment": torch.from_numpy(aug.copy()),
            "text": r.text,
            "labels": torch.from_numpy(r.labels.copy()),
            "snippets": [s[0] for s in snippets],
            "snippet_bins": [s[2] for s in snippets],
            "snippet_depths": [s[1] for s in snippets],
            "guide": self._guide(r),
            "bin_valid": torch.from_numpy(r.bin_valid if r.bin_valid is not None
                                          else np.ones(self.pre.shape[0] // self.bin_depth, dtype=bool)),
            "name": r.name,
            "index": index,
        }


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in name.split(".")[0].replace("-", "_").split("_")]


def collate(items: list[dict | None]) -> dict | None:
    """Stack a batch, dropping ``None`` (unreadable volumes); ``None`` if nothing is left."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    snippets, bins, owner, guide = [], [], [], []
    for b, it in enumerate(items):
        guide += [(b, lab, pos) for lab, pos in it.get("guide", [])]
        snippets += it["snippets"]
        bins += it["snippet_bins"]
        owner += [b] * len(it["snippets"])
    return {
        "image": torch.stack([it["image"] for it in items]),
        "augment": torch.stack([it["augment"] for it in items]),
        "text": [it["text"] for it in items],
        "labels": torch.stack([it["labels"] for it in items]),
        "bin_valid": torch.stack([it["bin_valid"] for it in items]),
        "snippets": snippets,
        "snippet_bins": torch.tensor(bins, dtype=torch.float32),
        "snippet_owner": torch.tensor(owner, dtype=torch.long),
        "guide": torch.tensor(guide, dtype=torch.float32).reshape(-1, 3),  # rows (volume, label, fractional bin)
        "names": [it["name"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def ensure_phantom_dataset(data_cfg: Any) -> None:
    """Generate the phantom corpus with ``ctvl.phantom.write_dataset`` if ``data.generate`` asks and it is missing."""
    gen = data_cfg.generate
    if not gen.enabled:
        return
    from ctvl.phantom import write_dataset

    root = Path(data_cfg.root)
    for split, spec in gen.splits.items():
        if (root / "radiology_text_reports" / f"{split}_reports.csv").is_file():
            continue
        log.info("generating phantom %s split: %d volumes, seed %d -> %s", split, spec["n"], spec["seed"], root)
        kwargs = {"split": split, "workers": gen.workers, "progress": True}
        if gen.shape:
            import inspect

            if "shape" not in inspect.signature(write_dataset).parameters:
                raise CTVLInputError("data.generate.shape", "ctvl.phantom.write_dataset takes no shape",
                                     "Remove data.generate.shape")
            kwargs["shape"] = tuple(gen.shape)
        write_dataset(root, int(spec["n"]), int(spec["seed"]), **kwargs)
