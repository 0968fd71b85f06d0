"""The expert cache on the device, inside the jitted decode loop: `Buffered`, the experts backend of a model
whose routed experts live in a host store, with `cache_size` device slots per MoE layer.

Its state (`SlotState`: the slots, the expert <-> slot maps, the policy's clocks, the counters) is a pytree
that the MoE block carries in an `ExpertState` variable, so `moejax.generate`'s while loop carries it from
step to step: a decode step makes no host round trip. A step serves its active experts one at a time in
ascending id order (the semantics of `buffering.cache`): a miss picks its slot by the policy, copies the
expert in from the host store (a dynamic slice of the store, moved to device memory inside the graph), and
the expert's rows are computed right after its own request, so an expert evicted later in the same step
has already run. That streams a step with more active experts than slots at no extra cost and makes
exactly the decisions `buffering.simulate` makes (tests). Prefetch (the next MoE layer's router on this
layer's residual stream) loads predicted experts a layer early, evicting by the same policy with the
prediction as the current step. `low_precision="int8"`: a demand miss copies an int8 copy of the expert
(per-output-channel scales; a quarter of the f32 bytes) and computes with it, dequantized into its slot;
prefetched experts, which have a layer to arrive, come in full precision.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import dispatch
from moejax.buffering.cache import CacheStats, check_policy, normalize_trace
from moejax import experts as experts_lib
from moejax.experts import ExpertsOutput, ExpertWeights
from moejax.kernels.xla import Xla, bits, ffn_rows, group_rows, unbits

STATS = tuple(f.name for f in dataclasses.fields(CacheStats) if f.name != "expert_bytes")
_S = {name: i for i, name in enumerate(STATS)}
LOW_PRECISION = (None, "int8")
_NEVER = np.int32(2**30)  # belady: "no later request"


class HostCopies(nnx.Variable):
    """Constant extra copies of a block's routed experts in the host store (the int8 copies and their scales)."""


class SlotState(NamedTuple):
    slots: ExpertWeights  # the experts' leaves over S slots ([S, d, f], ...) in the model's dtype
    slot_of: jax.Array  # int32 [E]: each expert's slot, -1 if not resident
    expert_of: jax.Array  # int32 [S]: each slot's expert, -1 if free
    loaded_at: jax.Array  # int32 [S]: tick of the load
    last_used: jax.Array  # int32 [S]: tick of the last request (a load counts)
    uses: jax.Array  # int32 [S]: requests since the load
    unused_prefetch: jax.Array  # bool [S]: prefetched, not requested yet
    prediction: jax.Array  # bool [E]: experts predicted for the next step
    has_prediction: jax.Array  # bool []
    tick: jax.Array  # int32 []: orders loads and requests
    position: jax.Array  # int32 []: index of the next request in the flattened request sequence
    step: jax.Array  # int32 []: forward calls served
    stats: jax.Array  # int32 [len(STATS)]: CacheStats' counters
    future_at: jax.Array  # belady: int32 [steps, E], position of e's request in step t (_NEVER: none); else [0, E]
    future_next: jax.Array  # belady: int32 [steps + 1, E], first position of e's request in steps >= t

    def cache_stats(self, expert_bytes: int = 0) -> CacheStats:
        values = np.asarray(jax.device_get(self.stats))
        return CacheStats(**{name: int(v) for name, v in zip(STATS, values)}, expert_bytes=int(expert_bytes))


def future_tables(future, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """belady's view of a layer's trace: per step and expert its position in the flattened request sequence."""
    steps = normalize_trace(future, "future")
    at = np.full((len(steps), num_experts), _NEVER, np.int32)
    position = 0
    for t, step in enumerate(steps):
        for e in step:
            if e >= num_experts:
                raise ValueError(f"future step {t}: expert id {e} is outside [0, {num_experts})")
            at[t, e] = position
            position += 1
    following = np.minimum.accumulate(np.concatenate([at, np.full((1, num_experts), _NEVER, np.int32)])[::-1])[::-1]
    return at, np.ascontiguousarray(following)


def init_state(weights: ExpertWeights, cache_size: int, future=None) -> SlotState:
    """An empty cache of `cache_size` slots for the host-stored experts `weights` (leaves [E, ...])."""
    num_experts = weights.num_experts
    size = min(int(cache_size), num_experts)  # more slots than experts would only hold zeros
    slots = jax.tree.map(lambda w: jnp.zeros((size,) + w.shape[1:], w.dtype), weights)
    at, following = (np.zeros((0, num_experts), np.int32),) * 2 if future is None else future_tables(future, num_experts)
    zeros = jnp.zeros((size,), jnp.int32)
    return SlotState(slots, jnp.full((num_experts,), -1, jnp.int32), jnp.full((size,), -1, jnp.int32), zeros, zeros,
                     zeros, jnp.zeros((size,), bool), jnp.zeros((num_experts,), bool), jnp.zeros((), bool),
                     jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                     jnp.zeros((len(STATS),), jnp.int32), jnp.asarray(at), jnp.asarray(following))


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[E, din, dout] -> (int8 [E, din, dout], f32 scales [E, 1, dout]): symmetric, per output channel. A bias
    [E, dout] has no input axis: each of its values is its own channel (kept exactly, up to rounding)."""
    scale = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=tuple(range(1, w.ndim - 1)), keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8), scale


def _bump(stats, name, amount=1):
    return stats.at[_S[name]].add(jnp.asarray(amount, jnp.int32))


def _first(mask):
    """Index of the first True (0 if none)."""
    return jnp.argmax(mask)


def _argbest(key, allowed, largest: bool):
    """The slot with the largest (or smallest) key among `allowed`, ties to the lower slot."""
    big = jnp.iinfo(jnp.int32).max
    masked = jnp.where(allowed, key, -big if largest else big)
    return jnp.argmax(masked) if largest else jnp.argmin(masked)


def _all_hits(book: SlotState, order, active) -> SlotState:
    """The bookkeeping of a step whose active experts (bool [E]; `order`: their ids ascending, then padding)
    are all resident: what the request loop would do, at once. Request j of the step gets tick + 1 + j."""
    num_active = active.sum()
    rank = jnp.cumsum(active) - 1  # each active expert's place in the step
    slot_of = jnp.maximum(book.slot_of, 0)
    requested = jnp.zeros(book.expert_of.shape, bool).at[slot_of].max(active)  # per slot
    tick_of_slot = jnp.zeros(book.expert_of.shape, jnp.int32).at[slot_of].max(
        jnp.where(active, book.tick + 1 + rank, 0))
    first_uses = jnp.sum(requested & book.unused_prefetch)
    stats = _bump(_bump(_bump(book.stats, "requests", num_active), "hits", num_active), "prefetch_hits", first_uses)
    return book._replace(last_used=jnp.where(requested, tick_of_slot, book.last_used),
                         uses=book.uses + requested, unused_prefetch=book.unused_prefetch & ~requested,
                         tick=book.tick + num_active, position=book.position + num_active, stats=stats)


def _victim(state: SlotState, policy: str, protected, active):
    """The slot to evict: among resident experts not `protected` (bool [E]); `active` (bool [E]): the step's
    experts (lifo evicts the others first). Mirrors buffering.cache.ExpertCache._victim."""
    resident = state.expert_of >= 0
    expert = jnp.maximum(state.expert_of, 0)
    candidates = resident & ~protected[expert]
    if policy == "lifo":
        inactive = candidates & ~active[expert]
        return _argbest(state.loaded_at, jnp.where(inactive.any(), inactive, candidates), largest=True)
    if policy == "fifo":
        return _argbest(state.loaded_at, candidates, largest=False)
    if policy == "lru":
        return _argbest(state.last_used, candidates, largest=False)
    if policy == "lfu":  # fewest uses, ties to the least recently requested
        fewest = candidates & (state.uses == jnp.min(jnp.where(candidates, state.uses, jnp.iinfo(jnp.int32).max)))
        return _argbest(state.last_used, fewest, largest=False)
    # belady: the expert requested furthest in the future, ties to the lower expert id (the requested expert
    # itself, at `position`, is protected)
    this_step = state.future_at[state.step][expert]
    later_this_step = jnp.where(this_step >= state.position, this_step, _NEVER)
    next_use = jnp.minimum(later_this_step, state.future_next[state.step + 1][expert])
    furthest = candidates & (next_use == jnp.max(jnp.where(candidates, next_use, -1)))
    return _argbest(expert, furthest, largest=False)


@experts_lib.register
@dataclasses.dataclass(frozen=True)
class Buffered:
    """The experts backend of buffered decoding (see the module docstring); static config. host_memory: the
    store's memory kind (None: the store is in device memory, as on the CPU backend)."""

    cache_size: int
    policy: str = "lifo"
    prefetch: bool = False
    low_precision: str | None = None
    host_memory: str | None = None
    name: ClassVar[str] = "buffered"
    stateful: ClassVar[bool] = True

    def __post_init__(self):
        check_policy(self.cache_size, self.policy)
        if self.low_precision not in LOW_PRECISION:
            raise ValueError(f"low_precision={self.low_precision!r}: supported {LOW_PRECISION}")

    def supported(self, layout):
        if layout is not None and layout.mesh is not None:
            return "buffered experts run on one device; the layout has a mesh"
        return None

    # -- the cache's steps

    def _fetch(self, weights, e, low: bool):
        """Expert e's weights (every leaf of the ExpertWeights) from the host store, in device memory, in the
        slots' dtype."""
        full, quantized = weights
        if low:
            q, scales = quantized
            rows = jax.tree.map(lambda q, s, w: (q[e].astype(jnp.float32) * s[e]).astype(w.dtype), q, scales, full)
        else:
            rows = jax.tree.map(lambda w: w[e], full)
        if self.host_memory is not None:  # pinned_host store (GPU/TPU): the slice moves to device memory in-graph
            rows = jax.tree.map(lambda r: jax.device_put(r, jax.memory.Space.Device), rows)
        return rows

    def _place(self, book: SlotState, e, protected, active) -> tuple[SlotState, jax.Array]:
        """The bookkeeping of loading expert e (into the first free slot, else the policy's victim's) ->
        (book, its slot). `book`: the state without its slots (small arrays only)."""
        free = book.expert_of < 0
        has_free = free.any()
        slot = jnp.where(has_free, _first(free), _victim(book, self.policy, protected, active))
        evicted = jnp.where(has_free, -1, book.expert_of[slot])
        slot_of = jnp.where(evicted >= 0, book.slot_of.at[jnp.maximum(evicted, 0)].set(-1), book.slot_of)
        stats = _bump(book.stats, "evictions", evicted >= 0)
        expert_of = book.expert_of.at[slot].set(e)
        stats = stats.at[_S["max_resident"]].max(jnp.sum(expert_of >= 0))
        book = book._replace(slot_of=slot_of.at[e].set(slot), expert_of=expert_of,
                             loaded_at=book.loaded_at.at[slot].set(book.tick),
                             unused_prefetch=book.unused_prefetch.at[slot].set(False), stats=stats)
        return book, slot

    def __call__(self, x, routing, weights, layout, activation, state: SlotState):
        """x [N, d] -> (ExpertsOutput, state): one step of requests, each expert computed right after its
        request. weights: (the ExpertWeights as the host store holds them, (int8 copies, scales) or None)."""
        num_experts = routing.scores.shape[-1]
        sent = dispatch.dispatch(x, routing)
        counts = sent.group_sizes
        active = counts > 0
        starts = jnp.cumsum(counts) - counts
        stats = state.stats
        # begin_step: score the prediction made for this step, if any
        p = state.has_prediction
        stats = _bump(stats, "predicted", jnp.where(p, state.prediction.sum(), 0))
        stats = _bump(stats, "predicted_right", jnp.where(p, (state.prediction & active).sum(), 0))
        stats = _bump(stats, "active_predicted_steps", jnp.where(p, active.sum(), 0))
        state = state._replace(stats=stats, has_prediction=jnp.zeros((), bool))
        order = jnp.nonzero(active, size=num_experts, fill_value=0)[0]
        n = sent.rows.shape[0]
        tile, small = Xla().tiles(n, num_experts)
        tile = min(tile, n)
        small = min(small, tile)
        rows_bits = bits(sent.rows)
        compute = ffn_rows(activation)
        low = self.low_precision is not None

        def request(i, carry):
            slots, book, out = carry
            e = order[i]
            tick = book.tick + 1
            book = book._replace(tick=tick, stats=_bump(book.stats, "requests"))
            hit = book.slot_of[e] >= 0
            # the outcome's bookkeeping in a conditional over the small arrays only (a branch carrying the
            # slots would copy them whole on every request); the belady tables stay outside it
            tables = (book.future_at, book.future_next)
            light = book._replace(future_at=(), future_next=())

            def on_hit(light):
                slot = light.slot_of[e]
                stats = _bump(_bump(light.stats, "hits"), "prefetch_hits", light.unused_prefetch[slot])
                return light._replace(stats=stats, unused_prefetch=light.unused_prefetch.at[slot].set(False)), slot

            def on_miss(light):
                full = light._replace(stats=_bump(light.stats, "misses"), future_at=tables[0], future_next=tables[1])
                protected = jnp.zeros((num_experts,), bool).at[e].set(True)
                full, slot = self._place(full, e, protected, active)
                return full._replace(uses=full.uses.at[slot].set(0), future_at=(), future_next=()), slot

            light, slot = jax.lax.cond(hit, on_hit, on_miss, light)
            book = light._replace(future_at=tables[0], future_next=tables[1])
            book = book._replace(last_used=book.last_used.at[slot].set(tick), uses=book.uses.at[slot].add(1),
                                 position=book.position + 1)
            # the copy happens on a miss only; the slot write is one expert's rows in place
            rows = jax.lax.cond(hit, lambda e: jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), slots),
                                lambda e: self._fetch(weights, e, low), e)
            slots = jax.tree.map(lambda s, r: s.at[slot].set(jnp.where(hit, s[slot], r)), slots, rows)
            expert_weights = jax.tree.map(lambda s: unbits(bits(s)[slot], s.dtype), slots)
            out = group_rows(out, rows_bits, sent.rows.dtype, starts[e], starts[e] + counts[e], expert_weights,
                             compute, tile, small)
            return slots, book, out

        def resident(i, out):  # a step whose experts are all resident: compute only, in the same order
            e = order[i]
            expert_weights = jax.tree.map(lambda s: unbits(bits(s)[book.slot_of[e]], s.dtype), state.slots)
            return group_rows(out, rows_bits, sent.rows.dtype, starts[e], starts[e] + counts[e], expert_weights,
                              compute, tile, small)

        # Two loops with complementary trip counts instead of a conditional (which would copy the slots): a
        # step that needs no copy skips the request-by-request bookkeeping, whose outcome it knows at once.
        num_active = active.sum()
        all_hit = jnp.all(jnp.where(active, state.slot_of >= 0, True))
        book = state._replace(slots=())
        out = jnp.zeros((n, x.shape[1]), jnp.float32)
        out = jax.lax.fori_loop(0, jnp.where(all_hit, num_active, 0), resident, out)
        slots, book, out = jax.lax.fori_loop(0, jnp.where(all_hit, 0, num_active), request, (state.slots, book, out))
        book = jax.tree.map(lambda hit, served: jnp.where(all_hit, hit, served), _all_hits(book, order, active), book)
        state = book._replace(slots=slots, step=book.step + 1, stats=_bump(book.stats, "steps"))
        combined = dispatch.combine(out.astype(x.dtype), sent, routing)
        return ExpertsOutput(combined, routing.keep, jnp.zeros((), jnp.int32)), state

    def prefetch_step(self, state: SlotState, predicted, weights) -> SlotState:
        """Load the predicted experts (bool [E]) of the next step that are not resident, ascending, as many as
        fit without evicting another predicted one (ExpertCache.prefetch)."""
        num_experts = predicted.shape[0]
        wanted = predicted & (state.slot_of < 0)
        order = jnp.nonzero(wanted, size=num_experts, fill_value=0)[0]

        def room(state):
            resident_not_predicted = (state.expert_of >= 0) & ~predicted[jnp.maximum(state.expert_of, 0)]
            return (state.expert_of < 0).any() | resident_not_predicted.any()

        def cond(carry):
            i, state = carry
            return (i < wanted.sum()) & room(state)

        def body(carry):
            i, state = carry
            e = order[i]
            book = state._replace(slots=(), tick=state.tick + 1)
            book, slot = self._place(book, e, predicted, predicted)
            book = book._replace(last_used=book.last_used.at[slot].set(book.tick), uses=book.uses.at[slot].set(0),
                                 unused_prefetch=book.unused_prefetch.at[slot].set(True),
                                 stats=_bump(book.stats, "prefetch_loads"))
            rows = self._fetch(weights, e, low=False)
            return i + 1, book._replace(slots=jax.tree.map(lambda s, r: s.at[slot].set(r), state.slots, rows))

        _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
        return state._replace(prediction=predicted, has_prediction=jnp.ones((), bool))

