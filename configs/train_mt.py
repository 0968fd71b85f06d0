"""The default MT model: a small NLLB-MoE-architecture encoder-decoder trained to summarise code (the Python
standard library's functions -> their docstrings' first paragraph, split by file).

Run: python experiments/train.py --config=configs/train_mt.py --workdir=workdir/train_mt
Variants: "" (the default MT model's run) and "quick" (20 steps: a smoke test of the pipeline, export included).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/train_mt.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.task = "translation"  # experiments/train.py: moejax.training.translation
    config.seed = 0
    config.corpus = "stdlib"  # any corpus of Python source (moejax.data.load_documents)
    config.validation_fraction = 0.05
    config.test_fraction = 0.05
    config.vocab_size = 4096  # one byte-level BPE for both sides, <s> <pad> </s> <unk> at NLLB's ids 0-3
    config.max_source_tokens = 64  # the code (its signature first), cut, then </s>
    config.max_target_tokens = 32  # the summary, cut, then </s>
    # NLLB-MoE's shape, small: every sparse_step-th layer of each stack a MoE of top-2 experts
    config.model = ml_collections.ConfigDict(dict(
        hidden_size=128, num_layers=4, num_heads=4, ffn_dim=256, sparse_step=2, num_experts=16,
        eval_capacity_fraction=1.0))
    config.batch_size = 32  # pairs per step
    config.steps = 20 if quick else 1000
    config.warmup_steps = 5 if quick else 50
    config.learning_rate = 3e-3
    config.weight_decay = 0.1
    config.load_balance_coef = 0.01
    config.router_z_coef = 0.001
    config.capacity_factor = 2.0  # the training experts step (moejax.training.for_training)
    config.compute_dtype = "float32"
    config.eval_every = 10 if quick else 200
    config.eval_pairs = 64  # validation pairs for the periodic evaluation
    config.checkpoint_every = 10 if quick else 100
    config.export_dtype = "float32"
    config.cpu_devices = 0
    return config
