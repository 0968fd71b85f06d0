"""The default model: a small OLMoE-style MoE language model trained on the Python standard library's source.

Run: python experiments/train.py --config=configs/train_default.py --workdir=workdir/train_default
(about 10-20 minutes on 2 CPU cores). Any field is a flag, e.g. --config.steps=100 --config.model.num_experts=16;
--config.cpu_devices=2 trains data-parallel over 2 host devices. Variants: "" (the default model's run) and
"quick" (20 steps: a smoke test of the whole pipeline, export included).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "quick"):
        raise ValueError(f"unknown variant {arg!r} of configs/train_default.py; variants: '' (full), 'quick'")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Corpus: "stdlib", a directory of text files, one text file, or a .jsonl file with a "text" field.
    config.corpus = "stdlib"
    config.validation_fraction = 0.05
    config.test_fraction = 0.05
    config.vocab_size = 2048  # byte-level BPE trained on the train split
    # OLMoE family: fine-grained experts (OLMoE-1B-7B: 64 experts, top-8), q/k norm for stable training.
    config.model = ml_collections.ConfigDict(dict(
        architecture="olmoe", hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=4, num_experts=32,
        num_experts_per_tok=4, moe_intermediate_size=32, max_position_embeddings=512, tie_word_embeddings=True))
    config.sequence_length = 256
    config.batch_size = 16  # sequences per step, split over the devices of the "data" axis
    config.steps = 20 if quick else 600
    config.warmup_steps = 5 if quick else 30
    config.learning_rate = 3e-3
    config.weight_decay = 0.1
    config.load_balance_coef = 0.01  # Switch load-balancing loss
    config.router_z_coef = 0.001  # ST-MoE router z-loss
    config.capacity_factor = 2.0  # training experts step (moejax.training); 0: dropless ragged_dot, slow on CPU
    config.compute_dtype = "float32"  # or "bfloat16" (float32 master weights either way)
    config.eval_every = 10 if quick else 100
    config.eval_sequences = 32  # validation sequences for the periodic evaluation
    config.checkpoint_every = 10 if quick else 50
    config.export_dtype = "bfloat16"  # of the exported Hugging Face checkpoint
    config.cpu_devices = 0  # host CPU devices for data parallelism (0: JAX's default)
    return config
