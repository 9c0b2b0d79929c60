"""Running the model: jitted forward/prefill/decode functions, generation, the `Model` object."""
