"""experiments/translation.py: the MT workload (Huang et al., papers.md B) and capacity-aware drop judged by
chrF, on an encoder-decoder MoE checkpoint.

  python experiments/translation.py --workdir=experiments/results/translation

Variants: "" (every held-out pair, the full sweeps) and "quick" (64 pairs, fewer cells).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/translation.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.checkpoint = "experiments/mt_model"  # nllb-moe / switch_transformers, with a tokenizer.json
    # the pairs: function -> docstring pairs of this corpus, split by file as configs/train_mt.py trains
    config.corpus = ml_collections.ConfigDict(dict(source="stdlib", validation_fraction=0.05, test_fraction=0.05))
    config.split = "test"
    config.pairs = 64 if quick else 0  # the first N pairs of the split (0: all)
    config.max_source_tokens = 64
    config.max_target_tokens = 32  # also the generated tokens
    config.batch_size = 32  # sources per generation (quality, capacity, buffering and placement traces)
    config.examples = 8  # translations kept in results.json
    config.decode_batch_sizes = (8, 32)  # routing statistics per decode batch (sources generated together)
    config.policies = ("lifo", "lru", "fifo", "belady")
    config.cache_fractions = (0.25, 0.5, 0.75)  # of each decoder layer's experts
    config.placement = ml_collections.ConfigDict(dict(
        methods=("contiguous", "greedy", "anti_correlation", "search"), devices=(4, 8) if not quick else (4,),
        extra_slots_per_device=1, anti_correlation_weight=0.5, search_restarts=4 if quick else 16))
    config.capacity_factors = (2.0, 1.5, 1.0) if not quick else (1.5, 1.0)
    config.drops = ("score", "first") if not quick else ("score",)
    config.in_decode = (True, False)  # the capacity in decode steps too, or in the encoder and the prefill only
    config.devices = 4  # the expert-parallel devices of the modelled speedup
    return config
