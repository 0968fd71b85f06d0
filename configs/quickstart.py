"""The quick start: the committed trained default MoE (experiments/default_model), one forward pass and a greedy
generation of Python-like text. Set checkpoint="" for a small built-in Mixtral-style model with random weights.

Run: ./launch.sh quickstart   (or python experiments/quickstart.py --config=configs/quickstart.py)
Override any field from the command line, e.g. --config.model.num_experts=16 --config.max_new_tokens=32.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/quickstart.py has no variant {arg!r}: it is quick already")
    config = ml_collections.ConfigDict()
    config.checkpoint = "experiments/default_model"  # a Hugging Face checkpoint directory; "": the model below
    config.dtype = "float32"
    config.seed = 0
    config.batch_size = 4
    config.prompt_length = 64
    config.max_new_tokens = 16
    config.capacity_factor = 0.0  # 0: dropless; > 0: capacity-aware token drop with this gamma
    config.model = ml_collections.ConfigDict(dict(
        architecture="mixtral", vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=32, intermediate_size=256, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        norm_topk_prob=True, max_position_embeddings=2048))
    return config
