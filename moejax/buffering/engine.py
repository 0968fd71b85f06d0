"""The buffered engine: a CausalLM run with its routed experts in host memory, as two jitted calls per MoE
layer. A piece ends with the layer's attention and router (the model's own phases); after the host has read
the active experts (the one host round trip per layer), run them through the policy and started the copies
of the misses, `store.experts_step` writes the copies into the slots and computes; the next piece starts
with the block's combine. Output (greedy or sampled with the same key) equals `moejax.generate` with every
expert resident, whose argument checks and next-token step it shares.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import dispatch, stats
from moejax.buffering.cache import CacheStats, check_policy
from moejax.buffering.store import DeviceExpertCache, HostExpertStore, experts_step
from moejax.config import ACTIVATIONS
from moejax.experts import Resident
from moejax.generate import Sampling, decoding, next_tokens, pad_prompts
from moejax.models.attention import KVCache, attention_context, init_cache
from moejax.models.transformer import CausalLM, check_token_ids, output_logits


class _Static:
    """A jit static argument with an O(1) hash and identity equality: hashing an nnx GraphDef walks the whole
    graph (~0.3 ms for a layer), which per call was a large share of a decode step. One canonical _Static
    per distinct value (see `_static`), so identity is equality, also across models."""

    def __init__(self, value, hash_value: int):
        self.value, self._hash = value, hash_value

    def __hash__(self):
        return self._hash


_CANONICAL_LIMIT = 256  # distinct static values kept; an evicted one only costs a compile if seen again
_CANONICAL: collections.OrderedDict[int, list[_Static]] = collections.OrderedDict()


def _static(value) -> _Static:
    """The canonical _Static of a hashable value (equal values share one, and so share compiles). A bounded
    LRU: a long session that builds many models does not grow it forever."""
    h = hash(value)
    bucket = _CANONICAL.setdefault(h, [])
    _CANONICAL.move_to_end(h)
    for candidate in bucket:
        if candidate.value == value:
            return candidate
    bucket.append(_Static(value, h))
    while len(_CANONICAL) > _CANONICAL_LIMIT:
        _CANONICAL.popitem(last=False)
    return bucket[-1]


def _strip_experts(layer_state):
    """A MoE layer's state without its routed experts' weights (they live in the host store)."""
    for name in ("w_gate", "w_up", "w_down"):
        layer_state["mlp"][name] = jnp.zeros((0,), layer_state["mlp"][name][...].dtype)
    return layer_state


class _Segment(NamedTuple):
    """The static part of one jitted piece of a buffered forward call, which runs: the combine of MoE layer
    `finish` (the experts' outputs come from `store.experts_step`; first piece: the embedding instead), the whole
    layers `dense`, then the attention and router of MoE layer `route` (last piece: the final norm and head
    instead) and, with prefetch, the router of the MoE layer after it, `predict`. A forward call is one
    piece per MoE layer plus one; between two, one host round trip (reading the routed layer's active
    experts) and the experts step."""

    finish: int | None
    dense: tuple[int, ...]
    route: int | None
    predict: int | None
    modules: tuple  # per layer index in `layers` order: (graphdef, treedef of its parameter leaves)
    norm: tuple  # (graphdef, treedef) of the final norm
    prefill: bool
    rope: tuple
    sliding_window: int | None

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose modules (parameters) the piece uses."""
        return tuple(i for i in (self.finish, *self.dense, self.route, self.predict) if i is not None)

    @property
    def attention(self) -> tuple[int, ...]:
        """The layers whose attention (and KV cache) the piece runs, in order."""
        return self.dense + ((self.route,) if self.route is not None else ())


def _route(layer, x, mask, decode):
    """A MoE layer's router and policy on the residual stream x [B, T, d] -> (its input h [B*T, d], Routing)."""
    h = layer.ffn_input(x)
    return h, layer.mlp.apply_policy(layer.mlp.route(h, mask), mask, decode)


def _attention_and_route(layer, x, ctx, layer_kv, decode, next_layer):
    """Attention, the router and policy of a MoE layer; with the next MoE layer, its predicted experts (its
    router on this layer's residual stream, through its own post-attention norm)."""
    x, layer_kv = layer.attention_phase(x, ctx, layer_kv)
    mask = ctx.token_mask.reshape(-1)
    h, r = _route(layer, x, mask, decode)
    out = dict(x=x, h=h, r=r, counts=stats.expert_counts(r))
    if next_layer is not None:
        out["predicted"] = stats.expert_counts(_route(next_layer, x, mask, decode)[1])
    return out, layer_kv


def _finish_moe(layer, x, h, acc, r):
    """The block's combine of the experts' per-pair outputs acc [T*k, d] (and its shared experts), into the
    residual."""
    routed = dispatch.weighted_sum(acc, r.weights, r.keep).astype(h.dtype)
    return x + layer.mlp.combine(h, routed).reshape(x.shape)


@functools.partial(jax.jit, static_argnums=0)
def _segment(segment: _Static, params, carry, kv_layers):
    """One piece of a buffered forward call (see _Segment) -> its outputs (a dict).
    params: {"layers": per layer of segment.layers its parameter leaves, "embed" / "norm" + "head" for
    the first / last piece}. carry: the call's context (token_mask, index, and after the prologue cos, sin,
    allowed) and the finished layer's x, h, routing and experts' outputs (acc)."""
    s = segment.value
    modules = {i: nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
               for i, (graphdef, treedef), leaves in zip(s.layers, s.modules, params["layers"])}
    decode = not s.prefill
    index = 0 if s.prefill else carry["index"]  # a static 0 lets prefill attention skip future key slots
    out = {}
    if s.finish is None:
        cache = KVCache((), carry["cache_mask"], carry["cache_positions"], index)
        ctx = attention_context(carry["token_mask"], None, cache, s.rope, s.sliding_window)
        out["context"] = ctx._replace(index=None)
        x = params["embed"][carry["tokens"]]
    else:
        ctx = carry["context"]._replace(index=index)
        x = _finish_moe(modules[s.finish], carry["x"], carry["h"], carry["acc"], carry["r"])
    new_kv = []
    for i, layer_kv in zip(s.dense, kv_layers):
        x, layer_kv = modules[i].attention_phase(x, ctx, layer_kv)
        x, _, _ = modules[i].feed_forward_phase(x, ctx, decode)
        new_kv.append(layer_kv)
    if s.route is None:
        norm = nnx.merge(s.norm[0], jax.tree_util.tree_unflatten(s.norm[1], params["norm"]))
        out["logits"] = output_logits(norm, params["head"], x[:, -1])
    else:
        routed, layer_kv = _attention_and_route(modules[s.route], x, ctx, kv_layers[-1], decode,
                                                modules.get(s.predict))
        out.update(routed)
        new_kv.append(layer_kv)
    out["kv"] = tuple(new_kv)
    return out


class BufferedModel:
    """A CausalLM whose routed experts live in host memory, `cache_size` device slots per MoE layer.

    Holds on the device only the non-expert parameters and the slots. `future` (belady): per MoE layer
    index, its trace of steps (as `trace` records it). `prefetch`: load the next MoE layer's predicted
    experts one layer early. `step(...)` runs one forward call (prefill or decode) and records, per MoE
    layer, the step's active experts in `trace`.

    A forward call is one jitted piece per MoE layer plus one (`_Segment`); between two, the host reads the
    routed layer's active experts, runs them through the policy and starts the copies of its misses, and
    `store.experts_step` writes them into the slots and computes the layer's experts.
    """

    def __init__(self, model: CausalLM, cache_size: int, policy: str = "lifo", *, future: dict | None = None,
                 prefetch: bool = False, store: HostExpertStore | None = None):
        check_policy(cache_size, policy)
        if policy == "belady" and future is None:
            raise ValueError("policy 'belady' needs the future trace: pass future=trace from record_trace(...)")
        self.config = model.config
        self.store = store or HostExpertStore(model)
        moe = list(self.store.experts)
        if future is not None and set(future) != set(moe):
            raise ValueError(f"future has layers {sorted(future)}; the model's MoE layers are {moe}")
        self.policy, self.cache_size, self.prefetch_enabled = policy, int(cache_size), prefetch
        num_experts = self.config.num_experts
        if self.cache_size > num_experts:
            self.cache_size = num_experts  # more slots than experts would only hold zeros
        self.caches = {i: DeviceExpertCache(self.store, i, self.cache_size, policy,
                                            None if future is None else future[i]) for i in moe}
        self.trace: dict[int, list[tuple[int, ...]]] = {i: [] for i in moe}
        # per MoE layer, per step: the experts prefetched for it (None: no prediction), aligned with trace
        self.predictions: dict[int, list[tuple[int, ...] | None]] = {i: [] for i in moe}
        self.dtype = model.dtype
        # where a forward call's wall time goes: waiting for the device to deliver each MoE layer's active
        # experts (the device work before it, copies included, that the host did not overlap), and the
        # policy with the start of the copies; the rest is dispatch and Python. (The CPU backend runs part
        # of a small computation inside the dispatching call, so there compute shows up in the rest too.)
        self.seconds = {"waiting_for_routing": 0.0, "policy_and_copies": 0.0}

        modules, leaves = [], []
        for i, layer in enumerate(model.layers):
            graphdef, state = nnx.split(layer)
            layer_leaves, treedef = jax.tree_util.tree_flatten(_strip_experts(state) if i in self.caches else state)
            modules.append((graphdef, treedef))
            leaves.append(tuple(layer_leaves))
        norm_graphdef, norm_state = nnx.split(model.norm)
        norm_leaves, norm_treedef = jax.tree_util.tree_flatten(norm_state)
        embed = model.embed_tokens[...]
        head = embed.T if model.lm_head is None else model.lm_head[...]
        self.activation = ACTIVATIONS[self.config.hidden_act]
        experts = model.moe_blocks()[0].runtime.experts
        if not isinstance(experts, Resident):
            raise ValueError(f"buffering runs a model whose experts are resident on one device; its experts "
                             f"backend is {experts!r}")
        self.implementation = experts.implementation
        # the pieces of a forward call: boundaries at the MoE layers
        self.segments: dict[bool, list[tuple[_Static, dict]]] = {True: [], False: []}
        bounds = [None] + moe + [None]
        for finish, route in zip(bounds, bounds[1:]):
            start = 0 if finish is None else finish + 1
            dense = tuple(range(start, len(model.layers) if route is None else route))
            predict = self._next_moe(route) if prefetch and route is not None else None
            spec = _Segment(finish, dense, route, predict, (), (norm_graphdef, norm_treedef), False,
                            model.rope, self.config.sliding_window)
            spec = spec._replace(modules=tuple(modules[i] for i in spec.layers))
            params = {"layers": tuple(leaves[i] for i in spec.layers)}
            if finish is None:
                params["embed"] = embed
            if route is None:
                params["norm"], params["head"] = tuple(norm_leaves), head
            for prefill in (True, False):
                self.segments[prefill].append((_static(spec._replace(prefill=prefill)), params))

    def _next_moe(self, layer: int) -> int | None:
        """The MoE layer after `layer`, None for the last."""
        later = [i for i in self.caches if i > layer]
        return later[0] if later else None

    def expert_device_bytes(self) -> int:
        return sum(c.device_bytes() for c in self.caches.values())

    def stats(self) -> CacheStats:
        """Summed over MoE layers."""
        return sum((c.stats for c in self.caches.values()), CacheStats())

    def step(self, tokens, token_mask, kv: KVCache, prefill: bool) -> tuple[jax.Array, KVCache]:
        """One forward call over tokens [B, T] at kv.index -> (last position's logits [B, V], updated cache).
        tokens int32 and token_mask bool [B, T]: numpy or jax arrays."""
        index = np.int32(kv.index)  # numpy, not jnp: no eager dispatch
        carry = dict(tokens=tokens, token_mask=token_mask, cache_mask=kv.mask, cache_positions=kv.positions,
                     index=index)
        new_kv = list(kv.layers)
        context = None
        first_moe = next(iter(self.caches))
        for segment, params in self.segments[prefill]:
            s = segment.value
            out = _segment(segment, params, carry, tuple(kv.layers[i] for i in s.attention))
            if s.finish is None:
                context = out["context"]
            for i, layer_kv in zip(s.attention, out["kv"]):
                new_kv[i] = layer_kv
            if s.route is None:
                logits = out["logits"]
                break
            waited = time.perf_counter()
            counts, predicted = jax.device_get((out["counts"], out.get("predicted")))  # the host round trip
            planned = time.perf_counter()
            self.seconds["waiting_for_routing"] += planned - waited
            active = tuple(int(e) for e in np.flatnonzero(counts))
            self.trace[s.route].append(active)
            cache = self.caches[s.route]
            step = cache.plan_step(active)  # its copies start now...
            policy = time.perf_counter() - planned
            acc, cache.slots = experts_step(cache.slots, *step, out["h"], out["r"], self.activation, self.implementation)
            if s.predict is not None:  # ...then the next layer's predicted ones, one layer early
                started = time.perf_counter()
                predicted = tuple(int(e) for e in np.flatnonzero(predicted))
                self.predictions[s.predict].append(predicted)
                self.caches[s.predict].prefetch(predicted)
                policy += time.perf_counter() - started
            self.seconds["policy_and_copies"] += policy
            if not self.prefetch_enabled or s.route == first_moe:
                self.predictions[s.route].append(None)
            carry = dict(index=index, context=context, x=out["x"], h=out["h"], r=out["r"], acc=acc)
        return logits, KVCache(tuple(new_kv), context.key_mask, context.key_positions,
                               kv.index + tokens.shape[1])


@functools.partial(jax.jit, static_argnums=3)
def _next_tokens(logits, key, done, sampling: Sampling):
    """moejax.generate's next-token step, in one dispatch."""
    return next_tokens(logits, key, done, sampling)


class BufferedGeneration(NamedTuple):
    tokens: np.ndarray  # int32 [B, max_new_tokens]
    trace: dict  # MoE layer index -> per forward call (prefill first), the active experts
    predictions: dict  # MoE layer index -> per forward call, the experts prefetched for it (None: none)
    stats: dict  # MoE layer index -> CacheStats (prefill and decode)
    prefill_stats: dict  # MoE layer index -> CacheStats after the prefill (decode alone: stats - prefill_stats)
    decode_seconds: float  # wall time of the decode steps (after prefill), host copies included
    decode_breakdown: dict  # decode_seconds split as BufferedModel.seconds, plus "dispatch_and_other"


def generate(model: CausalLM | BufferedModel, prompt, max_new_tokens: int = 16, *, cache_size: int | None = None,
             policy: str = "lifo", future: dict | None = None, prefetch: bool = False, key: jax.Array | None = None,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens=None,
             pad_token_id: int | None = None) -> BufferedGeneration:
    """moejax.generate with buffered experts: same prompts, sampling and stop rules; greedy by default.

    model: a CausalLM (then cache_size is required) or a BufferedModel (its caches carry over).
    """
    if isinstance(model, CausalLM):
        if cache_size is None:
            raise ValueError("cache_size (expert slots per MoE layer) is required with a CausalLM")
        model = BufferedModel(model, cache_size, policy, future=future, prefetch=prefetch)
    config = model.config
    sampling, key = decoding(config, max_new_tokens, key=key, temperature=temperature, top_p=top_p,
                             stop_tokens=stop_tokens, pad_token_id=pad_token_id)
    tokens, mask = pad_prompts(prompt)
    check_token_ids(np.where(mask, tokens, 0), config.vocab_size)
    kv = init_cache(config, tokens.shape[0], tokens.shape[1] + max_new_tokens, model.dtype)
    logits, kv = model.step(tokens, mask, kv, prefill=True)
    last, key, done = _next_tokens(logits, key, np.zeros(tokens.shape[0], bool), sampling)
    last, done = np.asarray(last), np.asarray(done)
    generated = np.full((tokens.shape[0], max_new_tokens), sampling.pad_token_id, np.int32)
    generated[:, 0] = last
    prefill_stats = {i: dataclasses.replace(c.stats) for i, c in model.caches.items()}
    start, before = time.perf_counter(), dict(model.seconds)
    for step in range(1, max_new_tokens):
        if done.all():
            break
        # finished rows still run, as padding: no cache slot, no expert
        logits, kv = model.step(last[:, None], ~done[:, None], kv, prefill=False)
        last, key, done = _next_tokens(logits, key, done, sampling)
        last, done = np.asarray(last), np.asarray(done)
        generated[:, step] = last
    seconds = time.perf_counter() - start
    breakdown = {k: model.seconds[k] - before[k] for k in before}
    breakdown["dispatch_and_other"] = seconds - sum(breakdown.values())
    return BufferedGeneration(generated, {i: list(t) for i, t in model.trace.items()},
                              {i: list(p) for i, p in model.predictions.items()},
                              {i: c.stats for i, c in model.caches.items()}, prefill_stats, seconds, breakdown)


def record_trace(model: CausalLM, prompt, max_new_tokens: int = 16, **kwargs) -> dict:
    """Per MoE layer, per forward call (prefill, then each decode step), the active experts: a buffered run
    with every expert resident (the same computation as any buffered run, so belady can replay it)."""
    run = generate(model, prompt, max_new_tokens, cache_size=model.config.num_experts, policy="lru", **kwargs)
    return run.trace
