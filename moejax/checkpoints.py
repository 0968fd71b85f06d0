"""Load Hugging Face safetensors checkpoints into moejax models; save/restore converted ones with orbax.

Only safetensors is read (no pickle, no remote code). Every tensor is accounted for before the model is
returned: a missing, unexpected or mis-shaped tensor raises an error naming it and its expected shape.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from moejax.capacity import MoEPolicy
from moejax.config import ModelConfig, from_hf_config, to_hf_config
from moejax.models.transformer import CausalLM, Dense, MoEBlock

# Tensors a checkpoint may carry that moejax recomputes instead of reading.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_ORBAX_CONFIG = "moejax_config.json"


def read_config(path: str) -> ModelConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in checkpoint directory {path!r}")
    with open(config_file) as f:
        return from_hf_config(json.load(f))


class _Tensors:
    """The tensors of model.safetensors or of the shards a model.safetensors.index.json names."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.file_of = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, "np") as f:
                self.file_of = {name: single for name in f.keys()}
        else:
            found = sorted(os.listdir(path))
            hint = " (moejax reads safetensors only; convert .bin / .pt files first)" if any(
                n.endswith((".bin", ".pt", ".pth")) for n in found) else ""
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}; "
                                    f"found {found}{hint}")
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        file = self.file_of[name]
        if file not in self._handles:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"checkpoint shard {file!r} (holding {name!r}) is missing")
            self._handles[file] = safe_open(file, "np")
        return self._handles[file]


# A load plan: for each moejax parameter, the checkpoint tensors it is built from (with their expected
# shapes), how to build it from them (transposes, stacking experts), and how to split it back (export).
Source = tuple[str, tuple[int, ...]]


class PlanItem(NamedTuple):
    param: nnx.Param
    sources: list[Source]
    build: Callable[..., np.ndarray]
    split: Callable[[np.ndarray], list[np.ndarray]]


class _Plan:
    def __init__(self):
        self.items: list[PlanItem] = []

    def linear(self, dense: Dense, name: str):
        din, dout = dense.kernel.shape
        self.items.append(PlanItem(dense.kernel, [(f"{name}.weight", (dout, din))], lambda w: w.T, lambda k: [k.T]))
        if dense.bias is not None:
            self.items.append(PlanItem(dense.bias, [(f"{name}.bias", (dout,))], lambda b: b, lambda b: [b]))

    def copy(self, param: nnx.Param, name: str, transpose: bool = False):
        shape = tuple(param.shape)[::-1] if transpose else tuple(param.shape)
        flip = (lambda w: w.T) if transpose else (lambda w: w)
        self.items.append(PlanItem(param, [(name, shape)], flip, lambda w: [flip(w)]))

    def stacked(self, param: nnx.Param, names: list[str], per_expert_shape: tuple[int, ...]):
        """[E, a, b] from E tensors of shape [b, a] (HF Linear weights, one per expert)."""
        self.items.append(PlanItem(param, [(n, per_expert_shape) for n in names],
                                   lambda *ws: np.stack([w.T for w in ws]), lambda w: [we.T for we in w]))


def _experts(plan: _Plan, moe: MoEBlock, prefix: str, names: set[str], mixtral: bool):
    e, d, f = moe.w_gate.shape
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in names:  # transformers v5 in-memory layout (read only): gate_up [E, 2f, d], down [E, d, f]
        plan.items.append(PlanItem(moe.w_gate, [(fused, (e, 2 * f, d))], lambda w: np.swapaxes(w[:, :f], 1, 2), None))
        plan.items.append(PlanItem(moe.w_up, [(fused, (e, 2 * f, d))], lambda w: np.swapaxes(w[:, f:], 1, 2), None))
        plan.items.append(PlanItem(moe.w_down, [(f"{prefix}.experts.down_proj", (e, d, f))],
                                   lambda w: np.swapaxes(w, 1, 2), None))
        return
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    plan.stacked(moe.w_gate, [f"{prefix}.experts.{i}.{gate}.weight" for i in range(e)], (f, d))
    plan.stacked(moe.w_up, [f"{prefix}.experts.{i}.{up}.weight" for i in range(e)], (f, d))
    plan.stacked(moe.w_down, [f"{prefix}.experts.{i}.{down}.weight" for i in range(e)], (d, f))


def _mlp(plan: _Plan, mlp, prefix: str):
    for proj in ("gate_proj", "up_proj", "down_proj"):
        plan.linear(getattr(mlp, proj), f"{prefix}.{proj}")


def _plan(model: CausalLM, names: set[str]) -> _Plan:
    c = model.config
    plan = _Plan()
    plan.copy(model.embed_tokens, "model.embed_tokens.weight")
    plan.copy(model.norm.weight, "model.norm.weight")
    if model.lm_head is not None:
        plan.copy(model.lm_head, "lm_head.weight", transpose=True)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        plan.copy(layer.input_layernorm.weight, f"{p}.input_layernorm.weight")
        plan.copy(layer.post_attention_layernorm.weight, f"{p}.post_attention_layernorm.weight")
        attn = layer.self_attn
        if c.is_mla:
            if c.q_lora_rank is None:
                plan.linear(attn.q_proj, f"{p}.self_attn.q_proj")
            else:
                plan.linear(attn.q_a_proj, f"{p}.self_attn.q_a_proj")
                plan.copy(attn.q_a_layernorm.weight, f"{p}.self_attn.q_a_layernorm.weight")
                plan.linear(attn.q_b_proj, f"{p}.self_attn.q_b_proj")
            plan.linear(attn.kv_a_proj_with_mqa, f"{p}.self_attn.kv_a_proj_with_mqa")
            plan.copy(attn.kv_a_layernorm.weight, f"{p}.self_attn.kv_a_layernorm.weight")
            plan.linear(attn.kv_b_proj, f"{p}.self_attn.kv_b_proj")
        else:
            for proj in ("q_proj", "k_proj", "v_proj"):
                plan.linear(getattr(attn, proj), f"{p}.self_attn.{proj}")
            if attn.q_norm is not None:
                plan.copy(attn.q_norm.weight, f"{p}.self_attn.q_norm.weight")
                plan.copy(attn.k_norm.weight, f"{p}.self_attn.k_norm.weight")
        plan.linear(attn.o_proj, f"{p}.self_attn.o_proj")
        if isinstance(layer.mlp, MoEBlock):
            moe = layer.mlp
            mixtral = c.architecture == "mixtral"
            prefix = f"{p}.block_sparse_moe" if mixtral and f"{p}.block_sparse_moe.gate.weight" in names else f"{p}.mlp"
            plan.copy(moe.router, f"{prefix}.gate.weight", transpose=True)
            _experts(plan, moe, prefix, names, mixtral)
            if moe.shared is not None:
                shared = "shared_experts" if c.architecture == "deepseek_v2" else "shared_expert"
                _mlp(plan, moe.shared, f"{prefix}.{shared}")
            if moe.shared_gate is not None:
                plan.copy(moe.shared_gate, f"{prefix}.shared_expert_gate.weight", transpose=True)
        else:
            _mlp(plan, layer.mlp, f"{p}.mlp")
    return plan


def _sources(plan: _Plan) -> Iterator[Source]:
    for item in plan.items:
        yield from item.sources


def load_pretrained(path: str, dtype="float32", policy: MoEPolicy | None = None, mesh=None,
                    gating: str = "dynamic", **parallel_options) -> CausalLM:
    """A moejax model from a Hugging Face checkpoint directory (config.json + safetensors), or from a
    directory written by `save_converted`. Parameters are cast to `dtype`. With a `mesh`
    (moejax.parallel.make_mesh), the MoE blocks run expert-parallel on it with the given gating
    ("dynamic" or "static") and options (see moejax.parallel.expert_parallel)."""
    model = _load(os.fspath(path), dtype, policy)
    if mesh is not None:
        from moejax import parallel

        model = parallel.expert_parallel(model, mesh, gating, **parallel_options)
    return model


def _load(path: str, dtype, policy: MoEPolicy | None) -> CausalLM:
    if os.path.isfile(os.path.join(path, _ORBAX_CONFIG)):
        return restore_converted(path, policy=policy)
    config = read_config(path)
    dtype = jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, policy=policy, rngs=nnx.Rngs(0)))
    tensors = _Tensors(path)
    names = tensors.names()
    plan = _plan(model, names)

    # Check every name and shape before reading any data, and report all problems at once.
    expected = {}
    for name, shape in _sources(plan):
        expected[name] = shape
    problems = []
    for name, shape in expected.items():
        if name not in names:
            problems.append(f"missing tensor {name!r} (expected shape {shape})")
        elif tensors.shape(name) != shape:
            problems.append(f"tensor {name!r} has shape {tensors.shape(name)}, expected {shape}")
    tied_head = config.tie_word_embeddings and "lm_head.weight" in names
    for name in sorted(names - set(expected)):
        if not _IGNORED.match(name) and not (tied_head and name == "lm_head.weight"):
            problems.append(f"unexpected tensor {name!r} with shape {tensors.shape(name)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"checkpoint {path!r} does not match its config.json "
                         f"({config.architecture}):\n  {shown}")

    for item in plan.items:
        array = item.build(*(tensors.get(name) for name, _ in item.sources))
        item.param.set_value(jnp.asarray(array, dtype=dtype))
    return model


def load_tokenizer(path: str):
    """The checkpoint's tokenizer.json through the `tokenizers` library, or None where there is none."""
    file = os.path.join(os.fspath(path), "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(file)


def save_converted(model: CausalLM, directory: str) -> None:
    """Write the converted parameters with orbax (plus the model config), for a fast `load_pretrained`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "params"), state, force=True)
    with open(os.path.join(directory, _ORBAX_CONFIG), "w") as f:
        json.dump({"config": model.config.to_dict(), "dtype": model.dtype.name}, f)


def restore_converted(directory: str, policy: MoEPolicy | None = None) -> CausalLM:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    with open(os.path.join(directory, _ORBAX_CONFIG)) as f:
        saved = json.load(f)
    config = ModelConfig.from_dict(saved["config"])
    dtype = jnp.dtype(saved["dtype"])
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, policy=policy, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(directory, "params"), abstract_state)
    return nnx.merge(graphdef, state)


def export_pretrained(model: CausalLM, directory: str, tokenizer=None) -> None:
    """Write `model` as a Hugging Face checkpoint of its family (config.json + model.safetensors, and the
    `tokenizers` tokenizer as tokenizer.json if given): the exact inverse of load_pretrained, which
    transformers loads too. Expert-parallel models are exported from their single-device originals."""
    from safetensors.numpy import save_file

    if any(block.runtime.sharded for block in model.moe_blocks()):
        raise ValueError("export_pretrained needs the single-device model (expert weights are permuted on a mesh)")
    hf_config = to_hf_config(model.config, model.dtype)
    mixtral = model.config.architecture == "mixtral"
    tensors = {}
    for item in _plan(model, _mixtral_names(model) if mixtral else set()).items:
        value = np.asarray(jax.device_get(item.param.get_value()))
        for (name, shape), array in zip(item.sources, item.split(value)):
            assert array.shape == shape, (name, array.shape, shape)
            tensors[name] = np.ascontiguousarray(array)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))


def _mixtral_names(model: CausalLM) -> set[str]:
    """Mixtral checkpoints name their MoE blocks block_sparse_moe (the Hub layout transformers writes)."""
    return {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(model.config.num_layers)}
