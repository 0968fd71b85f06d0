"""experiments/reproduce.py: one config per model, picked by the part after the colon.

  ./launch.sh reproduce --quick                                   # the trained default model (configs/reproduce.py)
  ./launch.sh reproduce --config=configs/reproduce.py:olmoe --config.checkpoint=/data/OLMoE-1B-7B-0924
  ./launch.sh reproduce --config=configs/reproduce.py:mixtral --config.checkpoint=/data/Mixtral-8x7B-v0.1

Models: default, olmoe, qwen_moe, deepseek_v2, mixtral. A real checkpoint needs its own directory
(config.json, safetensors, tokenizer.json); the evaluation text is the Python standard library corpus of
moejax.data, tokenised with the checkpoint's tokenizer. Override any field with --config.FIELD=VALUE.
"""

import ml_collections

# expert-parallel devices the papers used per model (capacity scope, straggler model, placement)
MODELS = {
    "default": dict(checkpoint="experiments/default_model", num_devices=8),
    "olmoe": dict(checkpoint="", num_devices=8),          # 64 experts on 8 GPUs, as He et al.
    "qwen_moe": dict(checkpoint="", num_devices=8),
    "deepseek_v2": dict(checkpoint="", num_devices=8),
    "mixtral": dict(checkpoint="", num_devices=8),        # one expert per GPU, as He et al.
}


def get_config(model: str = "default") -> ml_collections.ConfigDict:
    if model not in MODELS:
        raise ValueError(f"unknown model preset {model!r}; presets: {sorted(MODELS)}")
    config = ml_collections.ConfigDict()
    config.model = model
    config.checkpoint = MODELS[model]["checkpoint"]
    config.num_devices = MODELS[model]["num_devices"]
    # The full run; --quick replaces these with the QUICK values in experiments/reproduce.py.
    config.capacity_factors = "none,0.5,1.0,1.25,1.5,2.0"
    config.capacity_strategies = "score,first,last,random,expanded_local,expanded_global"
    config.capacity_sequences = 32
    config.gating_tokens = "1024,2048,4096,8192"
    config.buffering_cache_sizes = "1,2,4,6,8,12,16,20,24,28,32"
    config.buffering_measured_sizes = "4,8,16,24"
    config.placement_devices = "2,4,8"
    config.placement_batches = 64
    return config
