"""The public model object: config + params + the engine's jitted functions. `load_model` builds
one. The object holds no compiled state: deleting it frees its params."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from dsv32_jax import native
from dsv32_jax.checkpoint import storage
from dsv32_jax.checkpoint.hf import has_mtp_layer, is_hf_dir, load_mtp_params, load_params
from dsv32_jax.checkpoint.weights import abstract_params
from dsv32_jax.engine import batch
from dsv32_jax.engine import generate as gen
from dsv32_jax.model.attention import ATTENTION_IMPLS
from dsv32_jax.model.config import DTYPES, Config
from dsv32_jax.model.config import cdiv
from dsv32_jax.model.transformer import init_cache
from dsv32_jax.shardings import param_shardings
from sharding.mesh import on_mesh
from sharding.rules import MESH_AXES


class Model:
    """DeepSeek-V3.2 with its params. `logits(tokens)` is one forward from position 0."""

    def __init__(self, config: Config, params: dict, attention_impl: str = "xla",
                 mtp: dict | None = None):
        _check_impl(attention_impl)
        self.config = config
        self.params = params
        self.attention_impl = attention_impl
        self.mtp = mtp  # the MTP layer's params (`load_mtp`), for speculative decoding, or None

    def _tokens(self, tokens) -> np.ndarray:
        t = np.asarray(tokens)
        if t.ndim != 2 or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"tokens must be an int array of shape (batch, seq), got {t.dtype} {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{t.min()}, {t.max()}]")
        if t.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {t.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_seq_len}")
        return t.astype(np.int32)

    def _prefill_all(self, tokens, collect: bool):
        """The production prefill (chunked, into a cache) with logits at every position."""
        t = self._tokens(tokens)
        b, s = t.shape
        chunk = min(gen.PREFILL_CHUNK, s)
        padded = cdiv(s, chunk) * chunk
        t = np.pad(t, ((0, 0), (0, padded - s)))
        with on_mesh(self.params):
            cache = init_cache(self.config, b, padded)
        logits, _, inter = gen.prefill(self.params, self.config, self.attention_impl, t,
                                       np.full(b, s, np.int32), cache, chunk=chunk,
                                       all_logits=True, collect=collect)
        if padded != s:  # pad queries sit after every real one: causality keeps them out
            logits = logits[:, :s]
            inter = None if inter is None else _cut(inter, s, padded)
        return logits, inter

    def logits(self, tokens) -> jax.Array:
        """tokens int (B, S) -> float32 logits (B, S, vocab), every position."""
        return self._prefill_all(tokens, collect=False)[0]

    def logits_and_intermediates(self, tokens) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits plus per-layer values of the same (production, chunked, cached) computation,
        stacked over all layers: attn_in/attn_out/ffn_in/ffn_out (L,B,S,D), index_scores
        (L,B,S,T) before the causal mask, topk (L,B,S,k) (unsorted, -1: no pick), gate_experts
        (L_moe, B*S, top_k) sorted."""
        return self._prefill_all(tokens, collect=True)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 0.95, seed: int = 0, stop_tokens: list[int] | None = None,
                 speculative: int = 0, stats: dict | None = None) -> list[list[int]]:
        """Continue each prompt (token ids) by up to max_new_tokens tokens, on the serving
        engine's core (`engine.batch`: each prompt a request, sequence i seeded seed + i).
        temperature=0 is greedy; sampling is nucleus (top_p). Each sequence stops after emitting
        a stop token (default: EOS), which is included in its output. speculative=k (1..3): k
        tokens drafted by the MTP layer (load_model(mtp=True)) per forward of the model
        (`engine.speculative`: the same greedy tokens, the same distribution). `stats` (a dict)
        receives prefill_s, decode_s (the engine's prefill and decode steps, compiles included),
        prefill_tokens, and with speculative iterations (per sequence) and accepted (k,): how
        many of them accepted their j-th draft."""
        return batch.generate(self, prompts, max_new_tokens, temperature, top_p, seed,
                              stop_tokens, speculative, stats)

    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int,
                        temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                        stop_tokens: list[int] | None = None, stats: dict | None = None):
        """Like generate, but yields, token by token, each sequence's next new token (None once
        it has ended). `stats`, if given, receives generate's and decode_steps at the end."""
        return batch.stream(self, prompts, max_new_tokens, temperature, top_p, seed, stop_tokens,
                            stats)

    def chat_session(self, max_len: int | None = None, on_compile=None, speculative: int = 0):
        """A `ChatSession`: multi-turn generation that continues from its own cache
        (speculative=k: k tokens drafted by the MTP layer per forward, as `generate`)."""
        from dsv32_jax.engine.session import ChatSession

        return ChatSession(self, max_len, on_compile, speculative)


def _cut(inter: dict, s: int, padded: int) -> dict:
    """Intermediates of a padded prompt -> those of its first s positions (and keys)."""
    out = {}
    for name, v in inter.items():
        if name == "gate_experts":
            v = v.reshape(v.shape[0], -1, padded, v.shape[-1])[:, :, :s]
            out[name] = v.reshape(v.shape[0], -1, v.shape[-1])
        elif name == "index_scores":
            out[name] = v[:, :, :s, :s]
        else:
            out[name] = v[:, :, :s]
    return out


def _check_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


def load_model(path: str | os.PathLike, dtype: str = "bfloat16", fp8_activations: bool = True,
               attention_impl: str = "xla", mesh=None, progress: bool = False,
               ep_capacity_factor: float | None = None, matmul_impl: str = "xla",
               mtp: bool = False, weights: str = "auto") -> Model:
    """Load a checkpoint directory in the released HF layout.

    dtype: compute dtype, "bfloat16" (deployment) or "float32". fp8_activations: simulate the
    released FP8 activation quantization (linear inputs, indexer q/k, latent cache).
    attention_impl: "xla" (sparse: gathers the indexer's top-k keys, O(S*k)), "xla_dense" (a
    masked dense reference, O(S^2)) or "pallas" (the `pallas_kernels` indexer, top-k and sparse
    MLA; interpreted off GPU). mesh: a jax Mesh with axes ("data", "expert", "tensor")
    (`sharding.make_mesh`): params are loaded straight into their shards (rules in
    `sharding.rules`; in a multi-process run each process reads only its devices' shards), the
    caches are created in shards, and the routed experts run expert-parallel (all-to-all).
    ep_capacity_factor: None (exact: no routed pick is ever dropped) or f > 0: expert-parallel
    send buffers of f x the mean load, overflow dropped and counted (`sharding.expert_parallel`).
    matmul_impl: "xla" (default, `quant.blockwise_matmul`), "pallas" (the FP8 linear and the
    grouped routed-expert Pallas kernels of `pallas_kernels`; interpreted off GPU) or "native"
    (a CPU host: decode steps' FP8 linears and head by the C++ kernels of `dsv32_jax.native`,
    built on first use; `native.NativeUnavailable` when they cannot be): FP8 checkpoints with
    fp8_activations only (`Config.matmul_impl`). mtp: also load the checkpoint's
    MTP layer (`load_mtp`; one error if it has none) as `Model.mtp`, for speculative decoding.
    weights: how the loaded weights are stored (`checkpoint.storage`): "auto" (default), when the
    params live on CPU devices, keeps the bf16 weights widened to float32 and the FP8 ones
    dequantized to float32 (e4m3 value x block scale, scales dropped; with dtype float32 and
    fp8_activations their e4m3 values in float32 and the scales), made once (the same logits as
    the narrow weights; XLA:CPU would widen them in every step; 4x the FP8 weights' memory), the
    checkpoint's dtypes on accelerators and for the Pallas kernels; "narrow" or "f32" force one.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _check_impl(attention_impl)
    pallas, native_impl = matmul_impl == "pallas", matmul_impl == "native"
    storage.check(weights, pallas, native_impl)
    if native_impl:
        native.require()
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
    cfg = dataclasses.replace(cfg, ep_capacity_factor=ep_capacity_factor, matmul_impl=matmul_impl)
    shardings = None
    if mesh is not None:
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh (see sharding.make_mesh), got {type(mesh)}")
        if matmul_impl != "xla" and mesh.size > 1:
            raise NotImplementedError(f"matmul_impl={matmul_impl!r} on a mesh of several devices "
                                      "is not implemented yet (the kernels are not wrapped per "
                                      "shard); use matmul_impl='xla' with a mesh")
        if tuple(mesh.axis_names) != MESH_AXES:
            raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected {MESH_AXES} "
                             "(sharding.make_mesh(data=, expert=, tensor=))")
        shardings = param_shardings(abstract_params(cfg), mesh)
    if converted:  # Orbax restores each leaf's shards straight onto their devices
        params = orbax_layout.restore_params(path, cfg, shardings, progress=progress)
    else:
        params = load_params(path, cfg, shardings, progress=progress)
    deq = storage.dequantize_for(cfg)
    params = storage.store(params, weights, pallas, deq, native_impl)
    mtp_params = (storage.store(load_mtp(path, cfg, mesh), weights, pallas, deq, native_impl)
                  if mtp else None)
    return Model(cfg, params, attention_impl, mtp_params)


def has_mtp(path: str | os.PathLike, cfg: Config) -> bool:
    """Whether the checkpoint `path` (HF, or converted) holds the multi-token-prediction layer."""
    from dsv32_jax.checkpoint import orbax_layout
    from dsv32_jax.checkpoint.safetensors import ShardedCheckpoint

    if orbax_layout.is_orbax_dir(path):
        return bool(orbax_layout.read_manifest(path).get("mtp"))
    with ShardedCheckpoint(path) as ckpt:
        return has_mtp_layer(ckpt, cfg)


def load_mtp(path: str | os.PathLike, cfg: Config, mesh=None) -> dict:
    """The multi-token-prediction layer's params (`dsv32_jax.model.mtp`) of the checkpoint that
    `load_model` loaded as `cfg` (its `Model.config`), HF or converted with --include-mtp, placed
    like the model's on `mesh`. A checkpoint without it: one error saying so."""
    from dsv32_jax.checkpoint import orbax_layout

    path = os.fspath(path)
    shardings = None
    if mesh is not None:
        shardings = param_shardings(abstract_params(cfg, mtp=True), mesh).get("mtp")
    if orbax_layout.is_orbax_dir(path):
        return orbax_layout.restore_mtp(path, shardings)
    return load_mtp_params(path, cfg, shardings)
