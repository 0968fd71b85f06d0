"""Model definitions and helpers that act on whole models."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.capacity import MoEPolicy
from moejax.config import ModelConfig
from moejax.models.transformer import CausalLM


def with_policy(model: CausalLM, policy: MoEPolicy) -> CausalLM:
    """The same model (parameters shared, not copied) with `policy` in every MoE block."""
    if not isinstance(policy, MoEPolicy):
        raise TypeError(f"policy must be a moejax.MoEPolicy; got {type(policy).__name__}")
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    for block in new.moe_blocks():
        block.policy = policy
    return new


def random_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32, policy: MoEPolicy | None = None) -> CausalLM:
    """A randomly initialised model (normal(0, 0.02) weights) for tests, demos and benchmarks."""
    return CausalLM(config, dtype=dtype, policy=policy, rngs=nnx.Rngs(seed))
