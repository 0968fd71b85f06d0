"""experiments/bench_forward.py: prefill of moejax against transformers on one random checkpoint (Mixtral or
OLMoE family), and the MoE layer against a dense SwiGLU FFN of equal useful FLOPs. Needs the test extras
(torch, transformers): ./launch.sh bench_forward installs them.

  ./launch.sh bench_forward --workdir=workdir/bench_forward
  ./launch.sh bench_forward --config=configs/bench_forward.py:quick
  ./launch.sh bench_forward --config=configs/bench_forward.py:olmoe,quick

Variants, comma-separated: a shape ("" the committed Mixtral-family one: hidden 512, 8 experts, top-2, 2048
tokens; "mixtral768": hidden 768, 16 experts, top-2, 1536 tokens; "olmoe": OLMoE family, hidden 512, 64 small
experts, top-8, 1536 tokens; "long": the committed shape at 4096 tokens) and "quick" (512 tokens, 3 repeats).
"""

import ml_collections

SHAPES = {
    "": dict(family="mixtral", tokens=2048, hidden=512, ffn=1024, experts=8, top_k=2),
    "mixtral768": dict(family="mixtral", tokens=1536, hidden=768, ffn=1536, experts=16, top_k=2),
    "olmoe": dict(family="olmoe", tokens=1536, hidden=512, ffn=256, experts=64, top_k=8),
    "long": dict(family="mixtral", tokens=4096, hidden=512, ffn=1024, experts=8, top_k=2),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    parts = [p for p in arg.split(",") if p]
    shapes = [p for p in parts if p in SHAPES]
    unknown = [p for p in parts if p not in SHAPES and p != "quick"]
    if unknown or len(shapes) > 1:
        raise ValueError(f"unknown variant {arg!r} of configs/bench_forward.py; variants: a shape of "
                         f"{sorted(s for s in SHAPES if s)} and/or 'quick'")
    quick = "quick" in parts
    config = ml_collections.ConfigDict(SHAPES[shapes[0] if shapes else ""])
    if quick:
        config.tokens = 512  # tokens in the prefill (batch 1)
    config.layers = 2
    config.vocab = 4096
    config.repeats = 3 if quick else 10  # timed repeats after warm-up (median)
    # transformers is timed once per torch thread count (0: torch's default, one per core), each in a process of
    # its own, and every ratio is taken against the fastest: 1 thread can beat 2 on a loaded 2-core machine
    config.torch_threads = (1, 0)
    config.hot_share = 3.0  # skewed routing: the hot expert's load over the mean
    return config
