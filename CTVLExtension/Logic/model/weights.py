"""Weights I/O: a folder with config.json + model.safetensors (+ prompts.json, card.md), written atomically.

The frozen bundled text backbone is never saved; a fine-tuned one saves only its trainable layers. Loading checks
the folder against its config (missing/unexpected keys, shapes, corrupt file) and raises CTVLWeightsError.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from ctvl.atomic import atomic_write_bytes
from ctvl.errors import CTVLWeightsError
from ctvl.model.config import ModelConfig
from ctvl.model.joint import CTVLModel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROMPTS_FILE = "prompts.json"
CARD_FILE = "card.md"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"
TRAIN_HINT = ("train and export it: `python -m training train --config training/configs/phantom-demo.yaml` then "
              "`python -m training export --out CTVLExtension/Logic/weights/demo`")


def resolve_weights_dir(path_or_name: str | os.PathLike) -> Path:
    """'demo' (or any bundled name) -> ctvl/weights/<name>/; otherwise the given folder."""
    text = str(path_or_name)
    bare = not isinstance(path_or_name, Path) and os.sep not in text and "/" not in text
    if bare and (text == "demo" or (BUNDLED_DIR / text).is_dir()):
        return BUNDLED_DIR / text
    return Path(text).expanduser()


def save_weights(model: CTVLModel, out_dir: str | os.PathLike, prompts: dict[str, Any] | None = None,
                 card: str | None = None) -> Path:
    """Write config.json, model.safetensors, prompts.json (the model's prompts if None) and card.md (if given)."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {k: state[k].detach().to("cpu").contiguous() for k in model.saved_state_keys()}
    meta = {"format": "ctvl", "name": model.config.name, "version": model.config.version}
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata=meta))
    atomic_write_bytes(out / CONFIG_FILE, model.config.to_json().encode("utf-8"))
    prompts = prompts if prompts is not None else model.prompts
    atomic_write_bytes(out / PROMPTS_FILE, (json.dumps(prompts, indent=2) + "\n").encode("utf-8"))
    if card is not None:
        atomic_write_bytes(out / CARD_FILE, card.encode("utf-8"))
    log.info("saved %d tensors (%.1f MB) to %s", len(tensors),
              sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6, out)
    return out


def _read_prompts(path: Path) -> dict[str, dict[str, list[str]]] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(data, dict) and all(
            isinstance(v, dict) and all(isinstance(v.get(k), list) and v.get(k) for k in ("positive", "negative"))
            for v in data.values())
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise CTVLWeightsError(str(path), "prompts.json is not {label: {positive: [...], negative: [...]}}",
                               "fix or delete prompts.json")
    return data


def load_weights(path_or_name: str | os.PathLike = "demo", device: str | torch.device = "cpu") -> CTVLModel:
    """Rebuild the model from a weights folder (or bundled name such as 'demo'), in eval mode on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_weights_dir(path_or_name)
    is_demo = str(path_or_name) == "demo"
    if not folder.is_dir() or not (folder / CONFIG_FILE).is_file():
        what = "the bundled demo weights are not there" if is_demo else "no CTVL weights folder (config.json)"
        raise CTVLWeightsError(str(folder), what, TRAIN_HINT if is_demo else "pass a folder written by save_weights")
    config = ModelConfig.from_json_file(folder / CONFIG_FILE)
    wfile = folder / WEIGHTS_FILE
    if not wfile.is_file():
        raise CTVLWeightsError(str(wfile), "model.safetensors is missing", TRAIN_HINT if is_demo else
                               "copy the whole weights folder")
    try:
        tensors = load_file(str(wfile), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CTVLWeightsError(str(wfile), f"model.safetensors is corrupt or unreadable ({str(exc)[:120]})",
                               "re-export or re-download the weights") from exc
    model = CTVLModel(config)
    expected = model.state_dict()
    wanted = set(model.saved_state_keys())
    missing = sorted(wanted - set(tensors))
    unexpected = sorted(set(tensors) - wanted)
    if missing or unexpected:
        detail = "; ".join(x for x in (
            f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else "",
            f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})" if unexpected else "") if x)
        raise CTVLWeightsError(str(wfile), f"weights do not match config.json: {detail}",
                               "config.json and model.safetensors must come from the same export")
    bad = [f"{k}: file {tuple(t.shape)} vs config {tuple(expected[k].shape)}"
           for k, t in tensors.items() if tuple(t.shape) != tuple(expected[k].shape)]
    if bad:
        raise CTVLWeightsError(str(wfile), f"weights do not match config.json: shape mismatch {bad[:3]}",
                               "config.json and model.safetensors must come from the same export")
    model.load_state_dict(tensors, strict=False)
    prompts = _read_prompts(folder / PROMPTS_FILE)
    if prompts:
        model.prompts = prompts
    model.weights_dir = folder  # type: ignore[attr-defined]
    return model.to(device).eval()


def read_card(path_or_name: str | os.PathLike = "demo") -> str | None:
    p = resolve_weights_dir(path_or_name) / CARD_FILE
    return p.read_text(encoding="utf-8") if p.is_file() else None
