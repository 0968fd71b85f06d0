"""experiments/bench_forward.py: prefill of moejax against transformers on one random Mixtral-family
checkpoint, and the MoE layer against a dense SwiGLU FFN of equal useful FLOPs. Needs the test extras
(torch, transformers): ./launch.sh bench_forward installs them.

  ./launch.sh bench_forward --workdir=workdir/bench_forward
  ./launch.sh bench_forward --config=configs/bench_forward.py:quick

Variants: "" (2048 tokens, 10 repeats) and "quick" (512 tokens, 3 repeats).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/bench_forward.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.tokens = 512 if quick else 2048  # tokens in the prefill (batch 1)
    config.hidden = 512
    config.ffn = 1024  # intermediate_size of each expert
    config.experts = 8
    config.top_k = 2
    config.layers = 2
    config.vocab = 4096
    config.repeats = 3 if quick else 10  # timed repeats after warm-up (median)
    config.hot_share = 3.0  # skewed routing: the hot expert's load over the mean
    return config
