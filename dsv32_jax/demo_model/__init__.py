"""The trained demo model (package data): config.json, model.safetensors, tokenizer (see dsv32_jax.train.demo)."""
