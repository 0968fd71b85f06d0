"""moejax.kernels: the experts step's grouped matmuls (one API, several backend implementations)."""

from moejax.kernels.grouped_matmul import (
    ACTIVATIONS,
    IMPLEMENTATIONS,
    Activation,
    CapacityBuffers,
    ClampedSwiGLU,
    ExpertWeights,
    Implementation,
    ImplementationLike,
    MosaicGpu,
    MosaicGpuConfig,
    Pallas,
    PallasConfig,
    RaggedDot,
    Reference,
    TileConfig,
    Xla,
    XlaConfig,
    autotune,
    batched_ffn,
    default_implementation,
    grouped_ffn,
    grouped_ffn_reference,
    grouped_matmul,
    grouped_matmul_reference,
)
from moejax.kernels.grouped_matmul import __all__
