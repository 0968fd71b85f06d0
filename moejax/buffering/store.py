"""The weights of buffered experts: every expert in host memory (`HostExpertStore`), a few device slots per
MoE layer (`DeviceExpertCache`), and the jitted experts step that writes copied experts into the slots and
computes the layer's experts from them (`experts_step`).

Host storage is `pinned_host` memory on GPU/TPU (DMA-able, so `jax.device_put` to the device is an
asynchronous copy) and numpy arrays on the CPU backend, whose memory kinds are unreliable
(`host_memory_kind` is the one place that chooses); one flat row per expert, so a step's loads are one
host -> device call. Each layer's device cache is three [slots, d, f] arrays, written in place (donated).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax import kernels
from moejax.buffering.cache import Access, CacheStats, ExpertCache, step_ids
from moejax.models.transformer import CausalLM


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
            if not layer.is_moe:
                continue
            if block.runtime.sharded:
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
        return unflatten(np.asarray(jax.device_get(self.experts[layer][expert])), [s for s, _ in self.shapes])

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


def unflatten(flat, shapes):
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
    """Everything a jitted experts step needs besides the activations: see experts_step."""
    arrays: tuple  # the copied rows (prefetched ones first), n with padding: n [P] arrays or one [n, P]
    writes: np.ndarray  # int32 [chunks, n]: the slot row j goes to before chunk c is computed; `slots`: not then
    tables: np.ndarray  # int32 [chunks, E]: each expert's slot while chunk c is computed; `slots`: not in c


class DeviceExpertCache:
    """One MoE layer's device slots ([slots, d, f] gate and up, [slots, f, d] down) and their bookkeeping.
    The slots are written inside the jitted experts step (`experts_step`), from copies `start_copies` began."""

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
        active = step_ids(active, f"layer {self.layer}")
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
        # experts_step compiles for a few shapes only
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


_STACK_LIMIT_BYTES = 256 * 2**20  # copied rows up to this size are stacked on the device for one write


def _resident_tile(implementation, num_rows: int, num_experts: int):
    """The xla path with the tile the resident experts step would use for the same pairs and experts (the
    slots are fewer than the experts, which would otherwise change the tile heuristic's answer)."""
    xla = implementation == "xla" or (implementation == "auto" and kernels.default_implementation()[0] == "xla")
    if xla or (isinstance(implementation, kernels.Xla) and implementation.config.tile is None):
        return kernels.Xla(kernels.XlaConfig(tile=kernels.Xla().tiles(num_rows, num_experts)[0]))
    return implementation


@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=0)
def experts_step(slots, arrays, writes, tables, h, r, activation, implementation):
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
    implementation = _resident_tile(implementation, experts.size, tables.shape[1])

    def chunk(c, carry):
        acc, slots = carry
        if stacked is not None:
            slots = tuple(s.at[writes[c]].set(p, mode="drop") for s, p in zip(slots, unflatten(stacked, shapes)))
        for j, row in enumerate(rows):
            slots = tuple(s.at[writes[c, j]].set(p, mode="drop") for s, p in zip(slots, unflatten(row, shapes)))
        slot_of = tables[c][experts]
        group = jnp.where(keep & (slot_of < num_slots), slot_of, num_slots).reshape(-1)
        order = jnp.argsort(group, stable=True)
        sizes = jnp.bincount(group, length=num_slots + 1)[:num_slots].astype(jnp.int32)
        out = kernels.grouped_ffn(h[order // experts.shape[1]], sizes, *slots, activation=activation,
                                  implementation=implementation)
        return acc + out[jnp.argsort(order)].astype(acc.dtype), slots

    acc = jnp.zeros((experts.size, h.shape[1]), h.dtype)
    if tables.shape[0] == 1:  # the usual case, straight-line code
        return chunk(0, (acc, slots))
    return jax.lax.fori_loop(0, tables.shape[0], chunk, (acc, slots))
