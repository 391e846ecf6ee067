"""Inference: encode a CT once, then ask many cheap questions (diseases, heatmaps, text -> slice).

    model = load_model("demo")                      # or an exported weights directory
    enc = encode(read_volume("ct.nii.gz"), model, progress=cb, cancel=event)
    enc.disease_probabilities()                     # {"Lung nodule": 0.91, ...}
    enc.heatmap("Lung nodule", grid="input")        # Volume with the input's exact geometry
    enc.locate("nodule in the right upper lobe")    # [SliceHit(slice, position_mm, score), ...]

Geometry: the volume is resampled with ``ctvl.geometry.to_model_space`` (the one preprocessing shared with
training) onto an axis-aligned LPS grid (d toward S). Volumes longer than the model input are covered by a taller
grid that is encoded in overlapping windows along d; tokens and depth bins are blended with hat weights.
Token ``t`` of a patch of size ``p`` sits at model voxel ``t * p + (p - 1) / 2``, which is what both the
model-grid upsampling (trilinear, ``align_corners=False``) and the token-grid geometry below encode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ctvl.errors import CTVLInputError, CTVLWeightsError
from ctvl.geometry import Volume
from ctvl.runtime import (
    CancelHooks,
    CancelLike,
    ProgressFn,
    Steps,
    TextCache,
    autocast,
    cancel_fn,
    model_device,
    model_lock,
    model_state,
    resolve_device,
    scaled_progress,
)
from ctvl.tokengrid import hat_weights, plan_windows, separable_resample, z_extent_voxels

__all__ = [
    "CancelLike", "ProgressFn", "SliceHit", "TextCache", "VolumeEncoding", "cancel_fn", "check_text", "encode",
    "load_model", "model_device", "model_input_spec", "plan_windows", "resolve_device", "separable_resample",
]

log = logging.getLogger(__name__)

BIN_SCORE_CACHE = 256  # depth-bin scores kept per scan, one [d] row per text (locate: a repeated query is free)


@dataclass(frozen=True)
class SliceHit:
    """One ranked input slice: ``slice`` in the file's voxel order, ``position_mm`` its RAS S, ``score``."""

    slice: int
    position_mm: float
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"slice": self.slice, "position_mm": round(self.position_mm, 3), "score": round(self.score, 6)}


# --------------------------------------------------------------------------------------------------- model


def load_model(name_or_path: str | Path = "demo", device: str = "auto") -> torch.nn.Module:
    """Load the embedded demo model (``"demo"``) or an exported weights directory, in eval mode on ``device``."""
    torch_device = resolve_device(device)
    try:
        from ctvl.model import load_weights
    except ImportError as exc:  # pragma: no cover - only while the model package is incomplete
        raise CTVLWeightsError(str(name_or_path), f"the model code is not available ({exc})",
                               "reinstall ctvl") from exc
    model = load_weights(str(name_or_path), device=str(torch_device))
    if not hasattr(model, "config") or not hasattr(model, "encode_image"):
        raise CTVLWeightsError(str(name_or_path), "did not load as a CTVL model", "export it with training")
    model.eval()
    return model.to(torch_device)


# --------------------------------------------------------------------------------------------------- config


def _cfg(model: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(model.config, name, None)
        if value is not None:
            return value
    return default


def model_input_spec(model: Any) -> tuple[tuple[float, float, float], tuple[int, int, int], tuple[float, float]]:
    """``(spacing_dhw mm, input_shape_dhw, hu_window)`` from the model's config."""
    spacing = tuple(float(s) for s in _cfg(model, "spacing"))
    shape = tuple(int(s) for s in _cfg(model, "input_shape"))
    window = tuple(float(s) for s in _cfg(model, "hu_window", default=(-1000.0, 1000.0)))
    return spacing, shape, window  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------- encode


def encode(volume: Volume, model: torch.nn.Module, progress: ProgressFn | None = None,
           cancel: CancelLike = None) -> VolumeEncoding:
    """Preprocess ``volume`` into model space and run the image encoder once (in windows along S if long)."""
    from ctvl.geometry import to_model_space

    array = getattr(volume, "array", None)
    if array is None or np.ndim(array) != 3 or min(np.shape(array)) < 2:
        raise CTVLInputError("volume", f"need a 3D scalar volume, got shape {np.shape(array)}",
                             "load a CT series (not a single slice, a 4D or an RGB image)")
    steps = Steps(progress, cancel)
    timing: dict[str, float] = {}
    spacing, (depth, height, width), window = model_input_spec(model)
    t0 = time.perf_counter()
    steps.report(0.0, "preprocessing")
    patch_d = _patch_size(model)[0]
    total_d, starts = plan_windows(z_extent_voxels(volume, spacing[0]), depth, patch_d)
    array, grid = to_model_space(volume, spacing, (total_d, height, width), hu_window=window,
                                 antialias_input=bool(_cfg(model, "input_antialias", default=False)))
    array = np.ascontiguousarray(array, dtype=np.float32)
    timing["preprocess"] = time.perf_counter() - t0
    steps.report(0.1, f"encoding {len(starts)} window(s)")

    device = model_device(model)
    t1 = time.perf_counter()
    tokens_acc = bins_acc = pooled_acc = local_acc = evidence_acc = None
    weight_tok = None
    patch: tuple[int, int, int] | None = None
    with model_lock(model), torch.no_grad(), CancelHooks(model, steps), autocast(device):
        for n, start in enumerate(starts):
            steps.check()
            x = torch.from_numpy(array[start:start + depth]).to(device)[None, None]
            out = model.encode_image(x)
            tokens = out.tokens[0].float()  # [d, h, w, E]
            bins = out.bins[0].float()  # [d, E]
            pooled = out.pooled[0].float()
            local = getattr(out, "local", None)  # label-heatmap tokens (config.mil_local)
            local = local[0].float() if local is not None else None
            evidence = getattr(out, "evidence", None)  # blobness evidence per label token (config.blob_readout)
            evidence = evidence[0].float() if evidence is not None else None
            if patch is None:
                d_tok, h_tok, w_tok = tokens.shape[:3]
                patch = (depth // d_tok, height // h_tok, width // w_tok)
                n_tok = total_d // patch[0]
                tokens_acc = torch.zeros((n_tok, h_tok, w_tok, tokens.shape[-1]), device=device)
                bins_acc = torch.zeros((n_tok, bins.shape[-1]), device=device)
                pooled_acc = torch.zeros_like(pooled)
                weight_tok = torch.zeros(n_tok, device=device)
                if local is not None:
                    local_acc = torch.zeros_like(tokens_acc)
                if evidence is not None:
                    evidence_acc = torch.zeros((n_tok, h_tok, w_tok, evidence.shape[-1]), device=device)
            hat = torch.from_numpy(hat_weights(tokens.shape[0])).to(device) if len(starts) > 1 else \
                torch.ones(tokens.shape[0], device=device)
            sl = slice(start // patch[0], start // patch[0] + tokens.shape[0])
            tokens_acc[sl] += tokens * hat[:, None, None, None]
            if local_acc is not None:
                local_acc[sl] += local * hat[:, None, None, None]
            if evidence_acc is not None:
                evidence_acc[sl] += evidence * hat[:, None, None, None]
            bins_acc[sl] += bins * hat[:, None]
            weight_tok[sl] += hat
            pooled_acc += pooled
            steps.report(0.1 + 0.85 * (n + 1) / len(starts), f"encoded window {n + 1}/{len(starts)}")
    tokens_acc /= weight_tok[:, None, None, None]
    if local_acc is not None:
        local_acc /= weight_tok[:, None, None, None]
    if evidence_acc is not None:
        evidence_acc /= weight_tok[:, None, None, None]
    bins_acc = torch.nn.functional.normalize(bins_acc / weight_tok[:, None], dim=-1)
    pooled_acc = torch.nn.functional.normalize(pooled_acc / len(starts), dim=-1)
    timing["encode"] = time.perf_counter() - t1
    steps.report(1.0, "encoded")
    return VolumeEncoding(volume=volume, model=model, tokens=tokens_acc, bins=bins_acc, pooled=pooled_acc,
                          model_ijk_to_ras=grid, model_shape=(total_d, height, width), patch=patch,
                          timing=timing, label_tokens=local_acc, evidence=evidence_acc, model_input=array,
                          window_starts=tuple(starts))


def _patch_size(model: Any) -> tuple[int, int, int]:
    """Model voxels per token (d, h, w): ``config.downsample()`` (ctvl.model), else a patch-size field."""
    downsample = getattr(model.config, "downsample", None)
    if callable(downsample):
        return tuple(int(v) for v in downsample())  # type: ignore[return-value]
    for name in ("patch_size", "patch"):
        value = getattr(model.config, name, None)
        if value is not None:
            return (int(value),) * 3 if np.isscalar(value) else tuple(int(v) for v in value)  # type: ignore
    return (1, 1, 1)


# --------------------------------------------------------------------------------------------------- encoding


def check_text(text: Any, source: str = "query") -> str:
    """Reject empty / whitespace / non-string queries with CTVLInputError."""
    if not isinstance(text, str) or not text.strip():
        raise CTVLInputError(source, f"empty query {text!r}", "give a non-empty text, e.g. 'nodule in the right lung'")
    return text.strip()


@dataclass
class VolumeEncoding:
    """The encoder's output for one volume, plus geometry to send every answer back to the input grid."""

    volume: Volume
    model: Any
    tokens: torch.Tensor  # [d, h, w, E] on the model's device
    bins: torch.Tensor  # [d, E]
    pooled: torch.Tensor  # [E]
    model_ijk_to_ras: np.ndarray  # 4x4 of the (possibly taller than input) model grid
    model_shape: tuple[int, int, int]  # (D, H, W)
    patch: tuple[int, int, int]  # (pd, ph, pw) model voxels per token
    timing: dict[str, float] = field(default_factory=dict)
    # [d, h, w, E] tokens of the label heatmaps and the MIL logit when the model has its own (config.mil_local)
    label_tokens: torch.Tensor | None = None
    # [d, h, w, S] blobness evidence of the label tokens when the model weighs it (config.blob_readout)
    evidence: torch.Tensor | None = None
    # the windowed model-space input [D, H, W] and the windows' first slices: the stitched label heatmaps
    # (config.heatmap_subdivision) run the encoder again on it, once, when a label heatmap is first asked for
    model_input: np.ndarray | None = None
    window_starts: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        state = model_state(self.model)
        self._lock = state["lock"]
        self.text_cache: TextCache = state["text_cache"]
        self._slice_z = self.volume.slice_positions_mm()
        # (label, side or None) -> [d] heatmap peak per depth bin (locate)
        self._label_depth: dict[tuple[str, str | None], torch.Tensor] = {}
        self._bin_scores: dict[str, np.ndarray] = {}  # text -> [d] depth-bin scores (bin_scores)
        self._sides: dict[str, torch.Tensor] = {}  # 'right' / 'left' -> [w] token columns (locate_laterality)
        self._stitched: torch.Tensor | None = None  # [L, d*n_d, h*n_h, w*n_w] label heatmaps (heatmap_subdivision)
        self._guided: dict[str, torch.Tensor] = {}  # label -> [D, H, W] guided heatmap (heatmap_guidance)

    # ------------------------------------------------------------------ text
    def labels(self) -> list[str]:
        from ctvl.prompts import LABELS

        return list(getattr(self.model.config, "labels", None) or LABELS)

    def _prompts(self, label: str) -> tuple[list[str], list[str]]:
        prompts = getattr(self.model, "prompts", None)
        if isinstance(prompts, dict) and label in prompts:
            entry = prompts[label]
            if isinstance(entry, dict):
                return list(entry["positive"]), list(entry["negative"])
            return list(entry[0]), list(entry[1])
        from ctvl.prompts import disease_prompts

        return disease_prompts(label)

    def text_embedding(self, label_or_text: str) -> torch.Tensor:
        """Embedding for a free text, or the mean positive-prompt embedding for a known label."""
        text = check_text(label_or_text)
        if text in self.labels():
            return self.prompt_embeddings([text])[0][0]
        return self.text_cache.get(text)

    # ------------------------------------------------------------------ diseases
    def prompt_embeddings(self, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per label, the renormalised mean of its positive / negative prompt embeddings -> ([L,E], [L,E]).

        All prompts go through the text LRU in one batch, so the first call costs one text-encoder pass.
        """
        from ctvl.model.joint import group_means

        groups = [g for lbl in labels for g in self._prompts(lbl)]
        emb = self.text_cache.get_many([t for g in groups for t in g])
        stacked = group_means(emb, [len(g) for g in groups]).reshape(len(labels), 2, -1)
        if hasattr(self.model, "adapt_prompt_embeddings"):  # learned per-label residuals, as in training
            with self._lock, torch.no_grad():
                return self.model.adapt_prompt_embeddings(labels, stacked[:, 0], stacked[:, 1])
        return stacked[:, 0], stacked[:, 1]

    def disease_probabilities(self, labels: list[str] | None = None) -> dict[str, float]:
        """Zero-shot probability per label: sigmoid of the model's disease_logits on the prompt embeddings."""
        labels = [check_text(lbl, "label") for lbl in (labels if labels is not None else self.labels())]
        if not labels:
            return {}
        with self._lock, torch.no_grad():
            pos, neg = (e.to(self.pooled.device) for e in self.prompt_embeddings(labels))
            if hasattr(self.model, "final_disease_logits"):  # pooled zero-shot (+ token-level MIL when trained)
                mask = torch.as_tensor(self.valid_bins(), device=self.tokens.device)[None]
                logits = self.model.final_disease_logits(self.pooled[None].float(), pos, neg, labels=labels,
                                                         tokens=self._label_tokens()[None].float(), mask=mask,
                                                         **self._evidence_kwargs())
            else:
                logits = self.model.disease_logits(self.pooled[None].float(), pos, neg, labels=labels)
            probs = torch.sigmoid(logits.float()).reshape(-1).cpu().numpy()
        return {lbl: float(p) for lbl, p in zip(labels, probs)}

    # ------------------------------------------------------------------ heatmaps
    def _label_tokens(self) -> torch.Tensor:
        return self.label_tokens if self.label_tokens is not None else self.tokens

    def _evidence_kwargs(self) -> dict[str, torch.Tensor]:
        """{"evidence": [1,d,h,w,S]} for a model with the blobness readout, else {} (other models lack the keyword)."""
        return {"evidence": self.evidence[None].float()} if self.evidence is not None else {}

    def token_scores(self, label_or_text: str) -> torch.Tensor:
        """Per-token heatmap logits [d, h, w]: a known label's token-level disease logit (positive vs negative
        prompt, the map the disease probability pools over), or cos(token, text) * t for free text."""
        text = check_text(label_or_text)
        if text in self.labels() and hasattr(self.model, "disease_heatmap_logits"):
            pos, neg = (e.to(self.tokens.device) for e in self.prompt_embeddings([text]))
            with self._lock, torch.no_grad():
                z = self.model.disease_heatmap_logits(self._label_tokens()[None].float(), [text], pos, neg,
                                                      **self._evidence_kwargs())
            return z.reshape(self.tokens.shape[:3]).float()
        emb = self.text_embedding(text).to(self.tokens.device)
        with self._lock, torch.no_grad():
            return self.model.heatmap_logits(self.tokens[None], emb).reshape(self.tokens.shape[:3]).float()

    def token_ijk_to_ras(self) -> np.ndarray:
        """IJK->RAS of the token grid: token t sits at model voxel t * p + (p - 1) / 2 on each axis."""
        pd, ph, pw = self.patch
        scale = np.diag([pw, ph, pd, 1.0]).astype(np.float64)
        scale[:3, 3] = [(pw - 1) / 2.0, (ph - 1) / 2.0, (pd - 1) / 2.0]
        return self.model_ijk_to_ras @ scale

    def subdivision(self) -> tuple[int, int, int]:
        """The label heatmaps' cells per token along (d, h, w): config.heatmap_subdivision, (1, 1, 1) when off or
        when the encoding keeps no model input to run again."""
        n = tuple(int(v) for v in (_cfg(self.model, "heatmap_subdivision", default=None) or (1, 1, 1)))
        if self.model_input is None or not hasattr(self.model, "stitched_heatmap_logits"):
            return (1, 1, 1)
        return n  # type: ignore[return-value]

    def guidance(self) -> str:
        """config.heatmap_guidance of the label heatmaps, "none" when off or when the encoding keeps no model input."""
        mode = str(_cfg(self.model, "heatmap_guidance", default="none") or "none")
        return "none" if self.model_input is None else mode

    def heatmap_scores(self, label_or_text: str) -> tuple[torch.Tensor, np.ndarray]:
        """The heatmap the user sees and its IJK->RAS: a known label's map guided by its input x gradient on the
        model grid when the model has a `heatmap_guidance` (`ctvl.model.guidance`; values in [0, 1]), else its
        logits on the stitched grid when it has a `heatmap_subdivision` (`ctvl.model.stitch`), else `token_scores`
        on the token grid."""
        text = check_text(label_or_text)
        if text in self.labels() and self.guidance() != "none":
            return self._guided_label_heatmaps([text])[text], self.model_ijk_to_ras
        return self._coarse_scores(text)

    def _coarse_scores(self, text: str) -> tuple[torch.Tensor, np.ndarray]:
        n = self.subdivision()
        if n == (1, 1, 1) or text not in self.labels():
            return self.token_scores(text), self.token_ijk_to_ras()
        from ctvl.model.stitch import stitched_ijk_to_ras

        heat = self._stitched_label_heatmaps()[self.labels().index(text)]
        return heat, stitched_ijk_to_ras(self.model_ijk_to_ras, self.patch, n)

    def prepare_heatmaps(self, progress: ProgressFn | None = None, cancel: CancelLike = None,
                         labels: list[str] | None = None) -> None:
        """Run the label heatmaps' encoder passes now (a worker thread's job: progress per window, cancel
        mid-forward), so that every later `heatmap` of a label (of ``labels``, for a guided model) is immediate.
        Nothing to do on the token grid."""
        guided = [check_text(lbl, "label") for lbl in labels or []] if self.guidance() != "none" else []
        if self.subdivision() != (1, 1, 1):
            self._stitched_label_heatmaps(Steps(scaled_progress(progress, 0.0, 0.5 if guided else 1.0), cancel))
        if guided:
            self._guided_label_heatmaps(guided, Steps(scaled_progress(progress, 0.5, 1.0), cancel))

    def _guided_label_heatmaps(self, labels: list[str], steps: Steps | None = None) -> dict[str, torch.Tensor]:
        """{label: [D, H, W]} guided label heatmaps on the model grid (`ctvl.model.guidance`), computed once per
        scan and label: the coarse map resampled to the model grid, times the attribution of one encoder forward
        and backward per window, windows blended along S as in `encode`."""
        from ctvl.model.guidance import guided_heatmap, label_attribution, to_model_grid

        todo = [lbl for lbl in dict.fromkeys(labels) if lbl not in self._guided]
        unknown = [lbl for lbl in todo if lbl not in self.labels()]
        if unknown:
            raise CTVLInputError(None, f"no label heatmap for {unknown[0]!r}", "name one of the model's labels")
        if todo:
            steps = steps or Steps(None, None)
            assert self.model_input is not None
            coarse = to_model_grid(torch.stack([self._coarse_scores(lbl)[0] for lbl in todo]), self.patch,
                                   self.subdivision(), self.model_shape)
            pos, neg = (e.to(self.tokens.device) for e in self.prompt_embeddings(todo))
            depth, pd = int(_cfg(self.model, "input_shape")[0]), self.patch[0]
            device = model_device(self.model)
            acc = torch.zeros((len(todo), *self.model_shape), device=device)
            weight = torch.zeros(self.model_shape[0], device=device)
            with self._lock, CancelHooks(self.model, steps), autocast(device):
                for i, start in enumerate(self.window_starts):
                    steps.report(i / len(self.window_starts),
                                 f"guided heatmaps: window {i + 1}/{len(self.window_starts)}")
                    x = torch.from_numpy(self.model_input[start:start + depth]).to(device)[None, None]
                    a = label_attribution(self.model, x, todo, pos, neg)  # [L, depth, H, W]
                    hat = torch.from_numpy(hat_weights(depth // pd)).to(device) if len(self.window_starts) > 1 \
                        else torch.ones(depth // pd, device=device)
                    hat = hat.repeat_interleave(pd)
                    acc[:, start:start + depth] += a * hat[None, :, None, None]
                    weight[start:start + depth] += hat
            attribution = acc / weight.clamp_min(1e-12)[None, :, None, None]
            for lbl, c, a in zip(todo, coarse.to(device), attribution):
                self._guided[lbl] = guided_heatmap(c, a)
            steps.report(1.0, "guided heatmaps ready")
        return {lbl: self._guided[lbl] for lbl in labels}

    def _stitched_label_heatmaps(self, steps: Steps | None = None) -> torch.Tensor:
        """[L, d*n_d, h*n_h, w*n_w] every label's stitched heatmap, computed once per scan (prod(n) encoder passes
        per window, windows blended along S as in `encode`)."""
        if self._stitched is not None:
            return self._stitched
        steps = steps or Steps(None, None)
        labels, n = self.labels(), self.subdivision()
        pos, neg = (e.to(self.tokens.device) for e in self.prompt_embeddings(labels))
        assert self.model_input is not None
        depth = int(_cfg(self.model, "input_shape")[0])
        device = model_device(self.model)
        acc: torch.Tensor | None = None
        weight = torch.zeros(self.tokens.shape[0] * n[0], device=device)
        with self._lock, torch.no_grad(), CancelHooks(self.model, steps), autocast(device):
            for i, start in enumerate(self.window_starts):
                steps.report(i / len(self.window_starts), f"label heatmaps: window {i + 1}/{len(self.window_starts)}")
                x = torch.from_numpy(self.model_input[start:start + depth]).to(device)[None, None]
                z = self.model.stitched_heatmap_logits(x, labels, pos, neg, n)[0].float()  # [L, d', h', w']
                if acc is None:
                    acc = torch.zeros((len(labels), weight.shape[0], *z.shape[2:]), device=device)
                hat = torch.from_numpy(hat_weights(z.shape[1] // n[0])).to(device) if len(self.window_starts) > 1 \
                    else torch.ones(z.shape[1] // n[0], device=device)
                hat = hat.repeat_interleave(n[0]).to(z.dtype)
                first = start // self.patch[0] * n[0]
                acc[:, first:first + z.shape[1]] += z * hat[None, :, None, None]
                weight[first:first + z.shape[1]] += hat
        assert acc is not None
        self._stitched = acc / weight[None, :, None, None]
        steps.report(1.0, "label heatmaps ready")
        return self._stitched

    def heatmap(self, label_or_text: str, grid: str = "model") -> Volume:
        """Heatmap as a float32 Volume on the model grid or on the input grid (exact geometry either way)."""
        if grid not in ("model", "input"):
            raise CTVLInputError(f"grid={grid!r}", "unknown heatmap grid", "use 'model' or 'input'")
        scores, src = self.heatmap_scores(label_or_text)
        if grid == "input":
            return self._to_input_grid(scores, src)
        if scores.shape == self.tokens.shape[:3]:
            up = torch.nn.functional.interpolate(scores[None, None], scale_factor=self.patch, mode="trilinear",
                                                 align_corners=False)[0, 0]
            return Volume(up.cpu().numpy().astype(np.float32, copy=False), self.model_ijk_to_ras.copy())
        if src is self.model_ijk_to_ras:  # a guided map: on the model grid already
            return Volume(scores.float().cpu().numpy(), self.model_ijk_to_ras.copy())
        return self._resampled(scores, src, self.model_ijk_to_ras, self.model_shape)

    def _to_input_grid(self, scores: torch.Tensor, src_ijk_to_ras: np.ndarray | None = None) -> Volume:
        """Heatmap scores (token grid, or `src_ijk_to_ras`'s) -> float32 Volume on the input grid (trilinear;
        outside the scores' grid: the minimum).

        Inputs whose axes are parallel to the model's (any flips/permutations, the usual case) use a separable
        interpolation (three small weight matrices, ~10x faster than a generic resampler); oblique inputs go
        through ``ctvl.geometry.resample``. Both follow ITK's convention: values within half a cell of the grid's
        edge are clamped, points further out get the fill value.
        """
        src = self.token_ijk_to_ras() if src_ijk_to_ras is None else src_ijk_to_ras
        shape = tuple(int(n) for n in self.volume.array.shape[:3])
        return self._resampled(scores, src, self.volume.ijk_to_ras, shape)

    @staticmethod
    def _resampled(scores: torch.Tensor, src: np.ndarray, dst: np.ndarray, shape: tuple[int, ...]) -> Volume:
        tok = scores.float()
        fill = float(tok.min())
        out = separable_resample(tok, src, dst, shape, fill)  # type: ignore[arg-type]
        if out is None:
            from ctvl.geometry import resample

            vol = resample(Volume(tok.cpu().numpy(), src), dst, shape, order=1, fill=fill)
            out = np.asarray(vol.array, dtype=np.float32)
        return Volume(out, np.array(dst, dtype=np.float64))

    # ------------------------------------------------------------------ slices
    def bin_positions_mm(self) -> np.ndarray:
        """RAS S (mm) of every depth bin's centre (increasing: d points toward S)."""
        pd = self.patch[0]
        centres = np.arange(self.bins.shape[0]) * pd + (pd - 1) / 2.0
        ijk = np.zeros((len(centres), 3))
        ijk[:, 0] = (self.model_shape[2] - 1) / 2.0
        ijk[:, 1] = (self.model_shape[1] - 1) / 2.0
        ijk[:, 2] = centres
        return (ijk @ self.model_ijk_to_ras[:3, :3].T + self.model_ijk_to_ras[:3, 3])[:, 2]

    def valid_bins(self) -> np.ndarray:
        """[d] bool: depth bins whose centre lies inside the scan (the rest is padding), as in training."""
        z = self.bin_positions_mm()
        sz = self._slice_z
        half = 0.5 * abs(float(np.median(np.diff(z)))) if len(z) > 1 else 0.0
        valid = (z >= sz.min() - half) & (z <= sz.max() + half)
        return valid if valid.any() else np.ones_like(valid)

    def bin_scores(self, text: str) -> np.ndarray:
        """Depth-bin scores of a text: the model's bin logits (+ its label-grounded term for the CT-RATE labels the
        text names, when the weights are calibrated for it: config.locate_label_weight). Kept per text for this
        scan (the last `BIN_SCORE_CACHE` texts), so a repeated query costs no model call."""
        cached = self._bin_scores.get(text)
        if cached is not None:
            return cached.copy()
        scores = self._compute_bin_scores(text)
        if len(self._bin_scores) >= BIN_SCORE_CACHE:
            self._bin_scores.pop(next(iter(self._bin_scores)))  # the oldest
        self._bin_scores[text] = scores
        return scores.copy()

    def _compute_bin_scores(self, text: str) -> np.ndarray:
        emb = self.text_embedding(text).to(self.bins.device)
        with self._lock, torch.no_grad():
            logits = self.model.bin_logits(self.bins[None], emb, self.tokens[None])  # tokens: grounded bin scores
        logits = logits.reshape(-1).float()
        weight = float(_cfg(self.model, "locate_label_weight", default=0.0) or 0.0)
        if weight > 0 and hasattr(self.model, "disease_heatmap_logits"):
            from ctvl.model.joint import label_depth_evidence
            from ctvl.prompts import snippet_labels

            named = [lbl for lbl in snippet_labels(text) if lbl in self.labels()]
            if named:
                side = self._side_of(text)
                for lbl in named:  # per label and side once per scan: a repeated or new query costs no heatmap
                    if (lbl, side) not in self._label_depth:
                        cols = self._side_columns(side)
                        self._label_depth[lbl, side] = label_depth_evidence(self.token_scores(lbl)[None], cols)
                peaks = torch.stack([self._label_depth[lbl, side] for lbl in named]).amax(dim=0)
                logits = logits + weight * peaks.to(logits.device)
        return logits.cpu().numpy()

    def _side_of(self, text: str) -> str | None:
        """The patient side a text names when the model reads it (config.locate_laterality) and the input is kept."""
        if not _cfg(self.model, "locate_laterality", default=False) or self.model_input is None:
            return None
        from ctvl.prompts import snippet_side

        return snippet_side(text)

    def _side_columns(self, side: str | None) -> torch.Tensor | None:
        """[w] bool token columns on `side` of this scan's body midline (`ctvl.model.laterality`)."""
        if side is None:
            return None
        if side not in self._sides:  # once per side and scan, for all the labels a text may name
            from ctvl.model.laterality import side_columns

            _, _, window = model_input_spec(self.model)
            pw = int(self.model.config.downsample()[2])
            image = torch.from_numpy(np.asarray(self.model_input, dtype=np.float32))
            self._sides[side] = side_columns(image, side, pw, window)
        return self._sides[side]

    def slice_scores(self, text: str, bin_scores: np.ndarray | None = None) -> np.ndarray:
        """One score per input slice (bin scores interpolated by the slices' RAS S position)."""
        z = self.bin_positions_mm()
        scores = self.bin_scores(text) if bin_scores is None else bin_scores
        order = np.argsort(z)
        return np.interp(self._slice_z, z[order], scores[order]).astype(np.float32)

    def locate(self, text: str, top_k: int = 5, min_separation_mm: float | None = None) -> list[SliceHit]:
        """Top-k input slices for ``text``, distinct places (non-maximum suppression within a bin's height).

        With the model's `locate_peak_radius` r > 0 a hit on a peak of the depth-bin scores moves to the slice
        nearest to the softmax-weighted mean position of the bins within r bins of it (`ctvl.tokengrid.refine_peak`),
        as in `training evaluate`; its score stays the hit's, and a hit on a peak's flank stays where it is."""
        if int(top_k) < 1:
            raise CTVLInputError(f"top_k={top_k}", "need at least one slice", "use top_k >= 1")
        bins = self.bin_scores(text)
        scores = self.slice_scores(text, bins)
        if min_separation_mm is None:
            min_separation_mm = self.patch[0] * float(abs(self.model_ijk_to_ras[2, 2]))
        hits: list[SliceHit] = []
        taken: list[float] = []
        for k in np.argsort(-scores, kind="stable"):
            z = float(self._slice_z[k])
            if any(abs(z - t) < min_separation_mm for t in taken):
                continue
            hits.append(SliceHit(int(k), z, float(scores[k])))
            taken.append(z)
            if len(hits) >= top_k:
                break
        radius = int(_cfg(self.model, "locate_peak_radius", default=0) or 0)
        if radius <= 0:
            return hits
        masked = np.where(self.valid_bins(), bins.astype(np.float64), -np.inf)
        z_bins = self.bin_positions_mm()
        return [self._refine(h, masked, z_bins, radius) for h in hits]

    def _refine(self, hit: SliceHit, masked: np.ndarray, z_bins: np.ndarray, radius: int) -> SliceHit:
        """Move a hit to the input slice nearest to its sub-bin peak (`refine_peak` around its best bin); masked:
        the bin scores with -inf outside the scan, z_bins: the bins' RAS S."""
        from ctvl.tokengrid import refine_peak

        near = np.where(np.abs(z_bins - hit.position_mm) <= 0.5 * self.patch[0] * abs(self.model_ijk_to_ras[2, 2])
                        + 1e-6, masked, -np.inf)  # the bin(s) holding the hit's slice
        if not np.isfinite(near).any():
            return hit
        b = int(np.argmax(near))
        if any(0 <= n < len(masked) and masked[n] > masked[b] for n in (b - 1, b + 1)):
            return hit  # a runner-up on the flank of a better bin: refining would pull it onto that peak
        pos = refine_peak(masked, radius, peak=b)
        z = float(np.interp(pos, np.arange(len(z_bins)), z_bins))
        k = int(np.argmin(np.abs(self._slice_z - z)))
        return SliceHit(k, float(self._slice_z[k]), hit.score)
