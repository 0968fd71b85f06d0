"""moejax: fast Mixture-of-Experts inference in JAX/Flax."""

from moejax import (buffering, capacity, config, dispatch, evaluation, experts, layout, parallel, placement, routing,
                    runtime, stats)
from moejax.capacity import MoEPolicy
from moejax.checkpoints import export_pretrained, load_pretrained, load_tokenizer, restore_converted, save_converted
from moejax.config import ModelConfig, from_hf_config
from moejax.generate import generate
from moejax.models.transformer import CausalLM
from moejax.models import random_model, with_expert_storage, with_experts, with_policy, with_runtime
from moejax.runtime import MoERuntime

__all__ = [
    "buffering", "evaluation", "experts", "layout", "parallel", "placement", "runtime", "stats",
    "CausalLM", "ModelConfig", "MoEPolicy", "MoERuntime", "capacity", "config", "dispatch", "export_pretrained",
    "from_hf_config", "generate",
    "load_pretrained", "load_tokenizer", "random_model", "restore_converted", "routing", "save_converted",
    "with_expert_storage", "with_experts", "with_policy", "with_runtime",
]
