"""Expert-cache bookkeeping, pure Python: which expert sits in which slot, who is evicted, and the
trace-driven simulator. The real cache (`store.DeviceExpertCache`) drives the same `ExpertCache`, so the
simulator and the real cache cannot disagree on a miss. See moejax.buffering for a step's semantics and
the policies.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from moejax.config import is_integer

POLICIES = ("lifo", "lru", "fifo", "lfu", "belady")


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
    if not is_integer(cache_size) or cache_size < 1:
        raise ValueError(f"cache_size={cache_size!r} must be an integer >= 1 (expert slots per layer)")
    if policy not in POLICIES:
        raise ValueError(f"unknown eviction policy {policy!r}; supported: {POLICIES}")


def _check_count(name: str, value) -> None:
    if not is_integer(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")


def step_ids(step, where: str) -> tuple[int, ...]:
    """One step's expert ids -> sorted unique ints; floats (never truncated), bools and negative ids refused."""
    try:
        array = np.asarray(step)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a sequence of expert ids; got {step!r}") from None
    if array.size and (array.dtype == bool or not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{where}: expert ids must be integers; got {step!r} (dtype {array.dtype})")
    ids = sorted({int(e) for e in array.reshape(-1)})
    if ids and ids[0] < 0:
        raise ValueError(f"{where}: expert id {ids[0]} is negative")
    return tuple(ids)


def normalize_trace(requests: Iterable, name: str = "requests") -> list[tuple[int, ...]]:
    """Per step, any iterable of expert ids -> sorted unique tuples (a step's active set)."""
    return [step_ids(step, f"{name}[{t}]") for t, step in enumerate(requests)]


class ExpertCache:
    """One layer's cache bookkeeping: `size` slots, an expert -> slot map, an eviction policy.

    Drive it with, per step, `begin_step(active)`, then `request(e)` for each active expert in ascending
    order, then `end_step()`; optionally `prefetch(predicted)` between steps. `future` (belady only): the
    trace of steps this cache will see, in order; a step that differs from it is an error.
    """

    def __init__(self, size: int, policy: str = "lifo", future: Iterable | None = None, expert_bytes: int = 0):
        check_policy(size, policy)
        _check_count("expert_bytes", expert_bytes)
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
        active = step_ids(active, f"step {self._step}")
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
        if not is_integer(expert):
            raise ValueError(f"step {self._step}: expert id {expert!r} must be an integer")
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
        predicted = frozenset(step_ids(predicted, f"prediction for step {self._step}"))
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
    _check_count("expert_bytes", expert_bytes)
    _check_count("warmup_steps", warmup_steps)
    if isinstance(requests, (str, bytes)) or not hasattr(requests, "__iter__"):
        raise ValueError(f"requests must be a sequence of steps (each a sequence of expert ids); got {requests!r}")
    steps = normalize_trace(requests)
    if prefetch is not None and not hasattr(prefetch, "__len__"):
        raise ValueError(f"prefetch must be a sequence with one entry per step (or None); got {prefetch!r}")
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
