"""Routing traces of an encoder-decoder model: per batch and MoE layer, the pairs each expert was routed,
each stack over its own real tokens (the historical loads expert placement fits on, moejax.placement)."""

from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import stats


def load_trace(model, batches: Iterable[tuple]) -> np.ndarray:
    """int64 [num_batches, num_moe_layers, E]: for each batch (source_ids, source_mask, decoder_input_ids,
    decoder_mask) and MoE layer (the model's numbering, encoder layers first), the (token, expert) pairs the
    router chose, padding excluded: moejax.stats.load_trace for an encoder-decoder model (teacher-forced
    decoder inputs; decode steps' loads come from moejax.generate.decode(record_loads=True))."""
    top_k = model.config.num_experts_per_tok

    def counts(m, source, source_mask, target, target_mask):
        out = m.forward(source, target, source_mask=source_mask, decoder_mask=target_mask)
        pairs = [(r, source_mask) for r in out.encoder_routings] + [(r, target_mask) for r in out.decoder_routings]
        return [stats.expert_counts(r, kept=False, token_mask=mask.reshape(-1), top_k=top_k) for r, mask in pairs
                if r is not None]

    jitted = nnx.jit(counts)
    trace = [np.stack([np.asarray(c) for c in jitted(model, *(jnp.asarray(a) for a in batch))]) for batch in batches]
    return np.stack(trace).astype(np.int64)
