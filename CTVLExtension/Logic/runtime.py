"""Runtime plumbing for inference: device choice, per-model locks and text-embedding LRU, progress and cancel.

Nothing is attached to model objects: a weak registry maps each model to its lock and text cache, so a model that
is no longer used is freed with its cache.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Union

import torch
from ctvl.errors import CTVLCancelled, CTVLInputError

ProgressFn = Callable[[float, str], None]
CancelLike = Union[Callable[[], bool], threading.Event, None]
TEXT_CACHE_SIZE = 512
_LOCK_GUARD = threading.Lock()
_PER_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without CUDA -> CTVLInputError."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CTVLInputError("--device cuda", "CUDA is not available on this machine",
                                 "use --device cpu or --device auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise CTVLInputError(f"--device {device}", "unknown device", "use auto, cpu or cuda")


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_state(model: Any) -> dict[str, Any]:
    """Per-model lock and text cache, kept in a weak registry (nothing is attached to the model object)."""
    with _LOCK_GUARD:
        state = _PER_MODEL.get(model)
        if state is None:
            lock = threading.RLock()
            ref = weakref.ref(model)  # the cache must not keep its model (the registry's key) alive

            def encode_text(texts: list[str]) -> torch.Tensor:
                return ref().encode_text(texts)

            state = {"lock": lock, "text_cache": TextCache(encode_text, lock)}
            _PER_MODEL[model] = state
        return state


def model_lock(model: Any) -> threading.RLock:
    """One re-entrant lock per model object, serialising forward passes and text encoding."""
    return model_state(model)["lock"]


def autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def cancel_fn(cancel: CancelLike) -> Callable[[], bool]:
    """A no-argument "is it cancelled?" callable from None, a threading.Event, a callable or a bool."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event) or hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    return lambda: bool(cancel)


def scaled_progress(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn:
    """A progress callback that maps a part's [0, 1] onto [lo, hi] of ``progress`` (None: reports nothing)."""

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(lo + (hi - lo) * float(fraction), message)

    return report


class Steps:
    """Progress reporting and cancel checks between the steps of one job."""

    def __init__(self, progress: ProgressFn | None, cancel: CancelLike) -> None:
        self.progress = progress
        self.is_cancelled = cancel_fn(cancel)

    def check(self) -> None:
        if self.is_cancelled():
            raise CTVLCancelled("encoding cancelled")

    def report(self, fraction: float, message: str) -> None:
        self.check()
        if self.progress is not None:
            self.progress(float(min(max(fraction, 0.0), 1.0)), message)


class CancelHooks:
    """Forward pre-hooks on the model's submodules that raise CTVLCancelled mid-forward (sub-second cancel)."""

    def __init__(self, model: torch.nn.Module, steps: Steps) -> None:
        self.model, self.steps, self.handles = model, steps, []

    def __enter__(self) -> CancelHooks:
        def hook(_module, _inputs):
            self.steps.check()

        for module in self.model.modules():
            if module is not self.model and any(True for _ in module.children()):
                self.handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class TextCache:
    """LRU of L2-normalised text embeddings keyed by the exact text (thread-safe)."""

    def __init__(self, encode_fn: Callable[[list[str]], torch.Tensor], lock: threading.RLock,
                 size: int = TEXT_CACHE_SIZE) -> None:
        self._encode, self._lock, self._size = encode_fn, lock, size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get_many(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._items]
            if missing:
                with torch.no_grad():
                    embs = self._encode(missing).float()
                for text, emb in zip(missing, embs):
                    self._items[text] = emb
            out = []
            for text in texts:
                self._items.move_to_end(text)
                out.append(self._items[text])
            while len(self._items) > self._size:
                self._items.popitem(last=False)
            return torch.stack(out)

    def get(self, text: str) -> torch.Tensor:
        return self.get_many([text])[0]

    def __len__(self) -> int:
        return len(self._items)
