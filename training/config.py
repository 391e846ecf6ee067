"""Training configs: YAML <-> typed dataclasses, with ``--override a.b=value`` and a stable hash.

Configs are data: the resolved config is saved in the run directory and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ctvl.errors import CTVLInputError
from ctvl.fieldtypes import FieldTypeError, check_value


@dataclass
class AugmentConfig:
    """Training-time augmentation (`training.augment`, applied to the batch on the device). No left-right flips:
    reports name sides."""

    enabled: bool = True
    prob: float = 0.5  # each augmentation is on with this probability, independently
    intensity_scale: float = 0.1  # x * (1 + f), f ~ U(-0.1, 0.1)
    intensity_shift: float = 0.05  # x + o, o ~ U(-0.05, 0.05) on the [0, 1] windowed scale
    noise_std: float = 0.02  # Gaussian noise, std ~ U(0, 0.02)
    translate_vox: float = 3.0  # in-plane shift by whole voxels, up to +- this many per axis


@dataclass
class PhantomSplit:
    n: int = 8
    seed: int = 1


@dataclass
class GenerateConfig:
    """Auto-generate a phantom corpus with ``ctvl.phantom.write_dataset`` when ``data.root`` is missing."""

    enabled: bool = False
    splits: dict = field(default_factory=lambda: {"train": {"n": 800, "seed": 1}, "valid": {"n": 100, "seed": 2}})
    shape: Optional[list] = None  # phantom (i, j, k) size override, if the generator offers one
    workers: int = 2


@dataclass
class DataConfig:
    root: str = "data/phantom"
    train_split: str = "train"
    valid_split: str = "valid"
    cache_dir: Optional[str] = None  # default: <root>/.ctvl_cache
    cache_workers: int = 2
    num_workers: int = 0  # DataLoader workers
    max_volumes: Optional[int] = None  # use only the first N volumes of a split (tests, smoke runs)
    annotations: Optional[str] = None  # verified snippet-slice pairs (JSONL, DESIGN.md "Annotations")
    image_convention: str = "superior_first"  # report "image N" -> slice (NIfTI: image 1 = most superior)
    max_snippets_per_volume: int = 4
    report_fields: list = field(default_factory=lambda: ["Findings_EN", "Impressions_EN"])
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class Objective:
    enabled: bool = True
    weight: float = 1.0


@dataclass
class LocalizationObjective(Objective):
    sigma_bins: float = 1.0  # Gaussian soft target width (depth bins); logits are cos / model.bin_temperature


@dataclass
class MilObjective(Objective):
    # report-guided MIL: a positive label's pooling is restricted to the depth bins around the images its report
    # snippets cite (training.losses.guided_token_mask); off = pooling over the whole scan
    guided: bool = False
    guide_margin_bins: float = 2.0


@dataclass
class LossConfig:
    siglip: Objective = field(default_factory=Objective)
    disease: Objective = field(default_factory=Objective)
    localization: LocalizationObjective = field(default_factory=LocalizationObjective)
    # token-level (MIL) disease supervision; needs a model with `mil_disease: true` (ignored otherwise)
    mil: MilObjective = field(default_factory=lambda: MilObjective(enabled=False))
    # grounded localization: the same soft-target CE on the bins' token scores (needs a model with
    # `token_localization: true`; sigma from `localization`)
    token_localization: Objective = field(default_factory=lambda: Objective(enabled=False))


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 4  # per process (per GPU)
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # none | bf16 | fp16 on GPU; CPU runs fp32 unless cpu_amp
    # bf16 autocast on CPU too (amp must be bf16): true | false | auto. On a CPU with avx512_bf16 or AMX the demo
    # step runs 1.5x faster (2.71 -> 1.81 s, benchmarks/train_step_speed.py --override train.cpu_amp=true); without
    # them bf16 is emulated, over 10x slower than fp32 (AVX2-only EPYC: > 100 s against 7.7 s). auto: bf16 only
    # where the CPU flags list avx512_bf16 or amx_bf16, fp32 elsewhere (and where the flags cannot be read)
    cpu_amp: Union[bool, str] = False
    grad_checkpointing: bool = False
    # parameter-name prefixes kept fixed (e.g. [vision., cnn_branch., dense.] to tune the heads of an encoder from
    # init_weights); each must name at least one parameter. The text backbone is frozen by model.text_trainable_layers
    freeze: list[str] = field(default_factory=list)
    # a table of the frozen text tower's sentence features (python -m training text-features): the tower is not run,
    # and a sentence outside the table stops the run (training.text_features)
    text_features: Optional[str] = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    find_unused_parameters: bool = True
    threads: Optional[int] = None  # torch.set_num_threads on CPU

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16", "fp16"):
            raise CTVLInputError("train.amp", f"unknown value {self.amp!r}", "Use none, bf16 or fp16")
        if self.cpu_amp not in (True, False, "auto"):
            raise CTVLInputError("train.cpu_amp", f"unknown value {self.cpu_amp!r}", "Use true, false or auto")
        if not isinstance(self.freeze, list) or not all(isinstance(p, str) and p for p in self.freeze):
            raise CTVLInputError("train.freeze", f"expected a list of parameter-name prefixes, got {self.freeze!r}",
                                 "Example: freeze: [vision., cnn_branch.]")
        if self.cpu_amp and self.amp != "bf16":
            raise CTVLInputError("train.cpu_amp", f"needs train.amp: bf16, got {self.amp!r}",
                                 "CPU autocast is bf16 only")


@dataclass
class Config:
    name: str = "ctvl"
    model: dict = field(default_factory=dict)  # passed to ctvl.model.ModelConfig
    init_weights: Optional[str] = None  # start from a weights dir (or "demo")
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self, keys: tuple[str, ...] | None = None) -> str:
        d = self.to_dict()
        if keys:
            d = {k: d[k] for k in keys}
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _build(cls, data: Any, where: str):
    if not dataclasses.is_dataclass(cls):
        return data
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise CTVLInputError(where, f"expected a mapping, got {type(data).__name__}", "Check the YAML indentation")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CTVLInputError(where, f"unknown key(s) {unknown}", f"Known keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        f = names[name]
        ftype = f.type if not isinstance(f.type, str) else _resolve(f.type)
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, value, f"{where}.{name}")
            continue
        try:
            kwargs[name] = check_value(str(f.type), value)
        except FieldTypeError as exc:
            raise CTVLInputError(f"{where}.{name}", str(exc), "Fix the value in the YAML or the --override") from None
    return cls(**kwargs)


_TYPES = {
    c.__name__: c
    for c in (
        AugmentConfig, PhantomSplit, GenerateConfig, DataConfig, Objective, LocalizationObjective, MilObjective,
        LossConfig, OptimConfig, TrainConfig, Config,
    )
}


def _resolve(type_name: str):
    return _TYPES.get(type_name, type_name)


def config_from_dict(data: dict, source: str = "config") -> Config:
    return _build(Config, data, source)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    import yaml

    for item in overrides or []:
        if "=" not in item:
            raise CTVLInputError("--override", f"{item!r} is not key=value", "Example: --override train.max_steps=10")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CTVLInputError("--override", f"{key} crosses a non-mapping value", "")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides and validate keys."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CTVLInputError(path, "config file not found", "Pass a YAML file, e.g. training/configs/tiny-test.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CTVLInputError(path, f"invalid YAML ({str(exc).splitlines()[0]})", "Fix the syntax") from None
    return config_from_dict(apply_overrides(data, overrides), str(path))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomic)."""
    import yaml

    from training.utils import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
