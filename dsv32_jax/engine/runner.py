"""The public model object: config + params + jitted forward. `load_model` builds one."""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dsv32_jax.model.attention import ATTENTION_IMPLS
from dsv32_jax.model.config import DTYPES, Config
from dsv32_jax.engine.generate import Generator
from dsv32_jax.checkpoint.hf import is_hf_dir, load_params
from dsv32_jax.model.transformer import Transformer
from dsv32_jax.checkpoint.weights import abstract_params

INTERMEDIATES = ("attn_in", "attn_out", "ffn_in", "ffn_out", "index_scores", "topk", "gate_experts")


class Model:
    """DeepSeek-V3.2 with its params. `logits(tokens)` is one forward from position 0."""

    def __init__(self, config: Config, params: dict, attention_impl: str = "xla"):
        _check_impl(attention_impl)
        self.config = config
        self.params = params
        self.attention_impl = attention_impl
        self.module = Transformer(config, attention_impl)
        self.generator = Generator(config, self.module)

    @partial(jax.jit, static_argnums=0)
    def _logits(self, params, tokens):
        return self.module.apply({"params": params}, tokens)

    @partial(jax.jit, static_argnums=0)
    def _traced(self, params, tokens):
        return self.module.apply({"params": params}, tokens, mutable=["intermediates"])

    def _tokens(self, tokens) -> jax.Array:
        t = np.asarray(tokens)
        if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"tokens must be an int array of shape (batch, seq), got {t.dtype} {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{t.min()}, {t.max()}]")
        if t.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {t.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_seq_len}")
        return jnp.asarray(t, jnp.int32)

    def logits(self, tokens) -> jax.Array:
        """tokens int (B, S) -> float32 logits (B, S, vocab), every position."""
        return self._logits(self.params, self._tokens(tokens))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 0.95, seed: int = 0, stop_tokens: list[int] | None = None
                 ) -> list[list[int]]:
        """Continue each prompt (token ids) by up to max_new_tokens tokens. temperature=0 is
        greedy; sampling is nucleus (top_p). Each sequence stops after emitting a stop token
        (default: EOS), which is included in its output."""
        return self.generator.generate(self.params, prompts, max_new_tokens, temperature, top_p,
                                       seed, stop_tokens)

    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int,
                        temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                        stop_tokens: list[int] | None = None, stats: dict | None = None):
        """Like generate, but yields each step's new tokens (None for finished sequences).
        `stats`, if given, receives prefill/decode timings."""
        return self.generator.stream(self.params, prompts, max_new_tokens, temperature, top_p,
                                     seed, stop_tokens, stats)

    def logits_and_intermediates(self, tokens) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits plus per-layer values stacked over all layers: attn_in/attn_out/ffn_in/ffn_out
        (L,B,S,D), index_scores (L,B,S,T) before the causal mask, topk (L,B,S,k) (unsorted),
        gate_experts (L_moe, B*S, top_k) sorted."""
        logits, state = self._traced(self.params, self._tokens(tokens))
        inter = state["intermediates"]
        out = {}
        for name in INTERMEDIATES:
            parts = []
            for group in ("dense_layers", "moe_layers"):
                node = inter.get(group, {})
                found = _find(node, name)
                if found is not None:
                    parts.append(found)
            if parts:
                out[name] = jnp.concatenate(parts, axis=0)
        return logits, out


def _find(node, name):
    """The sown value `name` anywhere under node (sow stores a 1-tuple)."""
    if not isinstance(node, dict):
        return None
    if name in node:
        return node[name][0]
    for v in node.values():
        r = _find(v, name)
        if r is not None:
            return r
    return None


def _check_impl(impl: str) -> None:
    if impl == "pallas":
        raise NotImplementedError("attention_impl='pallas' is not implemented yet (the Pallas "
                                  f"indexer/sparse-attention kernels); use one of {ATTENTION_IMPLS}")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def load_model(path: str | os.PathLike, dtype: str = "bfloat16", fp8_activations: bool = True,
               attention_impl: str = "xla", mesh=None, progress: bool = False) -> Model:
    """Load a checkpoint directory in the released HF layout.

    dtype: compute dtype, "bfloat16" (deployment) or "float32". fp8_activations: simulate the
    released FP8 activation quantization (linear inputs, indexer q/k, latent cache).
    attention_impl: "xla" (sparse: gathers the indexer's top-k keys, O(S*k)) or "xla_dense" (a
    masked dense reference, O(S^2)). mesh: a jax Mesh with axes ("expert", "tensor")
    (`sharding.make_mesh`): params are loaded straight into their shards (rules in
    `sharding.rules`) and the forward runs SPMD-partitioned by XLA.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _check_impl(attention_impl)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    from dsv32_jax.checkpoint import orbax_layout  # a dir written by `dsv32 convert`

    converted = orbax_layout.is_orbax_dir(path)
    if not converted and not is_hf_dir(path):
        raise ValueError(f"{path}: not a Hugging Face checkpoint directory (expected config.json "
                         "and *.safetensors) nor one converted by `dsv32 convert` (manifest.json, "
                         "config.json and params/)")
    if converted:
        cfg = orbax_layout.load_config(path, dtype=dtype, fp8_activations=fp8_activations)
    else:
        cfg = Config.from_hf(path, dtype=dtype, fp8_activations=fp8_activations)
    shardings = None
    if mesh is not None:
        from sharding import param_shardings

        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (see sharding.make_mesh), got {type(mesh)}")
        shardings = param_shardings(abstract_params(cfg), mesh)
    if converted:  # Orbax restores each leaf's shards straight onto their devices
        return Model(cfg, orbax_layout.restore_params(path, cfg, shardings), attention_impl)
    return Model(cfg, load_params(path, cfg, shardings, progress=progress), attention_impl)
