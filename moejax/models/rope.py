"""Rotary position embeddings: default, linear, llama3, yarn and longrope scaling, half-split or interleaved
pairs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ROPE_TYPES, RopeConfig


def inverse_frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """(inv_freq [dim/2], attention_factor) as Hugging Face computes them for this rope type."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "default":
        return inv_freq, 1.0
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind == "yarn":
        return _yarn(rope, dim, max_position_embeddings)
    if rope.kind == "llama3":
        return _llama3(rope, inv_freq), 1.0
    if rope.kind == "longrope":  # the short regime (see RopeConfig); Phi-3.5-MoE's own cos/sin scale
        return (inv_freq / np.asarray(rope.short_factor, np.float32)).astype(np.float32), float(rope.short_mscale)
    raise ValueError(f"unsupported rope type {rope.kind!r}; supported: {ROPE_TYPES}")


def _llama3(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    """Llama 3's scaling (Llama 4 too): wavelengths beyond original / low_freq_factor divided by factor, those
    below original / high_freq_factor kept, the ones between interpolated."""
    original = rope.original_max_position
    low_wavelen, high_wavelen = original / rope.low_freq_factor, original / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    with np.errstate(divide="ignore", invalid="ignore"):  # equal factors: no band in between, its values unused
        smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    original = rope.original_max_position or max_position_embeddings
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = rope.yarn_mscale(rope.mscale) / rope.yarn_mscale(rope.mscale_all_dim)
        else:
            attention_factor = rope.yarn_mscale()

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float) -> tuple[jax.Array, jax.Array]:
    """positions int [B, T] -> (cos, sin) float32 [B, T, dim/2], already scaled by attention_factor."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """x [B, T, H, D]; cos/sin [B, T, D/2]. Half-split (Llama/Mixtral) or interleaved pairs (DeepSeek)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        pairs = xf.reshape(*x.shape[:-1], -1, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)
    else:
        first, second = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return out.astype(x.dtype)
