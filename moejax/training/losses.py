"""Training losses: next-token cross-entropy plus the router auxiliaries (Switch load balance, ST-MoE
z-loss), from one forward of the model itself: its routings carry the router logits.

The experts step differs from inference. Inference is dropless, but on the CPU its fast path (a dynamic
loop) cannot be differentiated, and the differentiable jax.lax.ragged_dot is about 10x slower there,
forward and backward. `for_training` therefore gives the model Switch/GShard capacity buffers
(`moejax.experts.CapacityBuffers`) by default: each expert computes at most `capacity_factor * T * k / E`
of its pairs in one dense batched matmul; the pairs past that pass through the residual only, in training
only (under the load-balancing loss they are few). capacity_factor=0 trains dropless with ragged_dot.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.experts import CapacityBuffers, Resident
from moejax.models import with_experts
from moejax.models.transformer import CausalLM

# jax.lax.ragged_dot is reverse-differentiable; the CPU's default "xla" experts path (a dynamic loop) is not.
DROPLESS_IMPLEMENTATION = "ragged_dot"


def for_training(model: CausalLM, capacity_factor: float = 2.0) -> CausalLM:
    """The same model (parameters shared) with a differentiable experts backend: capacity buffers at
    `capacity_factor`, or dropless ragged_dot for 0."""
    experts = Resident(DROPLESS_IMPLEMENTATION) if capacity_factor == 0 else CapacityBuffers(capacity_factor)
    return with_experts(model, experts)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    load_balance: float = 0.01  # Switch Transformer auxiliary loss coefficient
    router_z: float = 0.001  # ST-MoE router z-loss coefficient


class LossTerms(NamedTuple):
    total: jax.Array
    cross_entropy: jax.Array  # mean over predicted tokens
    load_balance: jax.Array  # mean over MoE layers; 1.0 when perfectly balanced
    router_z: jax.Array  # mean over MoE layers


def load_balance_loss(router_probs: jax.Array, experts: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Switch Transformer: E * sum_e f_e * P_e over real tokens; f_e the fraction of (token, expert)
    pairs routed to e, P_e the mean router probability of e. 1.0 for a perfectly uniform router."""
    num_experts = router_probs.shape[-1]
    weight = token_mask.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    routed = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=1)  # [T, E]
    fraction = (routed * weight[:, None]).sum(0) / (count * experts.shape[1])
    mean_prob = (router_probs * weight[:, None]).sum(0) / count
    return num_experts * jnp.sum(fraction * mean_prob)


def router_z_loss(router_logits: jax.Array, token_mask: jax.Array) -> jax.Array:
    """ST-MoE: mean over real tokens of logsumexp(router logits)^2 (keeps router logits small)."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    weight = token_mask.astype(jnp.float32)
    return (z * z * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def lm_loss(model: CausalLM, batch: tuple, weights: LossWeights) -> LossTerms:
    """The Trainer's loss of a language model: batch = (tokens [B, T+1],) or (tokens, token_mask)."""
    tokens = batch[0].astype(jnp.int32)
    mask = batch[1].astype(bool) if len(batch) > 1 else jnp.ones(tokens.shape, bool)
    return loss_terms(model, tokens, mask, weights)


def loss_terms(model: CausalLM, tokens: jax.Array, token_mask: jax.Array, weights: LossWeights) -> LossTerms:
    """Next-token cross-entropy of tokens [B, T+1] (inputs tokens[:, :-1], targets tokens[:, 1:]) plus the
    weighted router auxiliaries; positions whose input or target is padding are excluded. The experts step
    is the model's own (see for_training)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    input_mask = token_mask[:, :-1]
    out = model.forward(inputs, token_mask=input_mask)
    flat_mask = input_mask.reshape(-1)
    return _with_router_terms(_cross_entropy(out.logits, targets, input_mask & token_mask[:, 1:]),
                              [(r, flat_mask) for r in out.routings if r is not None], weights)


def seq2seq_loss(model, batch: tuple, weights: LossWeights) -> LossTerms:
    """The Trainer's loss of an encoder-decoder model: batch = (source [B, S], source_mask, target [B, T+1],
    target_mask), the target starting with the decoder start token; cross-entropy of target[:, 1:] given
    target[:, :-1], plus the router auxiliaries of both stacks' MoE layers over their real tokens."""
    source, source_mask, target, target_mask = (batch[0].astype(jnp.int32), batch[1].astype(bool),
                                                batch[2].astype(jnp.int32), batch[3].astype(bool))
    decoder_mask = target_mask[:, :-1]
    out = model.forward(source, target[:, :-1], source_mask=source_mask, decoder_mask=decoder_mask)
    routed = [(r, source_mask.reshape(-1)) for r in out.encoder_routings if r is not None]
    routed += [(r, decoder_mask.reshape(-1)) for r in out.decoder_routings if r is not None]
    return _with_router_terms(_cross_entropy(out.logits, target[:, 1:], decoder_mask & target_mask[:, 1:]),
                              routed, weights)


def _cross_entropy(logits: jax.Array, targets: jax.Array, counted: jax.Array) -> jax.Array:
    """Mean over the counted positions of -log p(target)."""
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    counted = counted.astype(jnp.float32)
    return -(picked * counted).sum() / jnp.maximum(counted.sum(), 1.0)


def _with_router_terms(cross_entropy: jax.Array, routed: list, weights: LossWeights) -> LossTerms:
    """LossTerms from the cross-entropy and the MoE layers' (Routing, flat token mask) pairs."""
    balance = sum(load_balance_loss(r.scores, r.experts, mask) for r, mask in routed) / max(len(routed), 1)
    z_loss = sum(router_z_loss(r.logits, mask) for r, mask in routed) / max(len(routed), 1)
    total = cross_entropy + weights.load_balance * balance + weights.router_z * z_loss
    return LossTerms(total, cross_entropy, jnp.asarray(balance), jnp.asarray(z_loss))
