"""Quantized Hugging Face checkpoints, dequantized at load, in the formats MoE models ship.

config.json names the format in `quantization_config.quant_method`:

- "fp8" (DeepSeek-V3 / R1, Kimi-K2, MiniMax-M2, Qwen3-FP8): a weight `X` stored as float8 e4m3 beside
  `X_scale_inv` (`X.weight` beside `X.weight_scale_inv`), one float32 scale per `weight_block_size` block
  (128 x 128 as they ship) of its last two axes; a shape that is not a multiple of the block has partial last
  blocks. The weight is the stored value times the scale of its block.
- "mxfp4" (GPT-OSS's experts): `X_blocks`, uint8 [E, rows, groups, 16] (32 FP4 e2m1 values per group, two per
  byte, the even element in the low nibble), beside `X_scales`, uint8 [E, rows, groups] (E8M0 exponents:
  2 ** (s - 127)). `X` is [E, groups * 32, rows], the layout transformers' `convert_moe_packed_tensors` gives,
  which is the [E, in, out] layout a floating-point GPT-OSS checkpoint stores its experts in.

Which tensors are quantized is read from the checkpoint itself (a quantized weight beside its scale), as
transformers' dequantizing loader does: the modules a release keeps in floating point (its
`modules_to_not_convert`: router, norms, embeddings, lm_head) are simply stored so. `DequantizedTensors`
shows a checkpoint's tensors to the load plan under their unquantized names and dequantizes one tensor per
read, so the loader still streams the checkpoint tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import ml_dtypes
import numpy as np

SUPPORTED_METHODS = ("fp8", "mxfp4")

# FP4 e2m1 by its 4-bit code: sign in bit 3, then two exponent bits and one mantissa bit.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
# E8M0 exponent bytes (MXFP4 scales, ue8m0 FP8 scales): the value is 2 ** (byte - 127).
_E8M0_DTYPES = ("U8", "F8_E8M0")
_FLOAT_SCALE_DTYPES = ("F32", "BF16", "F16")
# Dtypes safetensors' numpy reader cannot hand back (numpy has no float8): read from the file's bytes.
_FLOAT8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E8M0": np.uint8}
_SAFETENSORS_DTYPE = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
                      np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """weight float8 [..., R, C] times the scale of its block: scale_inv float32 [..., ceil(R/br), ceil(C/bc)]
    for block (br, bc); element (i, j) takes scale_inv[..., i // br, j // bc]. The product is taken in float32
    (as transformers' Fp8Dequantize), then rounded to `dtype`."""
    br, bc = block
    rows, cols = weight.shape[-2:]
    out = np.empty(weight.shape, dtype)
    for band in range(scale_inv.shape[-2]):  # one band of blocks at a time: no weight-sized float32 temporary
        r = slice(band * br, (band + 1) * br)
        scale = np.repeat(scale_inv[..., band, :], bc, axis=-1)[..., None, :cols]
        out[..., r, :] = weight[..., r, :].astype(np.float32) * scale
    return out


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """blocks uint8 [E, R, G, 16] and scales uint8 [E, R, G] -> [E, G * 32, R]: element 2b (2b + 1) of group g
    of row r is the low (high) nibble of blocks[e, r, g, b] as FP4, times 2 ** (scales[e, r, g] - 127)."""
    experts, rows, groups, _ = blocks.shape
    out = np.empty((experts, groups * 32, rows), dtype)
    for e in range(experts):  # one expert at a time: no checkpoint-sized float32 temporary
        values = np.stack([FP4_VALUES[blocks[e] & 0x0F], FP4_VALUES[blocks[e] >> 4]], axis=-1)
        values = np.ldexp(values, _e8m0_exponent(scales[e])[..., None, None])
        out[e] = values.reshape(rows, groups * 32).T
    return out


def _e8m0_exponent(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.int32) - 127


@dataclasses.dataclass(frozen=True)
class Fp8Blocks:
    """quant_method "fp8": float8 e4m3 weights `X` with block scales `X_scale_inv`."""

    block: tuple[int, int]
    method = "fp8"
    weight_dtypes = ("F8_E4M3",)
    weight_layout = "at least 2 axes"
    scale_dtypes = _FLOAT_SCALE_DTYPES + _E8M0_DTYPES  # float32 as DeepSeek ships; ue8m0 bytes (scale_fmt)

    def weight_of_scale(self, name: str) -> str | None:
        return name[: -len("_scale_inv")] if name.endswith("_scale_inv") else None

    def scale_name(self, weight: str) -> str:
        return f"{weight}_scale_inv"

    def is_weight(self, name: str, dtype: str, names: set[str]) -> bool:
        return dtype.startswith("F8_") or self.scale_name(name) in names

    def unquantized(self, weight: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        return weight, shape

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        if len(shape) < 2:
            return None
        return (*shape[:-2], math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1]))

    def dequantize(self, weight: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
        scale = np.ldexp(np.float32(1), _e8m0_exponent(scale)) if scale.dtype == np.uint8 else scale.astype(np.float32)
        return dequantize_fp8(weight, scale, self.block, dtype)


@dataclasses.dataclass(frozen=True)
class Mxfp4:
    """quant_method "mxfp4": FP4 blocks `X_blocks` with E8M0 group scales `X_scales` (GPT-OSS's experts)."""

    method = "mxfp4"
    weight_dtypes = ("U8",)
    weight_layout = "[experts, rows, groups, 16]"
    scale_dtypes = _E8M0_DTYPES

    def weight_of_scale(self, name: str) -> str | None:
        return name[: -len("_scales")] + "_blocks" if name.endswith("_scales") else None

    def scale_name(self, weight: str) -> str:
        return weight[: -len("_blocks")] + "_scales"

    def is_weight(self, name: str, dtype: str, names: set[str]) -> bool:
        return name.endswith("_blocks")

    def unquantized(self, weight: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        experts, rows, groups, _ = shape
        return weight[: -len("_blocks")], (experts, groups * 32, rows)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return shape[:-1] if len(shape) == 4 and shape[-1] == 16 else None

    def dequantize(self, weight: np.ndarray, scale: np.ndarray, dtype) -> np.ndarray:
        return dequantize_mxfp4(weight, scale, dtype)


QuantizedFormat = Fp8Blocks | Mxfp4


def read_format(quantization_config) -> QuantizedFormat | None:
    """The format config.json's `quantization_config` describes (None where there is none). An unknown
    quant_method, or a setting under which dequantized weights would not compute what the checkpoint's own
    code computes, is refused by name."""
    if quantization_config is None or quantization_config == {}:
        return None
    if not isinstance(quantization_config, dict):
        raise ValueError(f"config.json: quantization_config={quantization_config!r} must be an object with a "
                         f"quant_method ({', '.join(SUPPORTED_METHODS)})")
    method = quantization_config.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"config.json: quantization_config has quant_method={method!r}, which moejax does not read; "
                         f"supported: {list(SUPPORTED_METHODS)} (else a floating-point checkpoint)")
    if method == "mxfp4":
        return Mxfp4()
    settings = {"fmt": ("e4m3", "float8_e4m3fn"), "activation_scheme": ("dynamic",), "expert_dtype": ("fp8",),
                "scale_fmt": ("float", "ue8m0")}
    for key, allowed in settings.items():  # static activations / FP4 experts would compute differently
        value = quantization_config.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"config.json: quantization_config {key}={value!r} is not supported for fp8; "
                             f"supported: {list(allowed)}")
    block = quantization_config.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"config.json: quantization_config weight_block_size={block!r} must be two positive "
                         "integers (rows, columns) of a scale block; per-tensor scales (null) are not read")
    return Fp8Blocks(tuple(block))


class DequantizedTensors:
    """A checkpoint's tensors (moejax.checkpoints._Tensors) as the load plan reads them: each quantized weight,
    with its scale, appears once under its unquantized name and shape, in the dtype it dequantizes to; every
    other tensor is as stored. Every pairing and scale shape is checked before any data is read."""

    def __init__(self, tensors, quantized_format: QuantizedFormat, dtype):
        self._tensors, self._format, self._dtype = tensors, quantized_format, np.dtype(dtype)
        self._quantized: dict[str, tuple[str, str]] = {}  # unquantized name -> (stored weight, its scale)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._float8_offsets: dict[str, dict[str, tuple[int, int]]] = {}  # file -> name -> (offset, size)
        names = tensors.names()
        problems = []
        for name in sorted(names):
            dtype, shape, file = tensors.dtype(name), tensors.shape(name), tensors.file_of[name]
            weight = quantized_format.weight_of_scale(name)
            if weight is not None:
                if weight not in names:
                    problems.append(f"scale tensor {name!r} in {file} has no weight {weight!r}")
                elif dtype not in quantized_format.scale_dtypes:
                    problems.append(f"scale tensor {name!r} in {file} has dtype {dtype}; expected one of "
                                    f"{quantized_format.scale_dtypes}")
                continue
            if not quantized_format.is_weight(name, dtype, names):
                continue
            scale = quantized_format.scale_name(name)
            expected = quantized_format.scale_shape(shape)
            if dtype not in quantized_format.weight_dtypes:
                problems.append(f"quantized weight {name!r} in {file} has dtype {dtype}; expected "
                                f"{quantized_format.weight_dtypes[0]}")
            elif scale not in names:
                problems.append(f"missing scale tensor {scale!r} for quantized weight {name!r} in {file}")
            elif expected is None:
                problems.append(f"quantized weight {name!r} in {file} has shape {shape}, not "
                                f"{quantized_format.weight_layout}")
            elif tensors.shape(scale) != expected:
                problems.append(f"scale tensor {scale!r} in {tensors.file_of[scale]} has shape "
                                f"{tensors.shape(scale)}, expected {expected} for weight {name!r} of shape {shape}")
            else:
                unquantized, self._shapes[unquantized] = quantized_format.unquantized(name, shape)
                self._quantized[unquantized] = (name, scale)
        if problems:
            raise ValueError(f"quantized checkpoint (quant_method {quantized_format.method!r}) has bad tensors:\n  "
                             + "\n  ".join(problems))
        stored = {n for pair in self._quantized.values() for n in pair}
        self.file_of = {n: f for n, f in tensors.file_of.items() if n not in stored}
        self.file_of.update({u: tensors.file_of[w] for u, (w, _) in self._quantized.items()})

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._quantized else self._tensors.shape(name)

    def dtype(self, name: str) -> str:
        return _SAFETENSORS_DTYPE[self._dtype] if name in self._quantized else self._tensors.dtype(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._quantized:
            return self._tensors.get(name)
        weight, scale = self._quantized[name]
        return self._format.dequantize(self._stored(weight), self._stored(scale), self._dtype)

    def _stored(self, name: str) -> np.ndarray:
        dtype = self._tensors.dtype(name)
        if dtype not in _FLOAT8:
            return self._tensors.get(name)
        file = self._tensors.file_of[name]
        if file not in self._float8_offsets:
            self._float8_offsets[file] = _float8_offsets(file)
        offset, size = self._float8_offsets[file][name]
        shape = self._tensors.shape(name)
        data = np.fromfile(file, dtype=np.uint8, count=size, offset=offset)
        if size != math.prod(shape) or data.size != size:
            raise ValueError(f"tensor {name!r} in {file!r} holds {data.size} bytes, not the {math.prod(shape)} of its "
                             f"shape {shape} (truncated or corrupt?)")
        return data.view(_FLOAT8[dtype]).reshape(shape)


def _float8_offsets(file: str) -> dict[str, tuple[int, int]]:
    """Where each float8 tensor's bytes lie in a safetensors file (an 8-byte header length, the JSON header,
    then the data): (offset in the file, size in bytes)."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {name: (8 + length + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__" and entry["dtype"] in _FLOAT8}
