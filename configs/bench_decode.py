"""experiments/bench_decode.py: greedy decode of moejax against transformers on random Mixtral- and OLMoE-family
checkpoints, and batch-1 decode as a fraction of the machine's memory roofline. Needs the test extras (torch,
transformers).

  python experiments/bench_decode.py --workdir=workdir/bench_decode
  python experiments/bench_decode.py --config=configs/bench_decode.py:quick --workdir=workdir/bench_decode_quick

Variants: "" (batches 1, 8 and 32, 32 new tokens, 5 repeats) and "quick" (batch 1, 8 new tokens, 2 repeats).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/bench_decode.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    # model family -> shape: hidden, ffn (each expert's intermediate size), experts, top_k, layers, vocab, heads
    config.models = {
        "mixtral": dict(family="mixtral", hidden=512, ffn=1024, experts=8, top_k=2, layers=4, vocab=4096,
                        heads=8, kv_heads=4),
        "olmoe": dict(family="olmoe", hidden=512, ffn=256, experts=64, top_k=8, layers=4, vocab=4096,
                      heads=8, kv_heads=8),
    }
    # how moejax's MoE blocks hold their experts (load_pretrained's expert_storage), each timed side by side:
    # "split" experts are read in place by the CPU's experts step, "stacked" ones (the default) copied first
    config.expert_storages = ("split", "stacked")
    # a further moejax side: split experts, expert-parallel over this many host devices (XLA:CPU runs one
    # device's experts step on one core; separate devices run at once); 0: none
    config.cpu_devices = 2
    config.batches = (1,) if quick else (1, 8, 32)
    config.prompt_tokens = 64  # per row (equal lengths: no padding on either side)
    config.new_tokens = 8 if quick else 32  # greedy, min_new_tokens = max_new_tokens on the transformers side
    config.repeats = 2 if quick else 5  # timed rounds after one warm-up round (median)
    config.copy_mib = 1024  # the larger of the arrays whose copy and sum measure the memory bandwidth
    # transformers is timed once per torch thread count (0: torch's default, one per core), each in a process of
    # its own, and every ratio is taken against the fastest: on this shared 2-core machine under other load, 2
    # threads stall at OpenMP barriers (60-220 ms a step against 7 ms with 1); alone, 2 threads are the faster
    config.torch_threads = (1, 0)
    config.router_scale = 8.0  # routers scaled up so that float rounding cannot flip a top-k choice
    return config
