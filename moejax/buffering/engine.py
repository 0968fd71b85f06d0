"""Expert Buffering (papers.md B): every expert's weights in host memory, a few device slots per MoE layer.

Three layers, each usable alone:

- `ExpertCache`: the bookkeeping of one layer's cache (which expert sits in which slot, who is evicted),
  pure Python. `simulate` drives it over a trace; `DeviceExpertCache` drives the same object and moves the
  weights. So the simulator and the real cache cannot disagree on a miss.
- `HostExpertStore` / `DeviceExpertCache`: the weights. Host storage is `pinned_host` memory on GPU/TPU
  (DMA-able, so `jax.device_put` to the device is an asynchronous copy) and numpy arrays on the CPU backend,
  whose memory kinds are unreliable (`host_memory_kind` is the one place that chooses); one flat row per
  expert, so a step's loads are one host -> device call. Each layer's device cache is three [slots, d, f]
  arrays, written in place (donated) inside the jitted step that computes the experts.
- `BufferedModel` / `generate`: the model's own modules, run as two jitted calls per MoE layer: a piece
  that ends with the layer's attention and router, then, after the host has read the active experts (the
  one host round trip per layer), run them through the policy and started the copies of the misses, the
  experts step, which writes the copies into the slots and computes; the next piece starts with the
  combine. Output (greedy or sampled with the same key) equals `moejax.generate` with every expert resident.

Semantics of a step (shared by all of the above). A step's active experts (count > 0) are requested one at
a time in ascending id order; an expert is computed no earlier than its own request, so each layer's
requests form one sequence and the cache is an ordinary paging problem over it (which is what makes
Belady's MIN the optimum, see tests). When a step needs more experts than there are slots, they stream:
the real cache computes the experts already requested in the step (a chunk) just before one of them would
be evicted, then loads the next ones.

Policies choose the victim among resident experts other than the one requested:
  lifo    the paper's: experts inactive in the current step go first; among the group chosen, the most
          recently loaded. Experts run in ascending id order, so the expert loaded last in a step is the
          one with the highest id, requested latest in the next step too: the longest reuse distance among
          the active experts.
  lru     least recently requested (a load counts as a request).
  fifo    earliest loaded.
  lfu     fewest requests since it was loaded; ties to the least recently requested.
  belady  the offline optimum (Belady's MIN): the expert whose next request in the future trace is
          furthest away (never: infinitely far; ties to the lower id). Needs the future trace.

Prefetch (beyond the paper): the next MoE layer's router applied to the current residual stream (after the
attention of this layer, through the next layer's post-attention norm) predicts the next layer's experts;
their copies start one layer early, evicting by the same policy with the predicted set as the current step.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import time
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import kernels
from moejax.config import ACTIVATIONS
from moejax.kernels.grouped_matmul import default_tile
from moejax.generate import pad_prompts, sample_next
from moejax.models.transformer import CausalLM, KVCache, MoEBlock, check_token_ids, init_cache
from moejax.models.rope import rope_angles

POLICIES = ("lifo", "lru", "fifo", "lfu", "belady")


# ---------------------------------------------------------------------------------------------------------
# Bookkeeping: shared by the simulator and the real cache


@dataclasses.dataclass
class CacheStats:
    """Counts of one layer's cache (or of a simulation). Hits + misses = requests."""

    requests: int = 0
    hits: int = 0
    misses: int = 0  # demand loads: the expert was needed and not resident
    evictions: int = 0
    prefetch_loads: int = 0
    prefetch_hits: int = 0  # requests served by a prefetched copy that no request had used yet
    predicted: int = 0  # experts predicted for steps that got a prediction
    predicted_right: int = 0  # of those, the ones the step did use
    active_predicted_steps: int = 0  # active experts in steps that got a prediction
    max_resident: int = 0
    steps: int = 0
    expert_bytes: int = 0  # one expert's weights (gate + up + down), for bytes_moved

    @property
    def miss_rate(self) -> float:
        return self.misses / self.requests if self.requests else 0.0

    @property
    def loads(self) -> int:
        return self.misses + self.prefetch_loads

    @property
    def bytes_moved(self) -> int:
        return self.loads * self.expert_bytes

    @property
    def prediction_recall(self) -> float:
        """Fraction of the active experts that the prediction named."""
        return self.predicted_right / self.active_predicted_steps if self.active_predicted_steps else 0.0

    @property
    def prediction_precision(self) -> float:
        """Fraction of the predicted experts that were active."""
        return self.predicted_right / self.predicted if self.predicted else 0.0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        summed["max_resident"] = max(self.max_resident, other.max_resident)
        summed["expert_bytes"] = max(self.expert_bytes, other.expert_bytes)  # the same model's layers
        return CacheStats(**summed)

    def __sub__(self, earlier: "CacheStats") -> "CacheStats":
        """The counts since the snapshot `earlier` of the same cache (max_resident: the later value)."""
        diff = {f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(self)}
        diff.update(max_resident=self.max_resident, expert_bytes=self.expert_bytes)
        return CacheStats(**diff)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(miss_rate=self.miss_rate, loads=self.loads, bytes_moved=self.bytes_moved,
                   prediction_recall=self.prediction_recall, prediction_precision=self.prediction_precision)
        return out


class Access(NamedTuple):
    """What one request or prefetch did: `expert` sits in `slot`; `loaded`: it was copied in now; `evicted`:
    the expert whose slot it took (None: a free slot or a hit)."""

    expert: int
    slot: int
    loaded: bool
    evicted: int | None


def check_policy(cache_size, policy: str) -> None:
    if isinstance(cache_size, bool) or not isinstance(cache_size, (int, np.integer)) or cache_size < 1:
        raise ValueError(f"cache_size={cache_size!r} must be an integer >= 1 (expert slots per layer)")
    if policy not in POLICIES:
        raise ValueError(f"unknown eviction policy {policy!r}; supported: {POLICIES}")


def _step_ids(step, where: str) -> tuple[int, ...]:
    ids = sorted({int(e) for e in np.asarray(step, dtype=np.int64).reshape(-1)})
    if ids and ids[0] < 0:
        raise ValueError(f"{where}: expert id {ids[0]} is negative")
    return tuple(ids)


def normalize_trace(requests: Iterable, name: str = "requests") -> list[tuple[int, ...]]:
    """Per step, any iterable of expert ids -> sorted unique tuples (a step's active set)."""
    return [_step_ids(step, f"{name}[{t}]") for t, step in enumerate(requests)]


class ExpertCache:
    """One layer's cache bookkeeping: `size` slots, an expert -> slot map, an eviction policy.

    Drive it with, per step, `begin_step(active)`, then `request(e)` for each active expert in ascending
    order, then `end_step()`; optionally `prefetch(predicted)` between steps. `future` (belady only): the
    trace of steps this cache will see, in order; a step that differs from it is an error.
    """

    def __init__(self, size: int, policy: str = "lifo", future: Iterable | None = None, expert_bytes: int = 0):
        check_policy(size, policy)
        if policy == "belady" and future is None:
            raise ValueError("policy 'belady' needs the future trace (future=...): it evicts the expert whose "
                             "next request is furthest away")
        self.size, self.policy = int(size), policy
        self.slot_of: dict[int, int] = {}
        self._free = list(range(self.size - 1, -1, -1))  # pop() hands out slot 0 first
        self._loaded_at: dict[int, int] = {}
        self._last_used: dict[int, int] = {}
        self._uses: dict[int, int] = {}
        self._unused_prefetch: set[int] = set()
        self._tick = 0  # orders loads and requests
        self._position = 0  # index of the next request in the flattened request sequence
        self._step = 0
        self._active: frozenset[int] = frozenset()
        self._pending: list[int] = []  # this step's active experts not requested yet, ascending
        self._prediction: frozenset[int] | None = None
        self.stats = CacheStats(expert_bytes=int(expert_bytes))
        self._future = None
        if future is not None:
            self._future = normalize_trace(future, "future")
            self._uses_at: dict[int, list[int]] = {}  # expert -> its positions in the flattened sequence
            position = 0
            for step in self._future:
                for e in step:
                    self._uses_at.setdefault(e, []).append(position)
                    position += 1

    @property
    def resident(self) -> dict[int, int]:
        return dict(self.slot_of)

    def begin_step(self, active) -> None:
        if self._pending:
            raise RuntimeError(f"step {self._step - 1} still has unrequested experts {self._pending}")
        active = _step_ids(active, f"step {self._step}")
        if self._future is not None:
            expected = self._future[self._step] if self._step < len(self._future) else None
            if expected != active:
                raise ValueError(f"step {self._step} requests experts {list(active)} but the future trace says "
                                 f"{None if expected is None else list(expected)}: belady needs the exact trace")
        self._active = frozenset(active)
        self._pending = list(active)
        if self._prediction is not None:
            self.stats.predicted += len(self._prediction)
            self.stats.predicted_right += len(self._prediction & self._active)
            self.stats.active_predicted_steps += len(active)
            self._prediction = None

    def request(self, expert: int) -> Access:
        expert = int(expert)
        if not self._pending or self._pending[0] != expert:
            raise ValueError(f"step {self._step}: expert {expert} requested out of turn; next expected "
                             f"{self._pending[0] if self._pending else 'none (step complete)'}")
        self._pending.pop(0)
        self.stats.requests += 1
        self._tick += 1
        if expert in self.slot_of:
            self.stats.hits += 1
            if expert in self._unused_prefetch:
                self.stats.prefetch_hits += 1
                self._unused_prefetch.discard(expert)
            access = Access(expert, self.slot_of[expert], False, None)
        else:
            self.stats.misses += 1
            access = self._load(expert, protected=frozenset((expert,)), active=self._active)
        self._last_used[expert] = self._tick
        self._uses[expert] = self._uses.get(expert, 0) + 1
        self._position += 1
        return access

    def end_step(self) -> None:
        if self._pending:
            raise RuntimeError(f"step {self._step} ended with unrequested experts {self._pending}")
        self._step += 1
        self.stats.steps += 1

    def run_step(self, active) -> list[Access]:
        """begin_step, every request in ascending order, end_step."""
        self.begin_step(active)
        accesses = [self.request(e) for e in sorted(self._active)]
        self.end_step()
        return accesses

    def prefetch(self, predicted) -> list[Access]:
        """Load the predicted experts of the next step that are not resident (ascending ids, as many as fit
        without evicting another predicted one). Call between end_step and the next begin_step."""
        predicted = frozenset(_step_ids(predicted, f"prediction for step {self._step}"))
        self._prediction = predicted
        accesses = []
        for expert in sorted(predicted - set(self.slot_of)):
            if not self._free and not set(self.slot_of) - predicted:
                break  # every slot holds a predicted expert
            self._tick += 1
            access = self._load(expert, protected=predicted, active=predicted)
            self._last_used[expert] = self._tick
            self._uses[expert] = 0
            self._unused_prefetch.add(expert)
            self.stats.prefetch_loads += 1
            accesses.append(access)
        return accesses

    # -- internals

    def _load(self, expert: int, protected: frozenset, active: frozenset) -> Access:
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = self._victim([e for e in self.slot_of if e not in protected], active)
            slot = self.slot_of.pop(evicted)
            for table in (self._loaded_at, self._last_used, self._uses):
                table.pop(evicted, None)
            self._unused_prefetch.discard(evicted)
            self.stats.evictions += 1
        self.slot_of[expert] = slot
        self._loaded_at[expert] = self._tick
        self.stats.max_resident = max(self.stats.max_resident, len(self.slot_of))
        return Access(expert, slot, True, evicted)

    def _victim(self, candidates: list[int], active: frozenset) -> int:
        if not candidates:
            raise RuntimeError("no evictable expert")  # unreachable: protected sets never fill the cache
        if self.policy == "lifo":
            inactive = [e for e in candidates if e not in active]
            return max(inactive or candidates, key=self._loaded_at.__getitem__)
        if self.policy == "fifo":
            return min(candidates, key=self._loaded_at.__getitem__)
        if self.policy == "lru":
            return min(candidates, key=self._last_used.__getitem__)
        if self.policy == "lfu":
            return min(candidates, key=lambda e: (self._uses[e], self._last_used[e]))
        return max(candidates, key=lambda e: (self._next_use(e), -e))  # belady

    def _next_use(self, expert: int) -> float:
        uses = self._uses_at.get(expert, ())
        i = bisect.bisect_left(uses, self._position)
        return uses[i] if i < len(uses) else math.inf


def simulate(requests: Iterable, cache_size: int, policy: str = "lifo", *, expert_bytes: int = 0,
             prefetch: Sequence | None = None, warmup_steps: int = 0) -> CacheStats:
    """Trace-driven simulation of one layer's cache, starting empty.

    requests: per step, the active expert ids (requested in ascending id order). prefetch (optional): per
    step, the experts predicted for it, loaded before the step's requests (None or [] for no prediction).
    belady's future is the request trace itself. Returns CacheStats (.hits, .misses, .bytes_moved with
    expert_bytes = one expert's size in bytes), counting the steps after the first `warmup_steps` (those
    still fill the cache: e.g. a prefill before decode steps).
    """
    check_policy(cache_size, policy)
    steps = normalize_trace(requests)
    if prefetch is not None and len(prefetch) != len(steps):
        raise ValueError(f"prefetch has {len(prefetch)} steps; requests have {len(steps)}")
    cache = ExpertCache(cache_size, policy, future=steps if policy == "belady" else None, expert_bytes=expert_bytes)
    warm = CacheStats(expert_bytes=expert_bytes)
    for t, step in enumerate(steps):
        if t == warmup_steps:
            warm = dataclasses.replace(cache.stats)
        if prefetch is not None and prefetch[t] is not None and len(prefetch[t]):
            cache.prefetch(prefetch[t])
        cache.run_step(step)
    return cache.stats - warm if warmup_steps < len(steps) else CacheStats(expert_bytes=expert_bytes)


# ---------------------------------------------------------------------------------------------------------
# The weights: host store and device slots


def host_memory_kind(device: jax.Device | None = None) -> str | None:
    """The one place that picks where host-resident experts live: `pinned_host` where the device offers it
    (GPU/TPU: the copy to the device is an asynchronous DMA), else None = numpy arrays (the CPU backend,
    whose memory kinds are unreliable)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


class HostExpertStore:
    """Every routed expert's weights of every MoE layer in host memory, per expert one flat row holding
    w_gate, w_up and w_down one after the other, so loading any set of experts is one host -> device call.

    `experts[layer]`: with a memory kind (`pinned_host` on GPU/TPU) a list of one [P] jax array per expert
    (a list of such arrays goes to the device in one batched call); without (the CPU backend) one numpy
    [E, P] array, from which a load gathers its rows into one contiguous buffer. memory_kind: "auto" is
    `host_memory_kind(device)`; None forces numpy, a kind name forces that kind.
    """

    def __init__(self, model: CausalLM, device: jax.Device | None = None, memory_kind: str | None = "auto"):
        self.device = device or jax.devices()[0]
        kinds = {m.kind for m in self.device.addressable_memories()}
        if memory_kind not in kinds | {"auto", None}:
            raise ValueError(f"memory_kind={memory_kind!r}: {self.device} has {sorted(kinds)} (or 'auto', None)")
        self.memory_kind = host_memory_kind(self.device) if memory_kind == "auto" else memory_kind
        self.experts: dict[int, list | np.ndarray] = {}
        for i, layer in enumerate(model.layers):
            block = layer.mlp
            if not isinstance(block, MoEBlock):
                continue
            if block.parallel is not None:
                raise ValueError(f"layer {i} runs expert parallel; buffering takes a single-device model")
            weights = [np.asarray(jax.device_get(w[...])) for w in (block.w_gate, block.w_up, block.w_down)]
            flat = np.concatenate([w.reshape(w.shape[0], -1) for w in weights], axis=1)  # [E, P]
            if self.memory_kind is None:
                self.experts[i] = np.ascontiguousarray(flat)
            else:
                sharding = jax.sharding.SingleDeviceSharding(self.device, memory_kind=self.memory_kind)
                self.experts[i] = [jax.device_put(row, sharding) for row in flat]
            self.shapes = tuple((w.shape[1:], w.dtype) for w in weights)  # (gate, up, down) of one expert
        if not self.experts:
            raise ValueError("the model has no MoE layer: there are no experts to buffer")
        self.expert_bytes = int(next(iter(self.experts.values()))[0].nbytes)

    def expert_weights(self, layer: int, expert: int) -> tuple[np.ndarray, ...]:
        """One expert's (w_gate, w_up, w_down), read back from its flat host row."""
        return _unflatten(np.asarray(jax.device_get(self.experts[layer][expert])), [s for s, _ in self.shapes])

    def to_device(self, layer: int, experts: list[int]) -> tuple:
        """Start the copies of some experts' flat [P] rows to the device, in the order given; returns at once
        (jax.device_put is asynchronous). On the CPU backend, where host memory is device memory, the rows
        themselves (numpy views): `DeviceExpertCache.plan_step` gathers them into one array, which the
        jitted step takes as an argument, and that gather is the copy."""
        host = self.experts[layer]
        if isinstance(host, np.ndarray):
            return tuple(host[e] for e in experts)
        sharding = jax.sharding.SingleDeviceSharding(self.device)  # default memory kind: device memory
        return tuple(jax.device_put([host[e] for e in experts], sharding))


def _unflatten(flat, shapes):
    """[..., sum of sizes] -> one [..., *shape] array per shape, in order (numpy or jax)."""
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[..., start:start + size].reshape(flat.shape[:-1] + tuple(shape)))
        start += size
    return tuple(out)


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (0 for 0)."""
    return 1 << (n - 1).bit_length() if n else 0


class _Copies(NamedTuple):
    """Host -> device copies in flight for one layer's slots."""
    loads: list  # the Accesses whose experts are copied
    rows: tuple  # per load its expert's flat weights (see HostExpertStore.to_device)


class _ExpertsStep(NamedTuple):
    """Everything a jitted experts step needs besides the activations: see _experts."""
    arrays: tuple  # the copied rows (prefetched ones first), n with padding: n [P] arrays or one [n, P]
    writes: np.ndarray  # int32 [chunks, n]: the slot row j goes to before chunk c is computed; `slots`: not then
    tables: np.ndarray  # int32 [chunks, E]: each expert's slot while chunk c is computed; `slots`: not in c


class DeviceExpertCache:
    """One MoE layer's device slots ([slots, d, f] gate and up, [slots, f, d] down) and their bookkeeping.
    The slots are written inside the jitted experts step (`_experts`), from copies `start_copies` began."""

    def __init__(self, store: HostExpertStore, layer: int, size: int, policy: str, future=None):
        self.store, self.layer = store, layer
        self.book = ExpertCache(size, policy, future=future, expert_bytes=store.expert_bytes)
        sharding = jax.sharding.SingleDeviceSharding(store.device)
        self.slots = tuple(jax.device_put(np.zeros((size,) + shape, dtype), sharding)
                           for shape, dtype in store.shapes)
        self.num_experts = len(store.experts[layer])
        self.prefetched: list[_Copies] = []  # prefetch copies started for this layer's next step

    @property
    def stats(self) -> CacheStats:
        return self.book.stats

    def device_bytes(self) -> int:
        return int(sum(s.nbytes for s in self.slots))

    def start_copies(self, accesses: list[Access]) -> _Copies | None:
        """Start copying in the experts these accesses load, as one host -> device call."""
        loads = [a for a in accesses if a.loaded]
        return _Copies(loads, self.store.to_device(self.layer, [a.expert for a in loads])) if loads else None

    def prefetch(self, predicted) -> None:
        """Run a prediction for the next step through the policy and start its copies now."""
        copies = self.start_copies(self.book.prefetch(predicted))
        if copies is not None:
            self.prefetched.append(copies)

    def plan_step(self, active) -> _ExpertsStep:
        """Run the step's requests through the policy, start the copies of its misses, and lay out the step:
        chunks of requests computed together, split where a load would evict an expert of the chunk not
        yet computed; each chunk's loads are written to their slots right before it is computed (prefetched
        copies before the first chunk's)."""
        active = _step_ids(active, f"layer {self.layer}")
        self.book.begin_step(active)
        chunks, chunk = [], []
        for e in active:
            access = self.book.request(e)
            if access.evicted is not None and any(a.expert == access.evicted for a in chunk):
                chunks.append(chunk)
                chunk = []
            chunk.append(access)
        self.book.end_step()
        chunks.append(chunk)  # an empty chunk (no expert active) still writes the prefetched copies
        copies, row, last_write = self.prefetched, 0, {}  # (chunk, slot) -> the row written there last
        self.prefetched = []
        for c in copies:  # prefetched rows: written before the first chunk
            for a in c.loads:
                last_write[0, a.slot] = row
                row += 1
        loads = [(k, a) for k, ch in enumerate(chunks) for a in ch if a.loaded]
        for k, a in loads:
            last_write[k, a.slot] = row  # overrides a prefetch into the same slot
            row += 1
        demand = self.start_copies([a for _, a in loads])
        if demand is not None:
            copies.append(demand)
        # rows and chunks padded to powers of two (padding is never written, computes nothing), so that
        # _experts compiles for a few shapes only
        rows = [x for c in copies for x in c.rows]
        padded_rows = _power_of_two(len(rows))
        if rows and isinstance(rows[0], np.ndarray):  # CPU: gather into one array, the padding left zero
            arrays = (np.zeros((padded_rows, rows[0].shape[0]), rows[0].dtype),)
            arrays[0][:len(rows)] = rows
        else:  # device arrays: padding repeats the last one, which copies nothing
            arrays = tuple(rows + rows[-1:] * (padded_rows - len(rows)))
        size = self.book.size
        writes = np.full((_power_of_two(len(chunks)), padded_rows), size, np.int32)  # size: no write
        for (k, slot), j in last_write.items():
            writes[k, j] = slot
        tables = np.full((writes.shape[0], self.num_experts), size, np.int32)
        for k, ch in enumerate(chunks):
            for a in ch:
                tables[k, a.expert] = a.slot
        return _ExpertsStep(arrays, writes, tables)


# ---------------------------------------------------------------------------------------------------------
# Buffered forward and generation


class _Static:
    """A jit static argument with an O(1) hash and identity equality: hashing an nnx GraphDef walks the whole
    graph (~0.3 ms for a layer), which per call was a large share of a decode step. One canonical _Static
    per distinct value (see `_static`), so identity is equality, also across models."""

    def __init__(self, value, hash_value: int):
        self.value, self._hash = value, hash_value

    def __hash__(self):
        return self._hash


_CANONICAL: dict[int, list[_Static]] = {}


def _static(value) -> _Static:
    """The canonical _Static of a hashable value (equal values share one, and so share compiles)."""
    h = hash(value)
    for candidate in _CANONICAL.setdefault(h, []):
        if candidate.value == value:
            return candidate
    _CANONICAL[h].append(_Static(value, h))
    return _CANONICAL[h][-1]


def _strip_experts(layer_state):
    """A MoE layer's state without its routed experts' weights (they live in the host store)."""
    for name in ("w_gate", "w_up", "w_down"):
        layer_state["mlp"][name] = jnp.zeros((0,), layer_state["mlp"][name][...].dtype)
    return layer_state


class _Segment(NamedTuple):
    """The static part of one jitted piece of a buffered forward call, which runs: the combine of MoE layer
    `finish` (the experts' outputs come from `_experts`; first piece: the embedding instead), the whole
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


def _prologue(embed, tokens, token_mask, cache_mask, cache_positions, index, prefill, rope, sliding_window):
    """Embedding, rope angles and the attention mask: CausalLM.forward's preamble, with a cache."""
    t = tokens.shape[1]
    index = 0 if prefill else index
    positions = cache_mask.sum(axis=1, keepdims=True) + jnp.cumsum(token_mask, axis=1) - 1
    positions = jnp.maximum(positions, 0).astype(jnp.int32)
    inv_freq, attention_factor = rope
    cos, sin = rope_angles(positions, jnp.asarray(inv_freq, jnp.float32), attention_factor)
    key_mask = jax.lax.dynamic_update_slice_in_dim(cache_mask, token_mask, index, axis=1)
    key_positions = jax.lax.dynamic_update_slice_in_dim(cache_positions, positions, index, axis=1)
    key_slots = jnp.arange(cache_mask.shape[1])
    allowed = key_mask[:, None, :] & (key_slots[None, None, :] <= (index + jnp.arange(t))[None, :, None])
    if sliding_window:
        allowed &= positions[:, :, None] - key_positions[:, None, :] < sliding_window
    return embed[tokens], cos, sin, allowed, key_mask, key_positions


def _counts(r):
    return jnp.zeros((r.scores.shape[-1],), jnp.int32).at[r.experts.reshape(-1)].add(r.keep.reshape(-1))


def _attention_and_route(layer, x, cos, sin, allowed, token_mask, layer_kv, index, decode, next_layer):
    """Attention, the router and policy of a MoE layer; with the next MoE layer, its predicted experts (its
    router on this layer's residual stream, through its own post-attention norm)."""
    attn_out, layer_kv = layer.self_attn(layer.input_layernorm(x), cos, sin, allowed, layer_kv, index)
    x = x + attn_out
    b, t, d = x.shape
    mask = token_mask.reshape(b * t)
    h = layer.post_attention_layernorm(x).reshape(b * t, d)
    r = layer.mlp.route(h, mask, decode)
    out = dict(x=x, h=h, r=r, counts=_counts(r))
    if next_layer is not None:
        h_next = next_layer.post_attention_layernorm(x).reshape(b * t, d)
        out["predicted"] = _counts(next_layer.mlp.route(h_next, mask, decode))
    return out, layer_kv


_STACK_LIMIT_BYTES = 256 * 2**20  # copied rows up to this size are stacked on the device for one write


@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=0)
def _experts(slots, arrays, writes, tables, h, r, activation, implementation):
    """One MoE layer's routed experts over its slots -> (outputs per pair [T*k, d] in pair order, slots).
    slots: donated, so written in place. Per chunk c: each copied row whose writes[c] is a slot is written
    there (other writes are dropped), then the pairs whose expert has a slot in tables[c] are computed from
    the slots. Pairs outside a chunk come out exactly 0 (rows past the groups), so adding chunks is exact.
    Its own jitted call, apart from the layers around it: only this small step is compiled again for each
    count of copied rows and chunks (powers of two)."""
    num_slots = slots[0].shape[0]
    shapes = [s.shape[1:] for s in slots]
    if len(arrays) == 1 and arrays[0].ndim == 2:  # gathered on the host (CPU)
        stacked, rows = arrays[0], []
    elif sum(a.nbytes for a in arrays) <= _STACK_LIMIT_BYTES:  # one write per weight, from a small temporary
        stacked, rows = (jnp.stack(arrays) if arrays else None), []
    else:  # large experts: one row at a time, no [rows, P] temporary
        stacked, rows = None, list(arrays)
    experts, keep = r.experts, r.keep
    tile = default_tile(experts.size, tables.shape[1])[0]  # the resident experts step's tile: same arithmetic

    def chunk(c, carry):
        acc, slots = carry
        if stacked is not None:
            slots = tuple(s.at[writes[c]].set(p, mode="drop") for s, p in zip(slots, _unflatten(stacked, shapes)))
        for j, row in enumerate(rows):
            slots = tuple(s.at[writes[c, j]].set(p, mode="drop") for s, p in zip(slots, _unflatten(row, shapes)))
        slot_of = tables[c][experts]
        group = jnp.where(keep & (slot_of < num_slots), slot_of, num_slots).reshape(-1)
        order = jnp.argsort(group, stable=True)
        sizes = jnp.bincount(group, length=num_slots + 1)[:num_slots].astype(jnp.int32)
        out = kernels.grouped_ffn(h[order // experts.shape[1]], sizes, *slots, activation=activation,
                                  implementation=implementation, tile=tile)
        return acc + out[jnp.argsort(order)].astype(acc.dtype), slots

    acc = jnp.zeros((experts.size, h.shape[1]), h.dtype)
    if tables.shape[0] == 1:  # the usual case, straight-line code
        return chunk(0, (acc, slots))
    return jax.lax.fori_loop(0, tables.shape[0], chunk, (acc, slots))


def _finish_moe(block, x, h, acc, r):
    """The combine (as dispatch.combine: weighted sum over k in f32) plus shared experts, into the residual."""
    num_tokens, top_k = r.experts.shape
    weights = jnp.where(r.keep, r.weights, 0.0)
    out = jnp.einsum("tkd,tk->td", acc.reshape(num_tokens, top_k, -1).astype(jnp.float32), weights).astype(h.dtype)
    if block.shared is not None:
        shared = block.shared(h)
        if block.shared_gate is not None:
            shared = jax.nn.sigmoid(h @ block.shared_gate[...]) * shared
        out = out + shared
    return x + out.reshape(x.shape)


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
    out = {}
    if s.finish is None:
        x, cos, sin, allowed, key_mask, key_positions = _prologue(
            params["embed"], carry["tokens"], carry["token_mask"], carry["cache_mask"], carry["cache_positions"],
            carry["index"], s.prefill, s.rope, s.sliding_window)
        out["context"] = dict(cos=cos, sin=sin, allowed=allowed, key_mask=key_mask, key_positions=key_positions)
    else:
        cos, sin, allowed = carry["cos"], carry["sin"], carry["allowed"]
        x = _finish_moe(modules[s.finish].mlp, carry["x"], carry["h"], carry["acc"], carry["r"])
    token_mask = carry["token_mask"]
    index = 0 if s.prefill else carry["index"]  # a static 0 lets prefill attention skip future key slots
    new_kv = []
    for i, layer_kv in zip(s.dense, kv_layers):
        x, layer_kv, _, _ = modules[i](x, cos, sin, allowed, token_mask, layer_kv, index, decode)
        new_kv.append(layer_kv)
    if s.route is None:
        norm = nnx.merge(s.norm[0], jax.tree_util.tree_unflatten(s.norm[1], params["norm"]))
        out["logits"] = jnp.einsum("bd,dv->bv", norm(x[:, -1]), params["head"], preferred_element_type=jnp.float32)
    else:
        routed, layer_kv = _attention_and_route(modules[s.route], x, cos, sin, allowed, token_mask,
                                                kv_layers[-1], index, decode, modules.get(s.predict))
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
    `_experts` writes them into the slots and computes the layer's experts.
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
        self.implementation = model.moe_blocks()[0].implementation
        # the pieces of a forward call: boundaries at the MoE layers
        self.segments: dict[bool, list[tuple[_Static, dict]]] = {True: [], False: []}
        bounds = [None] + moe + [None]
        for finish, route in zip(bounds, bounds[1:]):
            start = 0 if finish is None else finish + 1
            dense = tuple(range(start, len(model.layers) if route is None else route))
            predict = self._next_moe(route) if prefetch and route is not None else None
            spec = _Segment(finish, dense, route, predict, (), (norm_graphdef, norm_treedef), False,
                            model._rope, self.config.sliding_window)
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
            acc, cache.slots = _experts(cache.slots, *step, out["h"], out["r"], self.activation, self.implementation)
            if s.predict is not None:  # ...then the next layer's predicted ones, one layer early
                started = time.perf_counter()
                predicted = tuple(int(e) for e in np.flatnonzero(predicted))
                self.predictions[s.predict].append(predicted)
                self.caches[s.predict].prefetch(predicted)
                policy += time.perf_counter() - started
            self.seconds["policy_and_copies"] += policy
            if not self.prefetch_enabled or s.route == first_moe:
                self.predictions[s.route].append(None)
            carry = dict(token_mask=token_mask, index=index, cos=context["cos"], sin=context["sin"],
                         allowed=context["allowed"], x=out["x"], h=out["h"], r=out["r"], acc=acc)
        return logits, KVCache(tuple(new_kv), context["key_mask"], context["key_positions"],
                               kv.index + tokens.shape[1])


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample(logits, key, temperature: float, top_p: float):
    """The next tokens and the next key, as moejax.generate draws them, in one dispatch."""
    key, sub = jax.random.split(key)
    return sample_next(logits, sub, temperature, top_p), key


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
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key")
    stops = np.asarray(() if stop_tokens is None else np.atleast_1d(stop_tokens), np.int32)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (int(stops[0]) if len(stops) else 0)
    tokens, mask = pad_prompts(prompt)
    check_token_ids(np.where(mask, tokens, 0), config.vocab_size)
    key = jax.random.key(0) if key is None else key
    kv = init_cache(config, tokens.shape[0], tokens.shape[1] + max_new_tokens, model.dtype)
    logits, kv = model.step(tokens, mask, kv, prefill=True)
    last, key = _sample(logits, key, float(temperature), float(top_p))
    last = np.asarray(last)
    generated = np.full((tokens.shape[0], max_new_tokens), pad_token_id, np.int32)
    generated[:, 0] = last
    done = np.isin(last, stops)
    prefill_stats = {i: dataclasses.replace(c.stats) for i, c in model.caches.items()}
    start, before = time.perf_counter(), dict(model.seconds)
    for step in range(1, max_new_tokens):
        if done.all():
            break
        # finished rows still run, as padding: no cache slot, no expert
        logits, kv = model.step(last[:, None], ~done[:, None], kv, prefill=False)
        last, key = _sample(logits, key, float(temperature), float(top_p))
        last = np.where(done, pad_token_id, np.asarray(last))
        generated[:, step] = last
        done |= np.isin(last, stops)
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
