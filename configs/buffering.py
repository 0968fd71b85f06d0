"""experiments/buffering.py: expert buffering, cache size x eviction policy on decode traces and measured
decode latency with real host -> device copies (Huang et al., papers.md B).

  python experiments/buffering.py --workdir=experiments/results/buffering
  python experiments/buffering.py --config.checkpoint= --config.random_model.dtype=bfloat16   # a random model

Variants: "" (every cache size, four measured) and "quick" (fewer sizes, one measured, shorter decode).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/buffering.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.checkpoint = "experiments/default_model"  # a load_pretrained directory; "": the random model below
    # prompts come from this corpus's validation split (the split the checkpoint was trained with)
    config.corpus = ml_collections.ConfigDict(dict(source="stdlib", validation_fraction=0.05, test_fraction=0.05))
    config.batch_size = 4  # sequences decoded together
    config.prompt_len = 64
    config.new_tokens = 32 if quick else 64  # tokens generated per sequence (decode steps + 1)
    config.cache_sizes = (2, 4, 8, 16, 24, 32) if quick else (1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32)  # simulated
    config.measured_sizes = (16,) if quick else (4, 8, 16, 24)  # timed with real copies
    config.policies = ("lifo", "lru", "fifo", "lfu", "belady")
    config.low_precision = "int8"  # demand misses copy this low-precision version (None: off); quality measured too
    config.low_precision_sizes = (16,)  # the cache sizes timed with low-precision copies
    config.low_precision_task = "experiments/results/default_model/next_word.jsonl"  # its quality ("": none)
    config.repeats = 3  # timed rounds per measured cell (median)
    config.seed = 0  # the random model and the prompts' offsets
    # checkpoint "" only: a Mixtral-style random model, its router weights scaled so routing is decisive
    config.random_model = ml_collections.ConfigDict(dict(hidden_size=128, moe_intermediate_size=64,
                                                         dtype="float32", router_scale=8.0))
    return config
