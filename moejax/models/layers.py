"""The small parameter-holding modules every layer uses: Dense, RMSNorm, LayerNorm, the gated MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ACTIVATIONS

_INIT = jax.nn.initializers.normal(0.02)  # random_model's weights; checkpoints overwrite them


def param(rngs: nnx.Rngs, shape, dtype) -> nnx.Param:
    return nnx.Param(_INIT(rngs.params(), shape, dtype))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (HF stores the transpose)."""

    def __init__(self, din: int, dout: int, *, bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (din, dout), dtype)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.weight[...] * rms_normalize(x, self.eps)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32, in x's dtype: RMSNorm without its
    weight (Llama 4's q/k norm)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight (+ bias), computed in
    float32 (NLLB-MoE, Phi-3.5-MoE)."""

    def __init__(self, dim: int, eps: float, *, bias: bool = True, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype)) if bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        y = y * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class MLP(nnx.Module):
    """Dense gated FFN (SwiGLU for silu): dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(hidden, dim, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        act = kernels.ACTIVATIONS[ACTIVATIONS[self.act]]
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
