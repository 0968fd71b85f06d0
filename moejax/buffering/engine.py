"""Buffered decoding: a model whose routed experts live in a host store, decoded by `moejax.generate`'s own
jitted loop. `buffered(model, ...)` returns the model with the `slots.Buffered` experts backend and an empty
slot cache per MoE layer; `generate` runs it and reads back, per MoE layer, what each forward call
requested (the trace), what was prefetched for it and the cache's counters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from moejax.buffering.cache import check_policy
from moejax.buffering.slots import Buffered, HostCopies, SlotState, init_state, quantize_int8
from moejax.experts import ExpertState, Resident
from moejax.generate import decode
from moejax.models import with_experts
from moejax.models.transformer import CausalLM


def host_memory_kind(device: jax.Device | None = None) -> str | None:
    """The one place that picks where host-stored experts live: `pinned_host` where the device offers it
    (GPU/TPU: a slice of it moves to device memory inside the jitted loop as a DMA), else None: device
    memory, as on the CPU backend (whose memory kinds are unreliable; there host and device memory are one)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


def expert_bytes(model: CausalLM) -> int:
    """Bytes of one routed expert (every weight and bias of it) of the model's first MoE layer."""
    block = model.moe_blocks()[0]
    return int(sum(w.nbytes for w in jax.tree.leaves(block.expert_weights())) // block.config.num_experts)


def buffered(model: CausalLM, cache_size: int, policy: str = "lifo", *, future: dict | None = None,
             prefetch: bool = False, low_precision: str | None = None, memory_kind: str | None = "auto") -> CausalLM:
    """The same model with its routed experts in a host store and `cache_size` device slots per MoE layer,
    evicting by `policy` (`buffering.POLICIES`). future (belady): per MoE layer index, its trace of forward
    calls (prefill first) as `generate(...).trace` records it. prefetch: load the next MoE layer's predicted
    experts one layer early. low_precision="int8": demand misses copy int8 experts (see slots). memory_kind:
    of the store; "auto" is host_memory_kind(). The caller's model is left as it was."""
    check_policy(cache_size, policy)
    if policy == "belady" and future is None:
        raise ValueError("policy 'belady' needs the future trace: pass future=trace from record_trace(...)")
    blocks = model.moe_blocks()
    if not blocks:
        raise ValueError("the model has no MoE layer: there are no experts to buffer")
    for block in blocks:
        if block.runtime.sharded or not isinstance(block.runtime.experts, (Resident, Buffered)):
            raise ValueError(f"layer {block.layer} runs experts backend {block.runtime.experts!r}; buffering "
                             "takes a model whose experts are resident on one device")
        block.require_stacked_experts("buffering")
    layers = [b.layer for b in blocks]
    if future is not None and set(future) != set(layers):
        raise ValueError(f"future has layers {sorted(future)}; the model's MoE layers are {layers}")
    device = jax.devices()[0]
    kind = host_memory_kind(device) if memory_kind == "auto" else memory_kind
    new = with_experts(model, Buffered(int(cache_size), policy, prefetch=prefetch, low_precision=low_precision,
                                       host_memory=kind))
    new = nnx.merge(*nnx.split(new))  # new Variables: the store below must not move the caller's weights
    host = None if kind is None else jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
    for block in new.moe_blocks():
        weights = block.expert_weights()
        block.expert_state = ExpertState(init_state(weights, cache_size, None if future is None else future[block.layer]))
        if low_precision is not None:
            leaves, tree = jax.tree.flatten(weights)
            pairs = [quantize_int8(w) for w in leaves]
            quantized = (tree.unflatten([q for q, _ in pairs]), tree.unflatten([s for _, s in pairs]))  # (int8, scales)
            block.extra_weights = HostCopies(quantized if host is None else jax.device_put(quantized, host))
        if host is not None:
            for w in block.expert_variables():
                if w is not None:
                    w.set_value(jax.device_put(w.get_value(), host))
    return new


def _slot_states(state: nnx.State) -> dict[int, SlotState]:
    """MoE layer index -> its SlotState, from the ExpertState variables of a model's state."""
    return {path[1]: v.get_value() for path, v in nnx.to_flat_state(state) if path[-1] == "expert_state"}


def device_bytes(model: CausalLM) -> int:
    """Device memory the buffered model's slots hold, all MoE layers."""
    return int(sum(s.nbytes for b in model.moe_blocks() for s in jax.tree.leaves(b.expert_state.get_value().slots)))


class BufferedGeneration(NamedTuple):
    tokens: np.ndarray  # int32 [B, max_new_tokens]
    trace: dict  # MoE layer index -> per forward call (prefill first), the active experts
    predictions: dict  # MoE layer index -> per forward call, the experts prefetched for it (None: none)
    stats: dict  # MoE layer index -> CacheStats (prefill and decode)
    prefill_stats: dict  # MoE layer index -> CacheStats after the prefill (decode alone: stats - prefill_stats)
    caches: dict  # MoE layer index -> SlotState after the last call (the slots and who holds them)


def generate(model: CausalLM, prompt, max_new_tokens: int = 16, *, cache_size: int | None = None,
             policy: str = "lifo", future: dict | None = None, prefetch: bool = False,
             low_precision: str | None = None, **sampling) -> BufferedGeneration:
    """moejax.generate with buffered experts: the same loop, prompts, sampling and stop rules (sampling:
    generate's key, temperature, top_p, stop_tokens, pad_token_id); greedy by default. `model`: a CausalLM
    (then cache_size is required and the cache options apply) or a `buffered(...)` model (its options
    apply). Every call starts from the model's cache as `buffered` made it (empty)."""
    blocks = model.moe_blocks()
    if not (blocks and all(isinstance(b.runtime.experts, Buffered) for b in blocks)):
        if cache_size is None:
            raise ValueError("cache_size (expert slots per MoE layer) is required with a model that is not buffered")
        model = buffered(model, cache_size, policy, future=future, prefetch=prefetch, low_precision=low_precision)
    out = decode(model, prompt, max_new_tokens, record_loads=True, **sampling)
    calls = int(out.steps) + 1
    kept, predicted = np.asarray(out.kept_loads)[:calls], np.asarray(out.predictions)[:calls]
    blocks = model.moe_blocks()
    trace, predictions = {}, {}
    for j, block in enumerate(blocks):
        trace[block.layer] = [tuple(np.flatnonzero(kept[t, j]).tolist()) for t in range(calls)]
        predicts = block.prefetches and j > 0  # the first MoE layer has no earlier layer to predict it
        predictions[block.layer] = [tuple(np.flatnonzero(predicted[t, j]).tolist()) if predicts else None
                                    for t in range(calls)]
    size = expert_bytes(model)
    caches = _slot_states(out.expert_states)
    stats = {i: s.cache_stats(size) for i, s in caches.items()}
    prefill_stats = {i: s.cache_stats(size) for i, s in _slot_states(out.prefill_expert_states).items()}
    return BufferedGeneration(np.asarray(out.tokens), trace, predictions, stats, prefill_stats, caches)


def record_trace(model: CausalLM, prompt, max_new_tokens: int = 16, **sampling) -> dict:
    """Per MoE layer, per forward call (prefill, then each decode step), the active experts: a buffered run
    with every expert resident (the same computation as any buffered run, so belady can replay it)."""
    run = generate(model, prompt, max_new_tokens, cache_size=model.config.num_experts, policy="lru", **sampling)
    return run.trace

