"""CTVL model: 3D vision encoders (ViT, CNN-ViT hybrid), text tower, joint model and weights I/O."""

from __future__ import annotations

from ctvl.model.config import PRESETS, ModelConfig, demo_config, tiny_config
from ctvl.model.joint import (
    CTVLModel,
    CTVLOutput,
    ImageEmbeddings,
    disease_logits,
    lse_pool,
    mil_disease_logits,
    token_disease_logits,
)
from ctvl.model.text import bundled_minilm_path, split_sentences
from ctvl.model.vision import DenseHead, VisionEncoder, count_parameters
from ctvl.model.weights import load_weights, read_card, resolve_weights_dir, save_weights

__all__ = [
    "PRESETS",
    "CTVLModel",
    "CTVLOutput",
    "DenseHead",
    "ImageEmbeddings",
    "ModelConfig",
    "VisionEncoder",
    "bundled_minilm_path",
    "count_parameters",
    "demo_config",
    "disease_logits",
    "lse_pool",
    "mil_disease_logits",
    "token_disease_logits",
    "load_weights",
    "read_card",
    "resolve_weights_dir",
    "save_weights",
    "split_sentences",
    "tiny_config",
]
