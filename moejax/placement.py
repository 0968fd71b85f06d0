"""Expert placement: which device of the expert mesh axis computes each expert (papers.md B, load balancing).

Two forms:
  * `device_of_expert` int [E], every device holding E / D experts: what `contiguous`, `greedy` and
    `anti_correlation` return, what `MoEPolicy(placement=...)` and `expert_parallel(placement=...)` take (both build a `layout.Layout`).
  * `Placement`: physical slots -> logical experts, so that hot experts can have several replicas
    (`replicate`, DeepSeek EPLB-style); `search` improves either form. Device d holds the physical slots
    [d * L, (d + 1) * L), L = slots per device.

Loads: `batch_loads` A [B, E] holds, per historical batch, what each expert received (token counts or
fractions; metrics normalise each batch to shares summing to 1, so a perfectly balanced device has 1 / D).
A replicated expert's load is split evenly between its replicas.

Metrics (papers.md B, on held-out batches): Max Load = the largest per-device share in any batch (memory
risk); Avg Max Load = the per-batch largest device share, averaged over batches (stragglers).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import is_integer


# ---------------------------------------------------------------------------------------------------------
# Validation


def _check_devices(num_devices, num_experts: int, what: str = "num_experts") -> int:
    if not is_integer(num_devices) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} must be a positive int")
    if not is_integer(num_experts) or num_experts < 1:
        raise ValueError(f"{what}={num_experts!r} must be a positive int")
    if num_experts % num_devices:
        raise ValueError(f"num_devices={num_devices} must divide {what}={num_experts}")
    return int(num_devices)


def check_loads(loads, ndim: int, name: str = "loads") -> np.ndarray:
    """float64 loads of rank `ndim` ([E] mean loads or [B, E] batch loads): finite and >= 0."""
    try:
        a = np.asarray(loads, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers; got {loads!r}") from None
    if a.ndim != ndim or a.shape[-1] == 0 or (ndim == 2 and a.shape[0] == 0):
        shape = "[num_experts]" if ndim == 1 else "[num_batches, num_experts]"
        raise ValueError(f"{name} must be a non-empty array {shape}; got shape {a.shape}")
    bad = ~np.isfinite(a) | (a < 0)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} must be finite and >= 0; got {a[where]} at index {where}")
    return a


def check(device_of_expert, num_devices: int) -> np.ndarray:
    """Validate a placement: ids in [0, D) and E / D experts on every device."""
    placement = _int_array(device_of_expert, "a placement (device_of_expert)")
    if not is_integer(num_devices) or num_devices < 1 or placement.size % num_devices:
        raise ValueError(f"num_devices={num_devices!r} must divide the number of experts ({placement.size})")
    if placement.min() < 0 or placement.max() >= num_devices:
        raise ValueError(f"placement {placement.tolist()} names devices outside [0, {num_devices})")
    counts = np.bincount(placement, minlength=num_devices)
    if (counts != placement.size // num_devices).any():
        raise ValueError(f"placement {placement.tolist()} puts {counts.tolist()} experts on the devices; each "
                         f"must hold {placement.size // num_devices}")
    return placement.astype(np.int32)


def _int_array(values, what: str) -> np.ndarray:
    """A non-empty int array [N]: floats (even 1.0: a placement is never rounded), bools and other ranks refused."""
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0 or array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a non-empty int array [N] (no floats, no bools); got {values!r}")
    return array


# ---------------------------------------------------------------------------------------------------------
# Placements with replicas


@dataclasses.dataclass(frozen=True)
class Placement:
    """Physical slot p -> logical expert `logical_of_slot[p]`; device d holds slots [d * L, (d + 1) * L).

    Every logical expert 0..E-1 has at least one slot; an expert with r slots is replicated r times and
    its tokens are split evenly between them. Hashable (tuples), so it can sit in a static jit argument.
    """

    logical_of_slot: tuple[int, ...]
    num_devices: int

    def __post_init__(self):
        slots = _int_array(self.logical_of_slot, "Placement: logical_of_slot")
        if not is_integer(self.num_devices) or self.num_devices < 1 or slots.size % self.num_devices:
            raise ValueError(f"Placement: num_devices={self.num_devices!r} must divide the number of physical "
                             f"slots ({slots.size})")
        if slots.min() < 0:
            raise ValueError(f"Placement: logical expert ids must be >= 0; got {int(slots.min())}")
        missing = np.flatnonzero(np.bincount(slots) == 0)
        if missing.size:
            raise ValueError(f"Placement: expert {int(missing[0])} has no physical slot (experts are 0.."
                             f"{int(slots.max())}; each needs at least one)")
        object.__setattr__(self, "logical_of_slot", tuple(int(e) for e in slots))
        object.__setattr__(self, "num_devices", int(self.num_devices))

    @classmethod
    def from_device_of_expert(cls, device_of_expert, num_devices: int) -> "Placement":
        """One slot per expert; a device's slots in ascending expert order (the expert-parallel layout)."""
        placement = check(device_of_expert, num_devices)
        return cls(tuple(np.argsort(placement, kind="stable").tolist()), num_devices)

    @classmethod
    def from_device_of_slot(cls, logical, device_of_slot, num_devices: int) -> "Placement":
        """Slots given as (logical expert, device) pairs in any order -> device-major, by expert id."""
        logical = _int_array(logical, "Placement: logical experts of the slots")
        device = _int_array(device_of_slot, "Placement: device_of_slot")
        _check_devices(num_devices, device.size, "the number of slots")
        if logical.shape != device.shape:
            raise ValueError(f"Placement: {logical.size} logical experts for {device.size} slot devices")
        order = np.lexsort((logical, device))
        counts = np.bincount(device, minlength=num_devices)
        if device.min() < 0 or device.max() >= num_devices or (counts != logical.size // num_devices).any():
            raise ValueError(f"Placement: devices {device.tolist()} do not hold {logical.size // num_devices} "
                             f"slots each on devices [0, {num_devices})")
        return cls(tuple(logical[order].tolist()), num_devices)

    @property
    def num_experts(self) -> int:
        return max(self.logical_of_slot) + 1

    @property
    def num_slots(self) -> int:
        return len(self.logical_of_slot)

    @property
    def slots_per_device(self) -> int:
        return self.num_slots // self.num_devices

    @property
    def is_replicated(self) -> bool:
        return self.num_slots > self.num_experts

    @property
    def device_of_slot(self) -> np.ndarray:
        return (np.arange(self.num_slots) // self.slots_per_device).astype(np.int32)

    @property
    def replica_count(self) -> np.ndarray:
        """int32 [E]: the number of slots of each logical expert."""
        return np.bincount(self.logical_of_slot, minlength=self.num_experts).astype(np.int32)

    @property
    def replica_slots(self) -> np.ndarray:
        """int32 [E, R]: the slots of each expert, ascending; rows padded with their first slot (R = max count)."""
        logical = np.asarray(self.logical_of_slot)
        count = self.replica_count
        out = np.empty((self.num_experts, int(count.max())), np.int32)
        for e in range(self.num_experts):
            slots = np.flatnonzero(logical == e)
            out[e] = np.concatenate([slots, np.full(out.shape[1] - slots.size, slots[0])])
        return out

    @property
    def device_of_expert(self) -> np.ndarray:
        """int32 [E] for a placement without replicas (an expert with replicas has no single device)."""
        if self.is_replicated:
            raise ValueError(f"this placement replicates experts (counts {self.replica_count.tolist()}); it has "
                             "no single device per expert")
        out = np.empty(self.num_experts, np.int32)
        out[np.asarray(self.logical_of_slot)] = self.device_of_slot
        return out

    def local_experts(self, device: int) -> list[int]:
        """The logical experts with a replica on `device` (ascending, no repeats)."""
        if not is_integer(device) or not 0 <= device < self.num_devices:
            raise ValueError(f"device={device!r} must be an int in [0, {self.num_devices})")
        slots = self.logical_of_slot[device * self.slots_per_device:(device + 1) * self.slots_per_device]
        return sorted(set(slots))

    def slot_loads(self, batch_loads) -> np.ndarray:
        """[B, E] expert loads -> [B, P] slot loads: each expert's load split evenly between its replicas."""
        a = np.asarray(batch_loads, np.float64)
        if a.shape[-1] != self.num_experts:
            raise ValueError(f"loads have {a.shape[-1]} experts but the placement has {self.num_experts}")
        logical = np.asarray(self.logical_of_slot)
        return a[..., logical] / self.replica_count[logical]


def as_placement(placement, num_devices: int | None = None) -> Placement:
    """A Placement from a Placement or a device_of_expert array (which needs num_devices)."""
    if isinstance(placement, Placement):
        if num_devices is not None and num_devices != placement.num_devices:
            raise ValueError(f"the placement spans {placement.num_devices} devices, not num_devices={num_devices}")
        return placement
    if num_devices is None:
        raise ValueError("a device_of_expert placement needs num_devices")
    return Placement.from_device_of_expert(placement, num_devices)


# ---------------------------------------------------------------------------------------------------------
# Placement methods


def contiguous(num_experts: int, num_devices: int) -> np.ndarray:
    """Experts in contiguous blocks: device d holds experts [d * E/D, (d + 1) * E/D). The default."""
    _check_devices(num_devices, num_experts)
    return np.repeat(np.arange(num_devices, dtype=np.int32), num_experts // num_devices)


def greedy(mean_loads, num_devices: int) -> np.ndarray:
    """papers.md B: experts by mean load, largest first, each to the device with the smallest summed load
    among those holding fewer than E / D experts (ties: lower expert id first, then lower device id)."""
    loads = check_loads(mean_loads, 1, "mean_loads")
    num_experts = loads.size
    per_device = num_experts // _check_devices(num_devices, num_experts)
    placement = np.full(num_experts, -1, np.int32)
    device_load = np.zeros(num_devices)
    device_count = np.zeros(num_devices, np.int64)
    for expert in np.argsort(-loads, kind="stable"):
        open_devices = np.flatnonzero(device_count < per_device)
        device = open_devices[np.argmin(device_load[open_devices])]
        placement[expert] = device
        device_load[device] += loads[expert]
        device_count[device] += 1
    return placement


def correlation(batch_loads) -> np.ndarray:
    """Pearson correlation [E, E] of the experts' loads over batches. An expert whose load never varies
    (zero variance, or a single batch) has no defined correlation: it gets 0 with every expert, itself
    included, so it neither attracts nor repels."""
    a = check_loads(batch_loads, 2, "batch_loads")
    centred = a - a.mean(0)
    norm = np.sqrt((centred ** 2).sum(0))
    varies = norm > 1e-12 * np.maximum(1.0, np.abs(a).max())
    safe = np.where(varies, norm, 1.0)
    s = (centred.T @ centred) / np.outer(safe, safe)
    s[~varies, :] = 0.0
    s[:, ~varies] = 0.0
    return np.clip(s, -1.0, 1.0)


def anti_correlation(batch_loads, num_devices: int, weight: float = 0.5) -> np.ndarray:
    """papers.md B: greedy's order (mean load, largest first; ties to the lower expert id), but expert a
    goes to the device, among those holding fewer than E / D experts, with the smallest score
    sum over its experts m of (mean_load[m] + weight * S[a, m]), S = `correlation` (ties: lower device id;
    an empty device scores 0). Correlated experts repel; anti-correlated ones attract. weight=0 is greedy.

    batch_loads [B, E]: per historical batch, each expert's load (the paper: the fraction of the batch's
    tokens routed to it; the scale matters here, as mean loads are weighed against correlations)."""
    a = check_loads(batch_loads, 2, "batch_loads")
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)) or \
            not np.isfinite(weight) or weight < 0:
        raise ValueError(f"anti_correlation: weight={weight!r} must be finite and >= 0")
    num_experts = a.shape[1]
    per_device = num_experts // _check_devices(num_devices, num_experts)
    mean = a.mean(0)
    s = correlation(a)
    placement = np.full(num_experts, -1, np.int32)
    for expert in np.argsort(-mean, kind="stable"):
        placed = placement >= 0
        terms = np.where(placed, mean + weight * s[expert], 0.0)  # what each placed expert adds to its device
        score = np.bincount(placement[placed], weights=terms[placed], minlength=num_devices)
        count = np.bincount(placement[placed], minlength=num_devices)
        open_devices = np.flatnonzero(count < per_device)
        placement[expert] = open_devices[np.argmin(score[open_devices])]
    return placement


def replica_counts(mean_loads, num_slots: int) -> np.ndarray:
    """EPLB: one slot per expert, then each extra slot to the expert with the largest load per replica
    (ties: lower expert id). int32 [E]."""
    loads = check_loads(mean_loads, 1, "mean_loads")
    if not is_integer(num_slots):
        raise ValueError(f"num_slots={num_slots!r} must be an int")
    if num_slots < loads.size:
        raise ValueError(f"num_slots={num_slots} must be >= num_experts={loads.size} (every expert needs a slot)")
    count = np.ones(loads.size, np.int64)
    for _ in range(num_slots - loads.size):
        count[np.argmax(loads / count)] += 1
    return count.astype(np.int32)


def replicate(mean_loads, num_devices: int, num_slots: int) -> Placement:
    """Redundant copies of hot experts, DeepSeek EPLB-style: `replica_counts` decides the copies (tokens
    split evenly between them), then balanced packing: slots by load per replica, heaviest first (ties:
    lower expert id), each to the lightest device with room (fewer than num_slots / D slots), preferring a
    device that holds no copy of that expert yet (a second copy on one device balances nothing); ties to the
    lower device id."""
    loads = check_loads(mean_loads, 1, "mean_loads")
    count = replica_counts(loads, num_slots)
    per_device = num_slots // _check_devices(num_devices, num_slots, "num_slots")
    experts = np.repeat(np.arange(loads.size), count)
    per_replica = loads[experts] / count[experts]
    device_load = np.zeros(num_devices)
    device_slots = np.zeros(num_devices, np.int64)
    holds = np.zeros((num_devices, loads.size), bool)
    device_of_slot = np.empty(num_slots, np.int64)
    for item in np.lexsort((experts, -per_replica)):
        e = experts[item]
        room = device_slots < per_device
        candidates = np.flatnonzero(room & ~holds[:, e])
        if candidates.size == 0:
            candidates = np.flatnonzero(room)
        device = candidates[np.argmin(device_load[candidates])]
        device_of_slot[item] = device
        device_load[device] += per_replica[item]
        device_slots[device] += 1
        holds[device, e] = True
    return Placement.from_device_of_slot(experts, device_of_slot, num_devices)


# ---------------------------------------------------------------------------------------------------------
# Metrics (papers.md B)


def device_shares(batch_loads, placement, num_devices: int | None = None) -> np.ndarray:
    """[B, E] loads -> [B, D]: each device's share of its batch's load (rows sum to 1; an empty batch is 0).
    `placement`: a Placement or a device_of_expert array (with num_devices)."""
    a = check_loads(batch_loads, 2, "batch_loads")
    p = as_placement(placement, num_devices)
    total = a.sum(1, keepdims=True)
    shares = a / np.where(total > 0, total, 1.0)
    return p.slot_loads(shares).reshape(a.shape[0], p.num_devices, p.slots_per_device).sum(-1)


def max_load(batch_loads, placement, num_devices: int | None = None) -> float:
    """Max Load: the largest per-device share in any batch."""
    return float(device_shares(batch_loads, placement, num_devices).max())


def avg_max_load(batch_loads, placement, num_devices: int | None = None) -> float:
    """Avg Max Load: the largest per-device share of each batch, averaged over batches."""
    return float(device_shares(batch_loads, placement, num_devices).max(1).mean())


# ---------------------------------------------------------------------------------------------------------
# Search


def search(batch_loads, num_devices: int | None = None, start=None, *, max_steps: int = 200,
           restarts: int = 32, kick: int = 2, seed: int = 0) -> Placement:
    """Minimise Avg Max Load over `batch_loads` [B, E] by moving slots between devices; compiled with jit.

    Starts from `start` (a Placement, a device_of_expert array, or None: `greedy` on the mean loads) and
    keeps its slots and replica counts; only which device holds each slot changes. Iterated local search
    inside a lax.while_loop: a step scores, at once, every swap of a slot on the devices that carry the
    most batch maxima (half of them, at least 8) with any slot (every swap of every slot when none of those improves) and
    takes the best swap, or each device's best swap wherever their device pairs are disjoint when together
    they do better; it stops when no swap at all improves. Then `restarts` times: `kick` random swaps from
    the best placement so far and descend again, keeping the best. Never returns a placement with a higher
    Avg Max Load on `batch_loads` than `start` (checked in float64 at the end)."""
    a = check_loads(batch_loads, 2, "batch_loads")
    if start is None:
        if num_devices is None:
            raise ValueError("search: pass num_devices or a start placement")
        start = greedy(a.mean(0), num_devices)
    start = as_placement(start, num_devices)
    for name, value in (("max_steps", max_steps), ("restarts", restarts), ("kick", kick), ("seed", seed)):
        if not is_integer(value) or value < 0:
            raise ValueError(f"search: {name}={value!r} must be an int >= 0")
    if start.num_devices == 1:
        return start
    total = a.sum(1, keepdims=True)
    shares = start.slot_loads(a / np.where(total > 0, total, 1.0))
    device = _search(jnp.asarray(shares, jnp.float32), jnp.asarray(start.device_of_slot), jax.random.key(seed),
                     num_devices=start.num_devices, max_steps=int(max_steps), restarts=int(restarts),
                     kick=int(kick))
    found = Placement.from_device_of_slot(np.asarray(start.logical_of_slot), np.asarray(device), start.num_devices)
    # float32 inside, float64 here: keep the start on a tie or a rounding-level loss
    return found if avg_max_load(a, found) < avg_max_load(a, start) else start


def _avg_max(x, device, num_devices):
    return (x @ jax.nn.one_hot(device, num_devices, dtype=x.dtype)).max(-1).mean()


def _swap_objectives(x, device, loads, rows):
    """[R, P]: Avg Max Load after swapping the devices of slot rows[r] and slot j (inf on one device).

    A swap changes two devices' loads; every other device keeps its load, so the largest of those is the
    largest of each batch's three most loaded devices that is on neither: elementwise work on [R, P, B]
    (batches innermost, for the reduction), done 16 rows at a time so each block stays in cache. loads:
    [B, D], each batch's device loads under `device`."""
    num_devices = loads.shape[1]
    xt = x.T  # [P, B]
    top, top_device = jax.lax.top_k(loads, min(3, num_devices))  # [B, <=3]
    own = loads.T[device] - xt  # [P, B]: each slot's device without it

    def block(r):  # [R', P]
        di, dj = device[r][:, None, None], device[None, :, None]
        rest = top[None, None, :, 2] if num_devices >= 3 else jnp.zeros((), x.dtype)
        for k in (1, 0):  # the first of the top three on neither device
            d = top_device[None, None, :, k]
            rest = jnp.where((d != di) & (d != dj), top[None, None, :, k], rest)
        new_i = own[r][:, None, :] + xt[None, :, :]  # row slot's device with j instead
        new_j = own[None, :, :] + xt[r][:, None, :]  # j's device with the row slot instead
        obj = jnp.maximum(jnp.maximum(new_i, new_j), rest).mean(-1)
        return jnp.where(di[..., 0] == dj[..., 0], jnp.inf, obj)

    chunk = 16
    if rows.shape[0] <= chunk or rows.shape[0] % chunk:
        return block(rows)
    return jax.lax.map(block, rows.reshape(-1, chunk)).reshape(rows.shape[0], -1)


def _swap(device, i, j):
    return device.at[i].set(device[j]).at[j].set(device[i])


def _best_swaps(x, device, loads, current, devices):
    """Score every swap of a slot on `devices` [K] with any slot. Returns the better of two moves and its Avg
    Max Load: the single best swap, or the improving swaps (each device's best), taken best first while
    their device pairs are disjoint (such swaps change different devices' loads). loads: [B, D] of device."""
    num_slots, num_devices = x.shape[1], loads.shape[1]
    slots = jnp.argsort(device, stable=True).reshape(num_devices, -1)[devices]  # [K, S]
    obj = _swap_objectives(x, device, loads, slots.reshape(-1)).reshape(slots.shape[0], -1)  # [K, S*P]
    flat = jnp.argmin(obj, axis=1)
    value = jnp.take_along_axis(obj, flat[:, None], axis=1)[:, 0]  # [K]: each device's best swap
    i = jnp.take_along_axis(slots, (flat // num_slots)[:, None], axis=1)[:, 0]
    j = flat % num_slots
    order = jnp.argsort(value)

    def take(n, state):
        many, used = state
        k = order[n]
        a, b = devices[k], device[j[k]]
        ok = (value[k] < current) & ~used[a] & ~used[b]
        many = jnp.where(ok, _swap(many, i[k], j[k]), many)
        return many, used.at[a].set(used[a] | ok).at[b].set(used[b] | ok)

    many, _ = jax.lax.fori_loop(0, devices.shape[0], take, (device, jnp.zeros(num_devices, bool)))
    single = _swap(device, i[order[0]], j[order[0]])
    single_value, many_value = _avg_max(x, single, num_devices), _avg_max(x, many, num_devices)
    use_many = many_value < single_value  # swaps interact through the batch max: keep them if they do better
    return jnp.where(use_many, many, single), jnp.minimum(many_value, single_value)


@functools.partial(jax.jit, static_argnames=("num_devices", "max_steps", "restarts", "kick"))
def _search(x, device, key, *, num_devices, max_steps, restarts, kick):
    num_slots = x.shape[1]
    hot_count = min(num_devices, max(8, num_devices // 2))  # half the devices: measured fastest at 64

    def descend(device):
        def cond(state):
            step, _, _, improved = state
            return improved & (step < max_steps)

        def body(state):
            step, device, current, _ = state
            # First only the swaps of the devices that carry the most batch maxima (cheap); when none of
            # those improves, every swap, so the descent stops only at a local optimum of the whole
            # neighbourhood.
            loads = x @ jax.nn.one_hot(device, num_devices, dtype=x.dtype)  # [B, D]
            top, top_device = jax.lax.top_k(loads, 2)
            weight = jnp.zeros(num_devices, x.dtype).at[top_device[:, 0]].add(top[:, 0] - top[:, 1] + 1e-9)
            hot = jax.lax.top_k(weight, hot_count)[1]
            candidate, value = _best_swaps(x, device, loads, current, hot)
            if hot_count < num_devices:
                candidate, value = jax.lax.cond(
                    value < current * (1 - 1e-6), lambda: (candidate, value),
                    lambda: _best_swaps(x, device, loads, current, jnp.arange(num_devices)))
            improved = value < current * (1 - 1e-6)  # a strict gain, so the loop cannot cycle on rounding
            return (step + 1, jnp.where(improved, candidate, device), jnp.where(improved, value, current),
                    improved)

        _, device, value, _ = jax.lax.while_loop(cond, body, (0, device, _avg_max(x, device, num_devices), True))
        return device, value

    def restart(_, state):
        key, best, best_value = state
        key, *subkeys = jax.random.split(key, 2 * kick + 1)
        device = best
        for m in range(kick):  # random swaps of two slots on different devices
            i = jax.random.randint(subkeys[2 * m], (), 0, num_slots)
            j = jax.random.categorical(subkeys[2 * m + 1], jnp.where(device != device[i], 0.0, -jnp.inf))
            device = _swap(device, i, j)
        device, value = descend(device)
        better = value < best_value
        return key, jnp.where(better, device, best), jnp.where(better, value, best_value)

    best, value = descend(device)
    _, best, _ = jax.lax.fori_loop(0, restarts, restart, (key, best, value))
    return best


def token_devices(num_tokens: int, num_devices: int, data: int = 1) -> np.ndarray:
    """The expert-axis device of each token of a flattened batch, as expert parallelism shards tokens: over
    data x expert devices in contiguous blocks of ceil(T / (data * D)) (T padded up to a multiple), block b
    at mesh coordinate (b // D, b % D)."""
    for name, value, least in (("num_tokens", num_tokens, 0), ("num_devices", num_devices, 1), ("data", data, 1)):
        if not is_integer(value) or value < least:
            raise ValueError(f"token_devices: {name}={value!r} must be an int >= {least}")
    block = -(-num_tokens // (data * num_devices))
    return ((np.arange(num_tokens) // block) % num_devices).astype(np.int32)
