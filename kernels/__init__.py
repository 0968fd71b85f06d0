"""moejax.kernels: the experts step's grouped matmuls (one API, several backend implementations)."""

from moejax.kernels.grouped_matmul import (
    ACTIVATIONS,
    IMPLEMENTATIONS,
    autotune_tile,
    default_implementation,
    grouped_ffn,
    grouped_ffn_reference,
    grouped_matmul,
    grouped_matmul_reference,
)
from moejax.kernels.mosaic_gpu_grouped_matmul import mosaic_grouped_ffn, mosaic_grouped_matmul
from moejax.kernels.pallas_grouped_matmul import pallas_grouped_ffn, pallas_grouped_matmul, pallas_grouped_swiglu

__all__ = ["ACTIVATIONS", "IMPLEMENTATIONS", "autotune_tile", "default_implementation", "grouped_ffn",
           "grouped_ffn_reference", "grouped_matmul", "grouped_matmul_reference", "mosaic_grouped_ffn",
           "mosaic_grouped_matmul", "pallas_grouped_ffn",
           "pallas_grouped_matmul", "pallas_grouped_swiglu"]
