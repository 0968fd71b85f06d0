"""What every grouped-matmul backend shares: the experts' weights (ExpertWeights) and activations, the FFN
math, the input checks, the row bookkeeping of the sorted layout, and the Implementation base class the API
dispatches over.

Layout: x [N, d] holds the rows of group 0, then group 1, ...; group_sizes int [E]; rows past
sum(group_sizes) are padding. `capacity` (optional) means only the first min(count, capacity) rows of each
group are computed; every row not computed (padding, past a capacity) comes out as exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, NamedTuple, Union

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's gated activation of (gate, up): the gate clamped above at `limit`, up clamped to
    [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate). Frozen and hashable, so an activation
    stays a static part of the compiled program like a name of ACTIVATIONS."""
    limit: float
    alpha: float = 1.702

    def __call__(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))


Activation = Union[str, ClampedSwiGLU]


class ExpertWeights(NamedTuple):
    """A MoE block's routed experts, each present leaf with a leading expert axis E (physical order under a
    layout with a mesh): gate, up [E, d, f], down [E, f, d], gate_bias, up_bias [E, f], down_bias [E, d].

    Per row x of expert e: act(x @ gate[e] + gate_bias[e]) * (x @ up[e] + up_bias[e]) @ down[e] + down_bias[e]
    (a gated FFN; a ClampedSwiGLU takes the gate and up pre-activations together), or with gate None a plain
    one, act(x @ up[e] + up_bias[e]) @ down[e] + down_bias[e] (NLLB-MoE, Switch). An absent bias is 0.
    Code that moves or slices experts maps over the present leaves (jax.tree.map skips the Nones), never
    names them. The field order is grouped_ffn's positional order: grouped_ffn(x, group_sizes, *weights)."""

    gate: jax.Array | None
    up: jax.Array
    down: jax.Array
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    def expected_shapes(self, e: int, d: int) -> dict[str, tuple[int, ...]]:
        """The shape each field must have over e experts of width d (f: the first matrix's width)."""
        f = (self.up if self.gate is None else self.gate).shape[-1]
        return {"gate": (e, d, f), "up": (e, d, f), "down": (e, f, d), "gate_bias": (e, f), "up_bias": (e, f),
                "down_bias": (e, d)}


class SplitExperts(NamedTuple):
    """The same routed experts with each expert's weights held as arrays of its own: experts[e] is an
    ExpertWeights of expert e alone, without the expert axis (gate, up [d, f], down [f, d], biases [f] / [d]).

    Why: XLA:CPU copies any slice of a stacked [E, d, f] array before a dot reads it, so a decode step of a
    stacked model copies each active expert's weights once more than it reads them; the "xla"
    implementation switches over split experts and its dots read them in place. Every other implementation
    takes them stacked (`stacked()`, one copy of every expert per call; differentiable)."""

    experts: tuple[ExpertWeights, ...]

    @classmethod
    def of(cls, weights: ExpertWeights) -> SplitExperts:
        """Stacked ExpertWeights split into one ExpertWeights per expert (copies)."""
        return cls(tuple(jax.tree.map(lambda w, e=e: w[e], weights) for e in range(weights.num_experts)))

    def stacked(self) -> ExpertWeights:
        return jax.tree.map(lambda *per_expert: jnp.stack(per_expert), *self.experts)

    @property
    def gated(self) -> bool:
        return self.experts[0].gated

    @property
    def num_experts(self) -> int:
        return len(self.experts)


Weights = Union[ExpertWeights, SplitExperts]


def stacked(weights: Weights) -> ExpertWeights:
    """The weights as stacked ExpertWeights (SplitExperts stacked: a copy of every expert)."""
    return weights.stacked() if isinstance(weights, SplitExperts) else weights


def as_expert_weights(weights: tuple) -> Weights:
    """An entry point's positional weights (one ExpertWeights or SplitExperts, or ExpertWeights' fields in
    order) as an ExpertWeights or a SplitExperts."""
    if len(weights) == 1 and isinstance(weights[0], (ExpertWeights, SplitExperts)):
        return weights[0]
    if not 3 <= len(weights) <= len(ExpertWeights._fields):
        raise ValueError(f"expected the expert weights (gate, up, down[, gate_bias, up_bias, down_bias]) or one "
                         f"ExpertWeights; got {len(weights)} arrays")
    return ExpertWeights(*weights)


# the names errors give the fields (w_*: the matrices' names since the first grouped_ffn)
_FIELD_NAMES = {"gate": "w_gate", "up": "w_up", "down": "w_down", "gate_bias": "gate_bias", "up_bias": "up_bias",
                "down_bias": "down_bias"}


def expert_hidden(activation: Activation, gate: jax.Array | None, up: jax.Array) -> jax.Array:
    """The FFN's hidden from the (bias-added, f32) pre-activations: act(gate) * up, a ClampedSwiGLU of both,
    or act(up) where there is no gate. The one place every implementation applies its activation."""
    if gate is None:
        return ACTIVATIONS[activation](up)
    if isinstance(activation, ClampedSwiGLU):
        return activation(gate, up)
    return ACTIVATIONS[activation](gate) * up


def ffn(x: jax.Array, weights: ExpertWeights, activation: Activation, project: Callable) -> jax.Array:
    """The FFN math of `weights` on x, through the layout's `project(inputs, weight, bias) -> f32 inputs @ weight
    (+ bias where not None)`: one expert's matmul, a batched one, a ragged one. The hidden goes to the down
    projection in x.dtype. -> f32."""
    gate = None if weights.gate is None else project(x, weights.gate, weights.gate_bias)
    hidden = expert_hidden(activation, gate, project(x, weights.up, weights.up_bias))
    return project(hidden.astype(x.dtype), weights.down, weights.down_bias)


def with_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """f32 y plus a bias broadcast over its rows (None: y)."""
    return y if bias is None else y + bias.astype(jnp.float32)


def has_bias(weights: ExpertWeights) -> bool:
    return any(b is not None for b in (weights.gate_bias, weights.up_bias, weights.down_bias))


def check_activation(activation: Activation, gated: bool = True) -> None:
    if isinstance(activation, ClampedSwiGLU):
        if not gated:
            raise ValueError(f"activation {activation!r} is a gated activation; the experts have no gate weights")
        return
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; supported: {sorted(ACTIVATIONS)} or a ClampedSwiGLU")


def check_expert_weights(weights: Weights, e: int, d: int, context: str) -> None:
    """Every present field of `weights` has its shape over e experts of width d (split experts: each
    expert's, without the expert axis, and every expert has the same fields); a gate bias needs a gate."""
    if isinstance(weights, SplitExperts):
        if weights.num_experts != e:
            raise ValueError(f"{weights.num_experts} split experts given for {context}")
        fields = [name for name, w in zip(ExpertWeights._fields, weights.experts[0]) if w is not None]
        for i, expert in enumerate(weights.experts):
            present = [name for name, w in zip(ExpertWeights._fields, expert) if w is not None]
            if present != fields:
                raise ValueError(f"split expert {i} has the fields {present}; expert 0 has {fields}")
            _check_fields(expert, {k: s[1:] for k, s in expert.expected_shapes(e, d).items()},
                          f"expert {i} of {context}")
        return
    _check_fields(weights, weights.expected_shapes(e, d), context)


def _check_fields(weights: ExpertWeights, expected: dict[str, tuple[int, ...]], context: str) -> None:
    if weights.gate is None and weights.gate_bias is not None:
        raise ValueError("gate_bias is given but gate is None (a non-gated FFN has no gate bias)")
    check_weights(tuple((_FIELD_NAMES[name], w, expected[name]) for name, w in zip(weights._fields, weights)
                        if w is not None), context)


def check_weights(named: tuple[tuple[str, jax.Array, tuple], ...], context: str) -> None:
    for name, w, expected in named:
        if w.shape != expected:
            raise ValueError(f"{name} has shape {w.shape}; expected {expected} for {context}")


def check_inputs(x: jax.Array, group_sizes: jax.Array, weights: Weights | jax.Array,
                 activation: Activation | None = None) -> None:
    """Shapes of a grouped matmul (one weight `w` [E, d, f]) or a grouped FFN (ExpertWeights); errors name
    the bad value."""
    if x.ndim != 2:
        raise ValueError(f"x must be [rows, d]; got shape {x.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an int vector [E]; got {group_sizes.dtype}{list(group_sizes.shape)}")
    e, d = group_sizes.shape[0], x.shape[1]
    context = f"x {x.shape} and {e} groups"
    if isinstance(weights, (ExpertWeights, SplitExperts)):
        check_expert_weights(weights, e, d, context)
        if activation is not None:
            check_activation(activation, weights.gated)
    else:
        check_weights((("w", weights, (e, d, weights.shape[-1])),), context)


def group_of_rows(group_sizes: jax.Array, n: int) -> jax.Array:
    """int [N]: each row's group; E for padding rows."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(n), side="right")


def rank_in_group(group_sizes: jax.Array, n: int) -> jax.Array:
    """int [N]: each row's position inside its group (padding rows: their position after the last group)."""
    starts = jnp.concatenate([jnp.zeros((1,), group_sizes.dtype), jnp.cumsum(group_sizes)])
    return jnp.arange(n) - starts[group_of_rows(group_sizes, n)]


def computed_groups(group_sizes: jax.Array, n: int, capacity: int | None) -> jax.Array:
    """int [N]: each row's group; E (no group) for padding rows and rows past a group's capacity."""
    group = group_of_rows(group_sizes, n)
    if capacity is not None:
        group = jnp.where(rank_in_group(group_sizes, n) < capacity, group, group_sizes.shape[0])
    return group


def zero_uncomputed_rows(out: jax.Array, group_sizes: jax.Array, capacity: int | None) -> jax.Array:
    """0 for padding rows and rows past a group's capacity, for backends that compute or leave them."""
    computed = computed_groups(group_sizes, out.shape[0], capacity) < group_sizes.shape[0]
    return jnp.where(computed[:, None], out, 0)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run the grouped matmuls, with its own typed, frozen `config` (tiles and the like), so an
    implementation object is hashable and can be a static argument.

    A subclass sets `name`, implements `_ffn` and `_matmul`, and says in `supported` which calls it can
    take. `ffn` / `matmul` raise NotImplementedError with the reason for the others: the API then tries the
    next implementation of a sequence, or tells the caller who named this one why it cannot serve.
    `takes_split_experts`: its _ffn reads SplitExperts as they are; else `ffn` stacks them first."""

    name: ClassVar[str] = ""
    takes_split_experts: ClassVar[bool] = False
    config: Any = None

    def supported(self, x: jax.Array, weights: tuple[jax.Array] | ExpertWeights, *,
                  capacity: int | None) -> str | None:
        """None when this implementation can take these inputs on this backend, else why not. `weights` is
        (w,) for a grouped matmul, an ExpertWeights for a grouped FFN. (An activation it cannot apply: its
        _ffn raises NotImplementedError.)"""
        del x, weights, capacity
        return None

    def autotuning_configs(self) -> tuple[Any, ...]:
        """The configs `autotune` times; by default only this implementation's own."""
        return (self.config,)

    def ffn(self, x, group_sizes, weights: Weights, *, activation: Activation,
            capacity: int | None) -> jax.Array:
        """Per row r of group e: the ExpertWeights FFN of expert e on x[r]; f32 accumulation, the hidden
        taken to the down projection in x.dtype, output dtype = x.dtype; rows not computed -> 0."""
        if not self.takes_split_experts:
            weights = stacked(weights)
        self._require(x, weights, capacity)
        return self._ffn(x, group_sizes, weights, activation=activation, capacity=capacity)

    def matmul(self, x, group_sizes, w, *, capacity: int | None) -> jax.Array:
        """ragged_dot semantics: row r of group e -> x[r] @ w[e]; rows not computed -> 0."""
        self._require(x, (w,), capacity)
        return self._matmul(x, group_sizes, w, capacity=capacity)

    def _require(self, x, weights, capacity) -> None:
        why_not = self.supported(x, weights, capacity=capacity)
        if why_not:
            raise NotImplementedError(why_not)

    def _ffn(self, x, group_sizes, weights, *, activation, capacity) -> jax.Array:
        raise NotImplementedError(f"{self.name} has no grouped FFN")

    def _matmul(self, x, group_sizes, w, *, capacity) -> jax.Array:
        raise NotImplementedError(f"{self.name} has no grouped matmul")


@dataclasses.dataclass(frozen=True)
class InterpretableKernels(Implementation):
    """Base of the Pallas backends: interpret=True runs their kernels in an interpreter on the CPU (the
    tests), under the name "<kernels>_interpret"."""
    base_name: ClassVar[str] = ""
    interpret: bool = False

    @property
    def name(self) -> str:
        return f"{self.base_name}_interpret" if self.interpret else self.base_name
