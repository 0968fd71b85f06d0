"""Model definitions and the functions that return a model with another MoE runtime."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from moejax.capacity import MoEPolicy
from moejax.config import ModelConfig
from moejax.models.moe import EXPERT_STORAGES, check_expert_storage  # noqa: F401 (EXPERT_STORAGES: re-exported)
from moejax.models.transformer import CausalLM
from moejax.runtime import MoERuntime


def with_runtime(model: CausalLM, runtime: MoERuntime | Sequence[MoERuntime]) -> CausalLM:
    """The same model (parameters shared, not copied) with `runtime` in every MoE block, or one runtime
    per MoE block. The caller's model is left as it was."""
    new = nnx.merge(*nnx.split(model))
    blocks = new.moe_blocks()
    runtimes = [runtime] * len(blocks) if isinstance(runtime, MoERuntime) else list(runtime)
    if len(runtimes) != len(blocks):
        raise ValueError(f"with_runtime: {len(runtimes)} runtimes for {len(blocks)} MoE blocks")
    for block, r in zip(blocks, runtimes):
        if not isinstance(r, MoERuntime):
            raise TypeError(f"with_runtime: expected a moejax.runtime.MoERuntime; got {type(r).__name__}")
        r.layout_for(block.config.num_experts)  # fails now, not at the first call
        block.runtime = r  # a fresh module: nobody else holds it
    return new


def with_policy(model: CausalLM, policy: MoEPolicy) -> CausalLM:
    """The same model (parameters shared, not copied) with `policy` in every MoE block; each block keeps its
    experts backend and layout."""
    if not isinstance(policy, MoEPolicy):
        raise TypeError(f"policy must be a moejax.MoEPolicy; got {type(policy).__name__}")
    return with_runtime(model, [dataclasses.replace(b.runtime, policy=policy) for b in model.moe_blocks()])


def with_experts(model: CausalLM, experts) -> CausalLM:
    """The same model with another experts backend (an object or a name of moejax.experts.BACKENDS)."""
    return with_runtime(model, [dataclasses.replace(b.runtime, experts=experts) for b in model.moe_blocks()])


def with_expert_storage(model: CausalLM, storage: str) -> CausalLM:
    """The same model with its routed experts held as `storage` (EXPERT_STORAGES): "stacked" (what every
    experts backend, buffering and checkpoint takes) or "split" (each expert's own arrays: the CPU's experts
    step reads them in place instead of copying each active expert first, so CPU decode is faster; compile
    time grows with the number of experts; expert_parallel keeps it, each device's local experts split).
    Every other parameter is shared; the experts' new arrays are copies, and the caller's model keeps its own
    until it is dropped (load_pretrained(..., expert_storage="split") splits as it loads, holding no second
    copy)."""
    check_expert_storage(storage)
    new = nnx.merge(*nnx.split(model))  # new Variables and modules: the caller's blocks are not touched
    for block in new.moe_blocks():
        block.hold_experts(storage)
    return new


def random_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32, policy: MoEPolicy | None = None) -> CausalLM:
    """A randomly initialised model (normal(0, 0.02) weights) for tests, demos and benchmarks."""
    return CausalLM(config, dtype=dtype, policy=policy, rngs=nnx.Rngs(seed))
