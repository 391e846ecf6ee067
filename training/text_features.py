"""Precomputed sentence features of a frozen text tower (`train.text_features`).

With ``model.text_trainable_layers: 0`` the text tower is a fixed function of each sentence, so its features can be
computed once, on a machine that has the tower's weights, and training can read them from a table instead:
``python -m training text-features`` writes every sentence a corpus gives the tower (report sentences, mined
snippets, the label prompts) with its features into one safetensors file (fp32: the numbers the tower gives). A run
with ``train.text_features: FILE`` fills the tower's sentence cache from it and never runs the tower; a sentence the
table lacks stops the run with a one-line error instead of being encoded, since there the tower's weights may be a
stand-in (a GPU machine that cannot receive the 91 MB MiniLM: `benchmarks/device_demo.sh`). The table records the
tower's settings and is refused by a model whose settings differ.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from ctvl.errors import CTVLInputError
from ctvl.model.text import chunk_text, split_sentences

log = logging.getLogger(__name__)

SETTINGS = ("text_model", "text_max_tokens", "text_pooling")


def tower_settings(model) -> dict:
    return {k: getattr(model.config, k) for k in SETTINGS} | {"width": int(model.text.width)}


def corpus_sentences(model, root: str | Path, splits: list[str], report_fields: tuple[str, ...]) -> list[str]:
    """Every sentence the text tower sees for these splits' reports and mined snippets (no images read)."""
    from ctvl.snippets import mine_references

    from training.data import CTRateDataset, Preprocess

    out: dict[str, None] = {}
    pre = Preprocess.from_model_config(model.config)  # the records only: no volume is read or cached
    for split in splits:
        ds = CTRateDataset(root, split, pre, report_fields=report_fields)
        for r in ds.records:
            out.update(dict.fromkeys(split_sentences(r.text)))
            for ref in mine_references(r.text):
                out.update(dict.fromkeys(chunk_text(ref.snippet)))
    return list(out)


def prompt_sentences(model) -> list[str]:
    """The sentences `model.prompt_embeddings()` gives the tower (recorded from one call)."""
    seen: list[str] = []
    tower = model.text
    forward = tower.forward

    def record(sentences, device=None):
        seen.extend(sentences)
        return forward(sentences, device)

    tower.forward = record
    try:
        with torch.no_grad():
            model.prompt_embeddings()
    finally:
        del tower.forward
    return list(dict.fromkeys(seen))


def build_table(model, sentences: list[str], batch_size: int = 256) -> tuple[torch.Tensor, list[str]]:
    """[N, width] fp32 features of the unique ``sentences`` from the model's (frozen) tower."""
    if model.text.backbone is not None:
        raise CTVLInputError("text-features", "the text tower has trainable layers (model.text_trainable_layers > 0)",
                             "A table holds a frozen tower's features only")
    unique = list(dict.fromkeys(sentences))
    feats = [model.text(unique[i:i + batch_size], device=torch.device("cpu")).float()
             for i in range(0, len(unique), batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, model.text.width), unique


def save_table(path: str | Path, features: torch.Tensor, sentences: list[str], settings: dict) -> Path:
    from safetensors.torch import save

    from training.utils import atomic_write_bytes

    meta = {"sentences": json.dumps(sentences), "settings": json.dumps(settings)}
    return atomic_write_bytes(Path(path), save({"features": features.contiguous()}, metadata=meta))


def use_table(model, path: str | Path) -> int:
    """Fill the model's frozen-tower cache from the table at ``path`` and stop the tower from running (a sentence
    outside the table then raises). Returns the number of sentences."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            features = f.get_tensor("features")
        sentences = json.loads(meta["sentences"])
        settings = json.loads(meta["settings"])
    except FileNotFoundError:
        raise CTVLInputError(path, "no such text-feature table",
                             "Write one with python -m training text-features") from None
    except Exception as exc:  # noqa: BLE001 - safetensors/json raise several types for a foreign or truncated file
        raise CTVLInputError(path, f"not a text-feature table ({type(exc).__name__})",
                             "Write one with python -m training text-features") from exc
    if model.text.backbone is not None:
        raise CTVLInputError(path, "the model's text tower has trainable layers",
                             "A text-feature table serves a frozen tower only (model.text_trainable_layers: 0)")
    mine = tower_settings(model)
    if settings != mine or features.shape != (len(sentences), mine["width"]):
        raise CTVLInputError(path, f"written for a text tower {settings}, the model has {mine}",
                             "Rebuild the table with this config")
    model.text.preload(dict(zip(sentences, features)), table_only=True)
    log.info("text features from %s: %d sentences; the text tower is not run", path, len(sentences))
    return len(sentences)
