"""Expert loads: what the router asked for, what the policy kept, and what that means for stragglers.

Load of expert e = N_e / N_bar with N_bar = T * k / E (papers.md A); a device's load sums its experts'.
Everything here takes the `Routing` that a MoE block returns (model.forward(...).routings).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routing import Routing


def expert_counts(r: Routing, *, kept: bool = True, token_mask: jax.Array | None = None,
                  top_k: int | None = None) -> jax.Array:
    """int32 [E]: (token, expert) pairs per expert; kept=False counts what the router asked for, before
    the policy: the first `top_k` columns of r.experts (expanded drop appends candidates after them),
    padding excluded when token_mask [T] is given."""
    num_experts = r.scores.shape[-1]
    experts = r.experts
    if kept:
        mask = r.keep
    else:
        experts = experts[:, :top_k]
        mask = jnp.ones(experts.shape, bool) if token_mask is None else jnp.broadcast_to(
            token_mask.reshape(-1)[:, None], experts.shape)
    return jnp.zeros((num_experts,), jnp.int32).at[experts.reshape(-1)].add(mask.reshape(-1).astype(jnp.int32))


def device_counts(expert_load: jax.Array, device_of_expert: jax.Array | np.ndarray, num_devices: int) -> jax.Array:
    """[..., E] expert loads -> [..., D] loads per device, given each expert's device."""
    one_hot = jax.nn.one_hot(jnp.asarray(device_of_expert), num_devices, dtype=expert_load.dtype)
    return expert_load @ one_hot


def max_over_mean(load: jax.Array) -> jax.Array:
    """The Straggler Effect: busiest over mean (1.0 = perfectly balanced; 0 when nothing is routed)."""
    load = jnp.asarray(load, jnp.float32)
    mean = load.mean(axis=-1)
    return jnp.where(mean > 0, load.max(axis=-1) / jnp.where(mean > 0, mean, 1.0), 0.0)


class LayerLoads(NamedTuple):
    """One MoE layer's loads in one forward call (numpy)."""

    routed: np.ndarray  # [E] pairs the router chose (padding excluded)
    kept: np.ndarray  # [E] pairs the policy kept (under expanded drop, extra local candidates included)
    kept_of_routed: np.ndarray  # [E] the routed pairs among the kept ones
    tokens: int  # real tokens
    tokens_without_experts: int  # real tokens whose every pair was dropped (they pass through the residual only)

    @property
    def drop_rate(self) -> float:
        """Routed pairs dropped / routed pairs (expanded drop's added candidates do not offset drops)."""
        routed = self.routed.sum()
        return float(1 - self.kept_of_routed.sum() / routed) if routed else 0.0

    @property
    def routed_max_over_mean(self) -> float:
        return float(max_over_mean(self.routed))

    @property
    def kept_max_over_mean(self) -> float:
        return float(max_over_mean(self.kept))

    def idle_fraction(self) -> float:
        """Fraction of experts that received no kept pair."""
        return float((self.kept == 0).mean())

    def to_dict(self) -> dict:
        return {"routed": self.routed.tolist(), "kept": self.kept.tolist(),
                "kept_of_routed": self.kept_of_routed.tolist(), "tokens": self.tokens,
                "tokens_without_experts": self.tokens_without_experts, "drop_rate": self.drop_rate,
                "routed_max_over_mean": self.routed_max_over_mean, "kept_max_over_mean": self.kept_max_over_mean}


def layer_loads(routings: Sequence[Routing | None], token_mask: jax.Array,
                top_k: int | None = None) -> dict[int, LayerLoads]:
    """Per MoE layer (by layer index) loads of one forward call; token_mask [B, T] marks real tokens;
    top_k (the model's num_experts_per_tok) is needed to count routed pairs under expanded drop."""
    token_mask = jnp.asarray(token_mask).reshape(-1)
    out = {}
    for layer, r in enumerate(routings):
        if r is None:
            continue
        lost_all = token_mask & ~r.keep.any(axis=-1)
        routed_columns = r._replace(experts=r.experts[:, :top_k], keep=r.keep[:, :top_k])
        out[layer] = LayerLoads(np.asarray(expert_counts(r, kept=False, token_mask=token_mask, top_k=top_k)),
                                np.asarray(expert_counts(r)), np.asarray(expert_counts(routed_columns)),
                                int(token_mask.sum()), int(lost_all.sum()))
    return out


def device_loads(expert_load, device_of_expert, num_devices: int) -> np.ndarray:
    """numpy [..., E] -> [..., D]: the pairs each device of the expert axis computes."""
    return np.asarray(device_counts(jnp.asarray(expert_load, jnp.float32), device_of_expert, num_devices))


def modelled_layer_time(expert_load, device_of_expert, num_devices: int) -> float:
    """The expert-parallel latency model: a layer waits for its most loaded device, whose time is
    proportional to the pairs it computes. In units of one device computing T*k/D pairs (a perfectly
    balanced layer takes 1.0)."""
    load = device_loads(expert_load, device_of_expert, num_devices)
    mean = load.sum() / num_devices
    return float(load.max() / mean) if mean else 0.0


def modelled_speedup(routed, kept, device_of_expert, num_devices: int) -> float:
    """Dropless layer time over the policy's layer time, in the latency model (same T*k unit for both)."""
    routed_dev = device_loads(routed, device_of_expert, num_devices)
    kept_dev = device_loads(kept, device_of_expert, num_devices)
    return float(routed_dev.max() / kept_dev.max()) if kept_dev.max() else float("inf")


def load_trace(model, batches, token_masks=None) -> np.ndarray:
    """int64 [num_batches, num_moe_layers, E]: for each token batch (int [B, T]) and MoE layer, the
    (token, expert) pairs the router chose (padding excluded when token_masks, one bool [B, T] per batch,
    is given). The historical loads that expert placement is fitted on (moejax.placement)."""
    from flax import nnx  # local: only this helper runs models

    top_k = model.config.num_experts_per_tok
    counts = nnx.jit(lambda m, t, mask: [expert_counts(r, kept=False, token_mask=mask, top_k=top_k)
                                         for r in m.forward(t, token_mask=mask).routings if r is not None])
    trace = []
    for i, tokens in enumerate(batches):
        tokens = jnp.asarray(tokens)
        mask = jnp.ones(tokens.shape, bool) if token_masks is None else jnp.asarray(token_masks[i], bool)
        trace.append(np.stack([np.asarray(c) for c in counts(model, tokens, mask)]))
    return np.stack(trace).astype(np.int64)
