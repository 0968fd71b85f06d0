"""The jitted, data-parallel train step (AdamW) and orbax checkpoints that resume exactly."""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.experts import Resident
from moejax.models import with_experts
from moejax.training.losses import LossTerms, LossWeights, for_training, lm_loss


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.1,
                   end_fraction: float = 0.1, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to end_fraction * learning_rate; global-norm clipping.
    Weight decay applies to matrices only (not norms)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                  max(total_steps, warmup_steps + 1), learning_rate * end_fraction)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                                   mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # int32: the number of steps taken


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over `devices` (default: all) with the axis "data": batches are split along it, parameters
    and optimizer state are replicated."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class Trainer:
    """The jitted, data-parallel train step of one model and optimizer.

    state: TrainState (float32 master parameters). compute_dtype "bfloat16" casts the parameters for the
    forward and backward passes only; the update stays in float32. capacity_factor: of the training experts
    step (module docstring).
    """

    def __init__(self, model, optimizer: optax.GradientTransformation, weights: LossWeights,
                 mesh: jax.sharding.Mesh, compute_dtype: str = "float32", capacity_factor: float = 2.0,
                 loss: Callable = lm_loss):
        self.graphdef, params = nnx.split(for_training(model, capacity_factor))
        self.optimizer = optimizer
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        compute = jnp.dtype(compute_dtype)
        graphdef = self.graphdef

        def loss_fn(params, batch):
            cast = jax.tree.map(lambda p: p.astype(compute) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
            terms = loss(nnx.merge(graphdef, cast), batch, weights)
            return terms.total, terms

        def step(state: TrainState, batch):
            (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainState(params, opt_state, state.step + 1), terms

        def evaluate(params, batch):
            return loss_fn(params, batch)[1]

        self._step = jax.jit(step, donate_argnums=0)
        self._evaluate = jax.jit(evaluate)
        self._initial_params = params

    def init(self) -> TrainState:
        # from host copies: the step donates its input state, which must never alias the initial parameters
        params = jax.device_put(jax.device_get(self._initial_params), self.replicated)
        opt_state = jax.device_put(self.optimizer.init(params), self.replicated)
        return TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), self.replicated))

    def _shard(self, batch: tuple) -> tuple:
        batch = tuple(np.asarray(a) for a in batch)
        for a in batch:
            if a.shape[0] % self.mesh.size:
                raise ValueError(f"batch size {a.shape[0]} must be a multiple of the {self.mesh.size} devices "
                                 "of the data axis")
        return tuple(jax.device_put(a, self.batch_sharding) for a in batch)

    def step(self, state: TrainState, *batch: np.ndarray):
        """One optimizer step on the loss's batch (the language model's: tokens int [B, T+1] and optionally
        their mask) -> (new state, LossTerms of the step's input state)."""
        return self._step(state, self._shard(batch))

    def evaluate(self, state: TrainState, *batch: np.ndarray) -> LossTerms:
        return self._evaluate(state.params, self._shard(batch))

    def model(self, state: TrainState):
        """The trained model for inference (default experts implementation again), on the host."""
        return with_experts(nnx.merge(self.graphdef, jax.device_get(state.params)), Resident())


class Checkpoints:
    """orbax CheckpointManager over TrainState: save every `interval` steps, keep the last `keep`."""

    def __init__(self, directory: str, interval: int, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(save_interval_steps=interval, max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, force: bool = False) -> None:
        step = int(state.step)
        self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)

    def restore(self, like: TrainState) -> TrainState:
        """The latest checkpoint, placed like the `like` state (same shardings)."""
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        restored = self.manager.restore(self.manager.latest_step(), args=self._ocp.args.StandardRestore(abstract))
        return TrainState(*restored)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
