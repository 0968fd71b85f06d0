"""Tiny moejax-native models for tests that need no transformers reference."""

from moejax.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(architecture="mixtral", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, moe_layers=(True, True), num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=24, norm_topk_prob=True, max_position_embeddings=256)
    fields.update(overrides)
    return ModelConfig(**fields)


def decisive_model(seed: int = 0):
    """A tiny model with 8 experts, top-2, its router weights scaled so routing is decisive and uneven."""
    import moejax

    m = moejax.random_model(tiny_config(num_experts=8, num_experts_per_tok=2), seed=seed)
    for block in m.moe_blocks():
        block.router[...] = block.router[...] * 10
    return m


def expert_mesh():
    """The (data=1, expert=8) mesh over the test backend's 8 host devices."""
    import jax

    from moejax import parallel

    assert len(jax.devices()) == 8
    return parallel.make_mesh()
