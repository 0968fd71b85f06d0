"""What every grouped-matmul backend shares: the activations, the input checks, the row bookkeeping of the
sorted layout, and the Implementation base class the API dispatches over.

Layout: x [N, d] holds the rows of group 0, then group 1, ...; group_sizes int [E]; rows past
sum(group_sizes) are padding. `capacity` (optional) means only the first min(count, capacity) rows of each
group are computed; every row not computed (padding, past a capacity) comes out as exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; supported: {sorted(ACTIVATIONS)}")


def ffn_weight_shapes(w_gate, w_up, w_down, e: int, d: int) -> tuple[tuple[str, jax.Array, tuple], ...]:
    """(name, weight, expected shape) of an FFN's weights over e experts of width d."""
    f = w_gate.shape[-1]
    return ("w_gate", w_gate, (e, d, f)), ("w_up", w_up, (e, d, f)), ("w_down", w_down, (e, f, d))


def check_weights(named: tuple[tuple[str, jax.Array, tuple], ...], context: str) -> None:
    for name, w, expected in named:
        if w.shape != expected:
            raise ValueError(f"{name} has shape {w.shape}; expected {expected} for {context}")


def check_inputs(x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array | None = None,
                 w_down: jax.Array | None = None, activation: str | None = None) -> None:
    """Shapes of a grouped matmul (w_gate alone, named "w") or a grouped FFN; errors name the bad value."""
    if x.ndim != 2:
        raise ValueError(f"x must be [rows, d]; got shape {x.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an int vector [E]; got {group_sizes.dtype}{list(group_sizes.shape)}")
    e, d = group_sizes.shape[0], x.shape[1]
    named = (("w", w_gate, (e, d, w_gate.shape[-1])),) if w_up is None else ffn_weight_shapes(
        w_gate, w_up, w_down, e, d)
    check_weights(named, f"x {x.shape} and {e} groups")
    if activation is not None:
        check_activation(activation)


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
    next implementation of a sequence, or tells the caller who named this one why it cannot serve."""

    name: ClassVar[str] = ""
    config: Any = None

    def supported(self, x: jax.Array, weights: tuple[jax.Array, ...], *, capacity: int | None) -> str | None:
        """None when this implementation can take these inputs on this backend, else why not. `weights` is
        (w,) for a grouped matmul, (w_gate, w_up, w_down) for a grouped FFN."""
        del x, weights, capacity
        return None

    def autotuning_configs(self) -> tuple[Any, ...]:
        """The configs `autotune` times; by default only this implementation's own."""
        return (self.config,)

    def ffn(self, x, group_sizes, w_gate, w_up, w_down, *, activation: str, capacity: int | None) -> jax.Array:
        """Per row r of group e: (act(x[r] @ w_gate[e]) * (x[r] @ w_up[e])) @ w_down[e]; f32 accumulation,
        output dtype = x.dtype; rows not computed -> 0."""
        self._require(x, (w_gate, w_up, w_down), capacity)
        return self._ffn(x, group_sizes, w_gate, w_up, w_down, activation=activation, capacity=capacity)

    def matmul(self, x, group_sizes, w, *, capacity: int | None) -> jax.Array:
        """ragged_dot semantics: row r of group e -> x[r] @ w[e]; rows not computed -> 0."""
        self._require(x, (w,), capacity)
        return self._matmul(x, group_sizes, w, capacity=capacity)

    def _require(self, x, weights, capacity) -> None:
        why_not = self.supported(x, weights, capacity=capacity)
        if why_not:
            raise NotImplementedError(why_not)

    def _ffn(self, x, group_sizes, w_gate, w_up, w_down, *, activation, capacity) -> jax.Array:
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
