"""Serving over HTTP: OpenAI requests read into prompt ids and replies into deltas (`protocol`), and
the FastAPI app over the engine core (`http`, `dsv32_jax.engine.core.Engine`; `dsv32 serve`)."""
