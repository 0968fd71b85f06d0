"""Expert parallelism: experts sharded over the mesh axis "expert", tokens over every device, and the MoE
block's dispatch / experts / combine under `jax.shard_map` with all-to-alls over "expert".

Two gatings (papers.md B):
  * static:  every expert gets ceil(capacity_fraction * local tokens) slots per source device, unused slots
             padded, one fixed-size all-to-all; pairs past an expert's slots are dropped (fairseq's rule:
             all first choices in token order, then all second choices, ...).
  * dynamic: only what is routed moves. Per-device counts are exchanged first; then either
             `jax.lax.ragged_all_to_all` (GPU, TPU) or, where the backend lacks it (CPU), a padded
             `all_to_all` whose per-(source, destination) buffer holds `bucket` rows. The bucket is static:
             a forward reports the largest count it met, and `ExpertParallelRunner` re-runs with the next
             bucket of a small geometric set when it did not fit, so no token is ever truncated and few
             shapes compile.

Routing and capacity policies run before dispatch on the global token set, exactly as on one device, so
policies work unchanged; the placement (device_of_expert, or a placement.Placement with replicas of hot
experts) decides which device computes each expert. With replicas, each (token, expert) pair goes to
replica (token index mod replicas) of its expert: an even split that needs no communication.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from flax import nnx

from moejax import placement as placement_lib
from moejax.kernels import ACTIVATIONS, grouped_ffn
from moejax.routing import Routing

GATINGS = ("dynamic", "static")
ALL_TO_ALLS = ("auto", "padded", "ragged")
DATA, EXPERT = "data", "expert"


def make_mesh(expert: int | None = None, data: int = 1, devices=None) -> Mesh:
    """A (data, expert) mesh over `devices` (default: all); expert defaults to every device not on data."""
    devices = list(jax.devices() if devices is None else devices)
    if expert is None:
        if len(devices) % data:
            raise ValueError(f"data={data} does not divide the {len(devices)} devices")
        expert = len(devices) // data
    if expert * data != len(devices):
        raise ValueError(f"a mesh of data={data} x expert={expert} needs {expert * data} devices; "
                         f"{len(devices)} are available")
    return jax.make_mesh((data, expert), (DATA, EXPERT), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def default_all_to_all() -> str:
    """The one place the backend picks the dynamic-gating collective: ragged where XLA implements it."""
    return "ragged" if jax.default_backend() in ("gpu", "tpu") else "padded"


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """How a MoE block runs on `mesh` (static: part of the compiled program)."""

    mesh: Mesh
    gating: str = "dynamic"
    capacity_fraction: float = 0.25  # static gating: slots per expert per source device, as a fraction of its tokens
    bucket: int | None = None  # dynamic, padded: rows per (source, destination) buffer; None: never truncates
    placement: tuple[int, ...] | placement_lib.Placement | None = None  # device_of_expert or slots; None: contiguous
    all_to_all: str = "auto"

    def __post_init__(self):
        if self.gating not in GATINGS:
            raise ValueError(f"unknown dispatch mode (gating) {self.gating!r}; supported: {GATINGS}")
        if self.all_to_all not in ALL_TO_ALLS:
            raise ValueError(f"unknown all_to_all {self.all_to_all!r}; supported: {ALL_TO_ALLS}")
        if tuple(self.mesh.axis_names) != (DATA, EXPERT):
            raise ValueError(f"the mesh needs axes {(DATA, EXPERT)}; got {self.mesh.axis_names} (use make_mesh)")
        if not 0 < self.capacity_fraction:
            raise ValueError(f"capacity_fraction={self.capacity_fraction} must be > 0")
        if self.placement is not None and not isinstance(self.placement, placement_lib.Placement):
            object.__setattr__(self, "placement", tuple(int(d) for d in self.placement))

    @property
    def num_devices(self) -> int:
        return self.mesh.shape[EXPERT]

    @property
    def collective(self) -> str:
        return default_all_to_all() if self.all_to_all == "auto" else self.all_to_all

    def layout(self, num_experts: int) -> placement_lib.Placement:
        """The validated placement as physical slots (one per expert unless experts are replicated)."""
        if isinstance(self.placement, placement_lib.Placement):
            if self.placement.num_experts != num_experts:
                raise ValueError(f"placement covers {self.placement.num_experts} experts but the model has "
                                 f"{num_experts}")
            if self.placement.num_devices != self.num_devices:
                raise ValueError(f"placement spans {self.placement.num_devices} devices but the mesh's expert "
                                 f"axis has {self.num_devices}")
            return self.placement
        return placement_lib.Placement.from_device_of_expert(self.device_of_expert(num_experts), self.num_devices)

    def device_of_expert(self, num_experts: int) -> np.ndarray:
        if isinstance(self.placement, placement_lib.Placement):
            return self.layout(num_experts).device_of_expert  # raises for replicated experts
        if num_experts % self.num_devices:
            raise ValueError(f"the mesh's expert axis ({self.num_devices} devices) does not divide the number "
                             f"of experts ({num_experts})")
        if self.placement is None:
            return placement_lib.contiguous(num_experts, self.num_devices)
        if len(self.placement) != num_experts:
            raise ValueError(f"placement has {len(self.placement)} entries but the model has {num_experts} experts")
        return placement_lib.check(self.placement, self.num_devices)

    def physical_order(self, num_experts: int) -> np.ndarray:
        """Logical expert held at each physical slot: device d holds slots [d * L, (d + 1) * L)."""
        return np.asarray(self.layout(num_experts).logical_of_slot, np.int32)


class ExpertOutput(NamedTuple):
    out: jax.Array  # [N, d] combined expert outputs
    needed_bucket: jax.Array  # int32: the largest per-(source, destination) count met (dynamic gating)
    kept: jax.Array  # bool [N, k]: pairs actually computed (static gating drops past its slots)


def _rank_in_group(group: jax.Array) -> jax.Array:
    """For each element, how many equal elements come before it."""
    order = jnp.argsort(group, stable=True)
    sorted_group = group[order]
    rank_sorted = jnp.arange(group.shape[0]) - jnp.searchsorted(sorted_group, sorted_group, side="left")
    return jnp.zeros_like(group).at[order].set(rank_sorted.astype(group.dtype))


def static_gating_keep(experts: jax.Array, keep: jax.Array, capacity: int) -> jax.Array:
    """fairseq's static-capacity rule on one device's pairs: an expert fills its `capacity` slots with all
    first choices in token order, then all second choices, ...; the rest are dropped. [n, k] -> [n, k]."""
    n, k = experts.shape
    flat_expert = jnp.where(keep, experts, -1).T.reshape(-1)  # choice-major order
    kept = (flat_expert >= 0) & (_rank_in_group(flat_expert) < capacity)
    return kept.reshape(k, n).T


def expert_parallel_ffn(x: jax.Array, r: Routing, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                        ep: ExpertParallel, activation: str) -> ExpertOutput:
    """The dispatch -> experts -> combine of one MoE block on ep.mesh. x [N, d]; weights in physical order,
    sharded over "expert". Tokens are padded to a multiple of the device count (padding keeps nothing)."""
    layout = ep.layout(r.scores.shape[-1])
    # From here on "experts" are physical slots: each pair's replica is token index mod its replica count.
    n = x.shape[0]
    count = jnp.asarray(layout.replica_count)[r.experts]
    replica = jnp.arange(n, dtype=jnp.int32)[:, None] % count
    experts = jnp.asarray(layout.replica_slots)[r.experts, replica]
    slots = np.arange(layout.num_slots, dtype=np.int32)
    device_of_expert, slot_of_expert = slots // layout.slots_per_device, slots % layout.slots_per_device
    devices = ep.mesh.size
    padded = -(-n // devices) * devices
    pad = padded - n
    keep, weights = r.keep, r.weights
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        experts, weights = jnp.pad(experts, ((0, pad), (0, 0))), jnp.pad(weights, ((0, pad), (0, 0)))
        keep = jnp.pad(keep, ((0, pad), (0, 0)))
    tokens = P((DATA, EXPERT))
    fn = _dynamic if ep.gating == "dynamic" else _static
    body = lambda *a: fn(*a, ep=ep, activation=activation, device_of_expert=jnp.asarray(device_of_expert),
                         slot_of_expert=jnp.asarray(slot_of_expert))
    out, needed, kept = jax.shard_map(
        body, mesh=ep.mesh, in_specs=(tokens, tokens, tokens, tokens, P(EXPERT), P(EXPERT), P(EXPERT)),
        out_specs=(tokens, P(), tokens), check_vma=False,
    )(x, experts, keep, weights.astype(jnp.float32), w_gate, w_up, w_down)
    return ExpertOutput(out[:n], needed, kept[:n])


def _combine(per_pair: jax.Array, weights: jax.Array, kept: jax.Array, dtype) -> jax.Array:
    n, k = weights.shape
    w = jnp.where(kept, weights, 0.0)
    return jnp.einsum("nkd,nk->nd", per_pair.reshape(n, k, -1).astype(jnp.float32), w).astype(dtype)


def _dynamic(x, experts, keep, weights, w_gate, w_up, w_down, *, ep, activation, device_of_expert, slot_of_expert):
    """Per device: send each kept pair's row to the device of its expert, compute, send results back."""
    n, k = experts.shape
    d = x.shape[-1]
    num_dev = ep.num_devices
    local_experts = w_gate.shape[0]
    pairs = n * k
    dest = jnp.where(keep, device_of_expert[experts], num_dev).reshape(-1)
    slot = slot_of_expert[experts].reshape(-1)
    # sort pairs by (destination, local expert slot there), so each chunk arrives grouped by expert
    order = jnp.lexsort((slot, dest))
    position = jnp.argsort(order)  # where each pair sits in sorted order
    send_counts = jnp.bincount(dest, length=num_dev + 1)[:num_dev].astype(jnp.int32)
    send_starts = (jnp.cumsum(send_counts) - send_counts).astype(jnp.int32)
    # counts first: every device learns what it will receive from every other
    recv_counts = jax.lax.all_to_all(send_counts, EXPERT, 0, 0, tiled=True)
    needed = jax.lax.pmax(jax.lax.pmax(send_counts.max(), EXPERT), DATA)
    dest_clamped = jnp.minimum(dest, num_dev - 1)
    offset = position - send_starts[dest_clamped]  # each pair's row in its destination chunk

    if ep.collective == "ragged":
        out_sorted = _ragged_round_trip(x[order // k], slot[order], send_counts, send_starts, recv_counts,
                                        w_gate, w_up, w_down, activation, local_experts, pairs)
        per_pair = out_sorted[position]
        kept = keep
    else:
        bucket = pairs if ep.bucket is None else min(ep.bucket, pairs)
        index = jnp.minimum(send_starts[:, None] + jnp.arange(bucket)[None, :], pairs - 1)  # [D, B]
        valid = jnp.arange(bucket)[None, :] < send_counts[:, None]
        source_pair = order[index]
        send = jnp.where(valid[..., None], x[source_pair // k], 0)  # [D, B, d]
        send_slot = jnp.where(valid, slot[source_pair], local_experts)  # sentinel after the real experts
        recv = jax.lax.all_to_all(send, EXPERT, 0, 0, tiled=True).reshape(num_dev * bucket, d)
        recv_slot = jax.lax.all_to_all(send_slot, EXPERT, 0, 0, tiled=True).reshape(-1)
        computed = _local_experts(recv, recv_slot, w_gate, w_up, w_down, activation, local_experts)
        back = jax.lax.all_to_all(computed.reshape(num_dev, bucket, d), EXPERT, 0, 0, tiled=True)
        arrived = (dest < num_dev) & (offset < bucket)  # rows past the bucket were not sent
        per_pair = jnp.where(arrived[:, None], back[dest_clamped, jnp.minimum(offset, bucket - 1)], 0)
        kept = keep & arrived.reshape(n, k)
        del recv_counts  # the padded path marks validity with the sentinel slot instead
    return _combine(per_pair, weights, kept, x.dtype), needed, kept


def _local_experts(rows, slots, w_gate, w_up, w_down, activation, local_experts):
    """Rows that arrived (any order, sentinel slot = padding) -> this device's expert outputs, same order."""
    order = jnp.argsort(slots, stable=True)
    group_sizes = jnp.bincount(slots, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    out_sorted = grouped_ffn(rows[order], group_sizes, w_gate, w_up, w_down, activation=activation)
    return out_sorted[jnp.argsort(order)]


def _ragged_round_trip(rows, sorted_slot, send_counts, send_starts, recv_counts, w_gate, w_up, w_down,
                       activation, local_experts, pairs):
    """GPU/TPU: ragged_all_to_all moves exactly the routed rows; the receive buffer holds every pair that
    could arrive (the worst case is all pairs of all sources), so nothing is truncated."""
    num_dev = send_counts.shape[0]
    d = rows.shape[-1]
    capacity = pairs * num_dev
    # where my chunk lands on each receiver: after the chunks of lower-numbered sources
    all_counts = jax.lax.all_gather(send_counts, EXPERT)  # [src, dst]
    me = jax.lax.axis_index(EXPERT)
    before_me = jnp.where(jnp.arange(num_dev)[:, None] < me, all_counts, 0).sum(0)  # [dst]
    recv_starts = (jnp.cumsum(recv_counts) - recv_counts).astype(jnp.int32)
    recv = jax.lax.ragged_all_to_all(rows, jnp.zeros((capacity, d), rows.dtype), send_starts, send_counts,
                                     before_me.astype(jnp.int32), recv_counts, axis_name=EXPERT)
    recv_slot = jax.lax.ragged_all_to_all(sorted_slot, jnp.full((capacity,), local_experts, jnp.int32),
                                          send_starts, send_counts, before_me.astype(jnp.int32), recv_counts,
                                          axis_name=EXPERT)
    computed = _local_experts(recv, recv_slot, w_gate, w_up, w_down, activation, local_experts)
    # the return trip mirrors the first: my received chunk from source s goes back to s at its send offset
    back_offsets = jax.lax.all_to_all(send_starts, EXPERT, 0, 0, tiled=True)
    return jax.lax.ragged_all_to_all(computed, jnp.zeros((pairs, d), rows.dtype), recv_starts, recv_counts,
                                     back_offsets, send_counts, axis_name=EXPERT)


def _static(x, experts, keep, weights, w_gate, w_up, w_down, *, ep, activation, device_of_expert, slot_of_expert):
    """Per device: fixed slots per expert (fairseq), one fixed-size all-to-all each way, padded compute."""
    n, k = experts.shape
    d = x.shape[-1]
    num_dev = ep.num_devices
    local_experts = w_gate.shape[0]
    num_experts = local_experts * num_dev
    capacity = max(1, math.ceil(ep.capacity_fraction * n))
    kept = static_gating_keep(experts, keep, capacity)
    # slot of each kept pair inside its expert's buffer: its rank in fairseq's order
    rank = _rank_in_group(jnp.where(kept, experts, num_experts).T.reshape(-1)).reshape(k, n).T
    physical = device_of_expert[experts] * local_experts + slot_of_expert[experts]  # [n, k]
    target = jnp.where(kept, physical * capacity + rank, num_experts * capacity)  # one spare row for dropped
    rows = jnp.broadcast_to(x[:, None, :], (n, k, d)).reshape(-1, d)
    buffer = jnp.zeros((num_experts * capacity + 1, d), x.dtype).at[target.reshape(-1)].set(rows)
    send = buffer[:-1].reshape(num_dev, local_experts * capacity, d)
    recv = jax.lax.all_to_all(send, EXPERT, 0, 0, tiled=True)  # [src, local experts * C, d]
    recv = recv.reshape(num_dev, local_experts, capacity, d).transpose(1, 0, 2, 3).reshape(local_experts, -1, d)
    act = ACTIVATIONS[activation]
    h = act(jnp.einsum("ecd,edf->ecf", recv, w_gate)) * jnp.einsum("ecd,edf->ecf", recv, w_up)
    y = jnp.einsum("ecf,efd->ecd", h, w_down)  # every slot computed, padding included: the static waste
    y = y.reshape(local_experts, num_dev, capacity, d).transpose(1, 0, 2, 3).reshape(num_dev, -1, d)
    back = jax.lax.all_to_all(y, EXPERT, 0, 0, tiled=True).reshape(num_experts * capacity, d)
    back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)])
    per_pair = back[target.reshape(-1)]
    return _combine(per_pair, weights, kept, x.dtype), jnp.int32(capacity), kept


# ---------------------------------------------------------------------------------------------------------
# Whole models


def expert_parallel(model, mesh: Mesh, gating: str = "dynamic", *, placements=None, **options):
    """The same model (parameters shared where they need not move) with every MoE block expert-parallel on
    `mesh`: expert weights permuted into physical order (replicated experts copied into each of their
    slots) and sharded over "expert", the rest replicated. `placement=` applies to every MoE block;
    `placements=` gives one per MoE block instead (routing differs between layers)."""
    from moejax.models.transformer import MoEBlock  # local import: models import this module

    ep = ExpertParallel(mesh, gating, **options)
    new = nnx.clone(model)  # new Variables over the same arrays: set_value below must not touch `model`
    blocks = new.moe_blocks()
    if placements is not None:
        if "placement" in options:
            raise ValueError("expert_parallel: pass placement= (every block) or placements= (one per block), not both")
        if len(placements) != len(blocks):
            raise ValueError(f"expert_parallel: {len(placements)} placements for {len(blocks)} MoE blocks")
    expert_weights = set()
    for i, block in enumerate(blocks):
        assert isinstance(block, MoEBlock)
        if placements is not None:
            ep = dataclasses.replace(ep, placement=placements[i])
        order = ep.physical_order(block.config.num_experts)  # validates the expert axis
        for w in (block.w_gate, block.w_up, block.w_down):
            w.set_value(global_array(np.asarray(w.get_value())[order], NamedSharding(mesh, P(EXPERT))))
            expert_weights.add(id(w))
        block.parallel = ep
    for _, var in nnx.iter_graph(new):
        if isinstance(var, nnx.Variable) and id(var) not in expert_weights:
            var.set_value(global_array(np.asarray(var.get_value()), NamedSharding(mesh, P())))
    return new


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds in full (works across processes too)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def with_bucket(model, bucket: int | None):
    """The model with dynamic gating's padded buffer set to `bucket` rows in every MoE block."""
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    for block in new.moe_blocks():
        block.parallel = dataclasses.replace(block.parallel, bucket=bucket)
    return new


def bucket_sizes(pairs_per_device: int, num_devices: int) -> list[int]:
    """The buffer sizes dynamic gating may compile: the balanced share times 1, 1.5, 2, 3, 4, 6, ... up to
    every pair of a device (which can never overflow)."""
    balanced = max(1, -(-pairs_per_device // num_devices))
    sizes, factor = [], 1.0
    while True:
        size = min(pairs_per_device, math.ceil(balanced * factor))
        sizes.append(size)
        if size == pairs_per_device:
            return sorted(set(sizes))
        factor *= 1.5 if len(sizes) % 2 else 4 / 3


class ExpertParallelRunner:
    """Runs a jitted function of an expert-parallel model with dynamic gating's bucket chosen from the
    counts: start from the smallest bucket, and when a run reports a larger count than its bucket, run again
    with the smallest bucket that fits (the result of an overflowing run is discarded, never returned).
    `compiled_buckets` lists the shapes compiled so far."""

    def __init__(self, model, fn):
        self.model = model
        self.fn = fn  # fn(model, *args) -> (result, needed_bucket)
        self.bucket = None
        self.compiled_buckets: set[int] = set()
        self._models = {}

    def __call__(self, *args, pairs_per_device: int):
        ep = self.model.moe_blocks()[0].parallel
        sizes = bucket_sizes(pairs_per_device, ep.num_devices)
        bucket = self.bucket if self.bucket in sizes else sizes[0]
        while True:
            model = self._models.setdefault(bucket, with_bucket(self.model, bucket))
            self.compiled_buckets.add(bucket)
            result, needed = self.fn(model, *args)
            needed = int(needed)
            if needed <= bucket:
                self.bucket = bucket
                return result
            bucket = next(s for s in sizes if s >= needed)
