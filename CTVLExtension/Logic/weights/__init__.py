"""Embedded model weights: `demo/` is the phantom-trained demo model (config.json, model.safetensors, prompts.json, card.md)."""
