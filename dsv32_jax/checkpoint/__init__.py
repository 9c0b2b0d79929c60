"""Weights on disk: the abstract param description, safetensors, the HF layout, converted Orbax
directories, and synthetic checkpoints."""
