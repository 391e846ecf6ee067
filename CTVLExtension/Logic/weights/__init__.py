"""Embedded model weights: `demo/` holds the phantom-trained demo model (config, safetensors, prompts, card)."""
