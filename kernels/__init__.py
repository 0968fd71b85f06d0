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

__all__ = ["ACTIVATIONS", "IMPLEMENTATIONS", "autotune_tile", "default_implementation", "grouped_ffn",
           "grouped_ffn_reference", "grouped_matmul", "grouped_matmul_reference"]
