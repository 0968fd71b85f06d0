"""Expert parallelism: experts sharded over the mesh axis "expert", tokens over every device, and the MoE
block's dispatch / experts / combine under `jax.shard_map` with all-to-alls over "expert".

Two gatings (papers.md B):
  * static:  every expert gets ceil(capacity_fraction * local tokens) slots per source device, unused slots
             padded, one fixed-size all-to-all; pairs past an expert's slots are dropped (fairseq's rule:
             all first choices in token order, then all second choices, ...). It drops tokens even at the
             default fraction: `expert_parallel` warns, and the forward's routings mark the pairs computed
             (`keep`), so `stats.layer_loads(...)` reports the drop rate.
  * dynamic: only what is routed moves. Per-device counts are exchanged first; then either
             `jax.lax.ragged_all_to_all` (GPU, TPU) or, where the backend lacks it (CPU), a padded
             `all_to_all` whose per-(source, destination) buffer holds `bucket` rows. The bucket is static:
             a forward reports the largest count it met, and `ExpertParallelRunner` re-runs with the next
             bucket of a small geometric set when it did not fit, so no token is ever truncated and few
             shapes compile.

Routing and capacity policies run before dispatch on the global token set, exactly as on one device, so
policies work unchanged. The block's `layout.Layout` (mesh + placement, shared with the policy) decides
which device computes each expert and holds each token. With replicas, each (token, expert) pair goes to
replica (token index mod replicas) of its expert: an even split that needs no communication.

`ExpertParallel` is an experts backend (moejax.experts); `expert_parallel(model, mesh, ...)` returns the
model with it and the mesh's layout in every MoE block's runtime. This module imports the models, never
the reverse.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from flax import nnx

from moejax import dispatch, experts as experts_lib
from moejax.config import is_integer
from moejax import kernels
from moejax.layout import DATA, EXPERT, Layout, make_mesh  # noqa: F401 (make_mesh: re-exported)
from moejax.models import with_expert_storage, with_experts, with_runtime
from moejax.models.moe import EXPERT_FIELDS
from moejax.routing import Routing

GATINGS = ("dynamic", "static")
ALL_TO_ALLS = ("auto", "padded", "ragged")


def default_all_to_all() -> str:
    """The one place the backend picks the dynamic-gating collective: ragged where XLA implements it."""
    return "ragged" if jax.default_backend() in ("gpu", "tpu") else "padded"


@experts_lib.register
@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """The experts backend that runs a MoE block's experts sharded over its layout's mesh (static: part of
    the compiled program). bucket (dynamic gating): rows per buffer, per (source, destination) on the
    padded all-to-all, per receiving device on the ragged one; None: the worst case, never truncates."""

    gating: str = "dynamic"
    capacity_fraction: float = 0.25  # static gating: slots per expert per source device, as a fraction of its tokens
    bucket: int | None = None
    all_to_all: str = "auto"
    name = "expert_parallel"

    def __post_init__(self):
        if self.gating not in GATINGS:
            raise ValueError(f"unknown dispatch mode (gating) {self.gating!r}; supported: {GATINGS}")
        if self.all_to_all not in ALL_TO_ALLS:
            raise ValueError(f"unknown all_to_all {self.all_to_all!r}; supported: {ALL_TO_ALLS}")
        fraction = self.capacity_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) or \
                not 0 < fraction < math.inf:
            raise ValueError(f"capacity_fraction={fraction!r} must be a finite number > 0")
        if self.bucket is not None and not (is_integer(self.bucket) and self.bucket >= 1):
            raise ValueError(f"bucket={self.bucket!r} must be an integer >= 1 or None")

    @property
    def collective(self) -> str:
        return default_all_to_all() if self.all_to_all == "auto" else self.all_to_all

    def supported(self, layout: Layout | None) -> str | None:
        if layout is None or layout.mesh is None:
            return "expert parallelism needs a layout with a mesh (moejax.parallel.expert_parallel builds it)"
        return None

    def __call__(self, x, routing, weights, layout, activation) -> experts_lib.ExpertsOutput:
        return expert_parallel_ffn(x, routing, weights, layout, self, activation)


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


def expert_parallel_ffn(x: jax.Array, r: Routing, weights: experts_lib.ExpertWeights, layout: Layout,
                        ep: ExpertParallel, activation: str) -> experts_lib.ExpertsOutput:
    """The dispatch -> experts -> combine of one MoE block on layout.mesh. x [N, d]; weights in physical
    order, sharded over "expert". Tokens are padded to a multiple of the device count (padding keeps
    nothing) and split over (data, expert) as `layout.token_devices` says."""
    mesh, layout = layout.mesh, layout.placement
    # From here on "experts" are physical slots: each pair's replica is token index mod its replica count.
    n = x.shape[0]
    count = jnp.asarray(layout.replica_count)[r.experts]
    replica = jnp.arange(n, dtype=jnp.int32)[:, None] % count
    experts = jnp.asarray(layout.replica_slots)[r.experts, replica]
    slots = np.arange(layout.num_slots, dtype=np.int32)
    device_of_expert, slot_of_expert = slots // layout.slots_per_device, slots % layout.slots_per_device
    devices = mesh.size
    padded = -(-n // devices) * devices
    pad = padded - n
    keep, weights, expert_weights = r.keep, r.weights, weights
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        experts, weights = jnp.pad(experts, ((0, pad), (0, 0))), jnp.pad(weights, ((0, pad), (0, 0)))
        keep = jnp.pad(keep, ((0, pad), (0, 0)))
    tokens = P((DATA, EXPERT))
    fn = _dynamic if ep.gating == "dynamic" else _static
    body = lambda *a: fn(*a, ep=ep, num_dev=layout.num_devices, activation=activation,
                         device_of_expert=jnp.asarray(device_of_expert), slot_of_expert=jnp.asarray(slot_of_expert))
    every_leaf_by_expert = jax.tree.map(lambda _: P(EXPERT), expert_weights)  # the ExpertWeights' present leaves
    out, needed, kept = jax.shard_map(
        lambda x, e, k, w, experts: body(x, e, k, w, _local(experts)), mesh=mesh,
        in_specs=(tokens, tokens, tokens, tokens, every_leaf_by_expert), out_specs=(tokens, P(), tokens),
        check_vma=False,
    )(x, experts, keep, weights.astype(jnp.float32), expert_weights)
    return experts_lib.ExpertsOutput(out[:n], kept[:n], needed)


def _local(expert_weights):
    """A device's share of the experts inside shard_map: stacked [local experts, ...] as they are; split
    ones (expert_parallel of a split model: one array [1, ...] per local slot) as this device's SplitExperts,
    each array read in place."""
    if isinstance(expert_weights, kernels.SplitExperts):
        return kernels.SplitExperts(tuple(jax.tree.map(lambda a: a[0], e) for e in expert_weights.experts))
    return expert_weights


def _dynamic(x, experts, keep, weights, expert_weights, *, ep, num_dev, activation, device_of_expert,
             slot_of_expert):
    """Per device: send each kept pair's row to the device of its expert, compute, send results back.
    expert_weights: this device's ExpertWeights."""
    n, k = experts.shape
    d = x.shape[-1]
    local_experts = expert_weights.num_experts
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
    dest_clamped = jnp.minimum(dest, num_dev - 1)
    offset = position - send_starts[dest_clamped]  # each pair's row in its destination chunk

    if ep.collective == "ragged":
        needed = jax.lax.pmax(jax.lax.pmax(recv_counts.sum(), EXPERT), DATA)
        receive_rows = pairs * num_dev if ep.bucket is None else min(ep.bucket, pairs * num_dev)
        out_sorted, sent = _ragged_round_trip(x[order // k], slot[order], send_counts, send_starts, expert_weights,
                                              activation, pairs, receive_rows)
        per_pair = out_sorted[position]
        arrived = (dest < num_dev) & (offset < sent[dest_clamped])  # rows past a full receiver were not sent
        kept = keep & arrived.reshape(n, k)
    else:
        needed = jax.lax.pmax(jax.lax.pmax(send_counts.max(), EXPERT), DATA)
        bucket = pairs if ep.bucket is None else min(ep.bucket, pairs)
        index = jnp.minimum(send_starts[:, None] + jnp.arange(bucket)[None, :], pairs - 1)  # [D, B]
        valid = jnp.arange(bucket)[None, :] < send_counts[:, None]
        source_pair = order[index]
        send = jnp.where(valid[..., None], x[source_pair // k], 0)  # [D, B, d]
        send_slot = jnp.where(valid, slot[source_pair], local_experts)  # sentinel after the real experts
        recv = jax.lax.all_to_all(send, EXPERT, 0, 0, tiled=True).reshape(num_dev * bucket, d)
        recv_slot = jax.lax.all_to_all(send_slot, EXPERT, 0, 0, tiled=True).reshape(-1)
        computed = _local_experts(recv, recv_slot, expert_weights, activation)
        back = jax.lax.all_to_all(computed.reshape(num_dev, bucket, d), EXPERT, 0, 0, tiled=True)
        arrived = (dest < num_dev) & (offset < bucket)  # rows past the bucket were not sent
        per_pair = jnp.where(arrived[:, None], back[dest_clamped, jnp.minimum(offset, bucket - 1)], 0)
        kept = keep & arrived.reshape(n, k)
        del recv_counts  # the padded path marks validity with the sentinel slot instead
    return dispatch.weighted_sum(per_pair, weights, kept).astype(x.dtype), needed, kept


def _local_experts(rows, slots, expert_weights, activation):
    """Rows that arrived (any order, sentinel slot = padding) -> this device's expert outputs, same order."""
    local_experts = expert_weights.num_experts
    order = jnp.argsort(slots, stable=True)
    group_sizes = jnp.bincount(slots, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    out_sorted = kernels.grouped_ffn(rows[order], group_sizes, expert_weights, activation=activation)
    return out_sorted[jnp.argsort(order)]


def _ragged_round_trip(rows, sorted_slot, send_counts, send_starts, expert_weights, activation, pairs, receive_rows):
    """GPU/TPU: ragged_all_to_all moves exactly the routed rows into a receive buffer of `receive_rows`
    rows per device (all pairs of all sources can never overflow it; a smaller one is a bucket, see
    ExpertParallelRunner). Chunks arrive in source order; what would land past the buffer is not sent.
    Returns (outputs in sorted pair order, rows actually sent to each destination)."""
    d = rows.shape[-1]
    all_counts = jax.lax.all_gather(send_counts, EXPERT)  # [src, dst]
    before = jnp.cumsum(all_counts, axis=0) - all_counts  # [src, dst]: rows that land before src's chunk
    fits = jnp.clip(receive_rows - before, 0, all_counts).astype(jnp.int32)  # [src, dst]
    me = jax.lax.axis_index(EXPERT)
    sent, recv_counts = fits[me], fits[:, me]
    offsets = before[me].astype(jnp.int32)  # where my chunk lands on each receiver
    recv_starts = (jnp.cumsum(recv_counts) - recv_counts).astype(jnp.int32)
    recv = jax.lax.ragged_all_to_all(rows, jnp.zeros((receive_rows, d), rows.dtype), send_starts, sent, offsets,
                                     recv_counts, axis_name=EXPERT)
    sentinel = expert_weights.num_experts  # the slot after this device's experts: padding
    recv_slot = jax.lax.ragged_all_to_all(sorted_slot, jnp.full((receive_rows,), sentinel, jnp.int32),
                                          send_starts, sent, offsets, recv_counts, axis_name=EXPERT)
    computed = _local_experts(recv, recv_slot, expert_weights, activation)
    # the return trip mirrors the first: my received chunk from source s goes back to s at its send offset
    back_offsets = jax.lax.all_to_all(send_starts, EXPERT, 0, 0, tiled=True)
    back = jax.lax.ragged_all_to_all(computed, jnp.zeros((pairs, d), rows.dtype), recv_starts, recv_counts,
                                     back_offsets, sent, axis_name=EXPERT)
    return back, sent


def _static(x, experts, keep, weights, expert_weights, *, ep, num_dev, activation, device_of_expert,
            slot_of_expert):
    """Per device: fixed slots per expert (fairseq), one fixed-size all-to-all each way, padded compute.
    expert_weights: this device's ExpertWeights."""
    n, k = experts.shape
    d = x.shape[-1]
    local_experts = expert_weights.num_experts
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
    y = kernels.batched_ffn(recv, expert_weights, activation=activation)  # every slot, padding too: the static waste
    y = y.reshape(local_experts, num_dev, capacity, d).transpose(1, 0, 2, 3).reshape(num_dev, -1, d)
    back = jax.lax.all_to_all(y, EXPERT, 0, 0, tiled=True).reshape(num_experts * capacity, d)
    back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)])
    per_pair = back[target.reshape(-1)]
    return dispatch.weighted_sum(per_pair, weights, kept).astype(x.dtype), jnp.int32(capacity), kept


# ---------------------------------------------------------------------------------------------------------
# Whole models


def expert_parallel(model, mesh: Mesh, gating: str = "dynamic", *, placement=None, placements=None, **options):
    """The same model (parameters shared where they need not move) with every MoE block expert-parallel on
    `mesh`: its runtime's experts backend `ExpertParallel(gating, **options)` and layout the mesh with its
    placement; expert weights permuted into physical order (replicated experts copied into each of their
    slots) and sharded over "expert", the rest replicated. The caller's model is left as it was.

    placement= (device_of_expert, a placement.Placement, or None: contiguous blocks) applies to every MoE
    block; placements= gives one per MoE block instead (routing differs between layers)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r} must be a jax.sharding.Mesh (moejax.parallel.make_mesh())")
    backend = ExpertParallel(gating, **options)
    if backend.gating == "static" and backend.capacity_fraction < 1:  # >= 1: a slot for every token, no drop
        warnings.warn(static_gating_note(backend.capacity_fraction), UserWarning, stacklevel=2)
    blocks = model.moe_blocks()
    split = {block.expert_storage for block in blocks} == {"split"}
    if split:  # permuted and sharded stacked, then each device's local experts split (below)
        model = with_expert_storage(model, "stacked")
        blocks = model.moe_blocks()
    if placements is not None:
        if placement is not None:
            raise ValueError("expert_parallel: pass placement= (every block) or placements= (one per block), not both")
        if len(placements) != len(blocks):
            raise ValueError(f"expert_parallel: {len(placements)} placements for {len(blocks)} MoE blocks")
    else:
        placements = [placement] * len(blocks)
    runtimes = []
    for block, p in zip(blocks, placements):
        layout = Layout.build(block.config.num_experts, placement=p, mesh=mesh)  # validates the expert axis
        runtimes.append(dataclasses.replace(block.runtime, experts=backend, layout=layout))
    new = nnx.clone(with_runtime(model, runtimes))  # new Variables: set_value below must not touch `model`
    expert_weights = set()
    by_expert = NamedSharding(mesh, P(EXPERT))
    for block in new.moe_blocks():
        order = np.asarray(block.layout.placement.logical_of_slot)
        local = block.layout.placement.slots_per_device
        for name, w in zip(EXPERT_FIELDS, block.expert_variables()):
            if w is None:
                continue
            physical = np.asarray(w.get_value())[order]  # slot s sits on device s // local
            if split:  # local slot j of every device in one array [devices, ...], sharded over "expert"
                held = nnx.List([nnx.Param(global_array(physical[j::local], by_expert)) for j in range(local)])
                setattr(block, name, held)
                expert_weights.update(id(p) for p in held)
            else:
                w.set_value(global_array(physical, by_expert))
                expert_weights.add(id(w))
    for _, var in nnx.iter_graph(new):
        if isinstance(var, nnx.Variable) and id(var) not in expert_weights:
            var.set_value(global_array(np.asarray(var.get_value()), NamedSharding(mesh, P())))
    return new


def static_gating_note(capacity_fraction: float) -> str:
    """What static gating costs, said where it is switched on (the warning expert_parallel gives)."""
    return (f"static gating drops tokens: each expert takes at most ceil({capacity_fraction} x local tokens) pairs "
            "from each device and the rest are dropped (not computed), so logits differ from dropless ones; "
            "model.forward(...).routings[layer].keep marks the pairs computed and "
            "moejax.stats.layer_loads(routings, token_mask)[layer].drop_rate is the drop rate. Use "
            "gating='dynamic' (the default) to drop nothing.")


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds in full (works across processes too)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def with_bucket(model, bucket: int | None):
    """The model with dynamic gating's buffer set to `bucket` rows in every MoE block."""
    backends = {dataclasses.replace(b.runtime.experts, bucket=bucket) for b in model.moe_blocks()}
    if len(backends) != 1:
        raise ValueError("with_bucket: the MoE blocks run different experts backends")
    return with_experts(model, backends.pop())


def bucket_sizes(pairs_per_device: int, num_devices: int, ragged: bool = False) -> list[int]:
    """The buffer sizes dynamic gating may compile: the balanced load times 1, 1.5, 2, 3, 4, 6, ... up to the
    worst case (which can never overflow). Padded all-to-all: rows per (source, destination), balanced
    pairs / D, worst every pair of a device. Ragged: rows a device receives, balanced its own pair count,
    worst every pair of every device."""
    balanced = pairs_per_device if ragged else max(1, -(-pairs_per_device // num_devices))
    worst = pairs_per_device * num_devices if ragged else pairs_per_device
    sizes, factor = [], 1.0
    while True:
        size = min(worst, math.ceil(balanced * factor))
        sizes.append(size)
        if size == worst:
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
        block = self.model.moe_blocks()[0]
        sizes = bucket_sizes(pairs_per_device, block.layout.num_devices,
                             block.runtime.experts.collective == "ragged")
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
