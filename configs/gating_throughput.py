"""experiments/gating_throughput.py: static against dynamic gating of one MoE layer on the expert-parallel
CPU mesh (Huang et al., papers.md B).

  python experiments/gating_throughput.py --workdir=experiments/results/gating_throughput

Variants: "" (every token count) and "quick" (two token counts, fewer repeats).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/gating_throughput.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.tokens = (1024, 4096) if quick else (1024, 2048, 4096, 8192)  # tokens per forward (all devices)
    config.layers = ("lm", "decoder")  # layer shapes of experiments/gating_throughput.LAYERS
    config.capacity_fraction = 0.25  # static gating's slots per expert / local tokens
    config.repeats = 3 if quick else 5  # timed repeats (median)
    config.cpu_devices = 8  # host devices of the CPU mesh
    return config
