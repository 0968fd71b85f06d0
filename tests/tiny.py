"""Tiny moejax-native models for tests that need no transformers reference."""

from moejax.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(architecture="mixtral", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, moe_layers=(True, True), num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=24, norm_topk_prob=True, max_position_embeddings=256)
    fields.update(overrides)
    return ModelConfig(**fields)
