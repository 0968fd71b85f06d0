"""Which Hugging Face model types moejax reads, and why it refuses the others: the readers of moejax.family_readers
by model_type, the aliases and architectures they answer to, and every other MoE model type of transformers by
name with what it needs that moejax does not implement.
"""

from __future__ import annotations

from typing import Callable

from moejax.family_readers import READERS

# model types whose checkpoints are another family's (Kimi-K2's config.json says kimi_k2 and
# DeepseekV3ForCausalLM; transformers reads it as deepseek_v3): the model is built as that family
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3", "sarvam_mla": "deepseek_v3"}
SUPPORTED_ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "OlmoeForCausalLM": "olmoe",
                           "Qwen2MoeForCausalLM": "qwen2_moe", "DeepseekV2ForCausalLM": "deepseek_v2",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV3ForCausalLM": "deepseek_v3",
                           "Glm4MoeForCausalLM": "glm4_moe", "GraniteMoeForCausalLM": "granitemoe",
                           "GraniteMoeSharedForCausalLM": "granitemoeshared", "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
                           "Dots1ForCausalLM": "dots1", "MiniMaxM2ForCausalLM": "minimax_m2",
                           "GptOssForCausalLM": "gpt_oss", "Llama4ForCausalLM": "llama4_text",
                           "PhimoeForCausalLM": "phimoe", "ExaoneMoeForCausalLM": "exaone_moe",
                           "SolarOpenForCausalLM": "solar_open", "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
                           "SarvamMoEForCausalLM": "sarvam_moe", "SarvamMLAForCausalLM": "deepseek_v3",
                           "DbrxForCausalLM": "dbrx", "GraniteMoeSWAForCausalLM": "granitemoe_swa",
                           "HYV3ForCausalLM": "hy_v3", "FlintForCausalLM": "flint",
                           "AriaTextForCausalLM": "aria_text"}

_MULTIMODAL = "a multimodal model (vision or audio encoders around its decoder): moejax loads text-only models"
# Every other MoE model type of transformers (5.24) by name, with what it needs that moejax does not implement.
REFUSED: dict[str, str] = {
    # decoder-only, with a piece moejax lacks
    "flex_olmo": "OLMo 2's norm placement (a norm after attention and after the feed-forward, none before)",
    "hunyuan_v1_moe": "q/k RMSNorm after rope (moejax norms them before) and the NTK-alpha ('dynamic' with alpha) rope",
    "mistral4": "latent attention with Llama 4's position-dependent query scaling (llama_4_scaling_beta) and a "
                "softmax router ranking groups by their top-2 sum",
    "afmoe": "a sigmoid gate on the attention output and norms both before and after each sublayer",
    "axk1": "a norm on the MoE block's output (post_mlp_layernorm)",
    "axk2": "DeepSeek-V3.2's sparse attention (an indexer choosing each query's keys) and gated norms",
    "beam": "a gate on the attention output, norms before and after each sublayer, depth-scaled residuals and "
            "scalable-softmax query scaling",
    "cohere2_moe": "Cohere's parallel block (attention and feed-forward from one norm, added together)",
    "deepseek_v32": "DeepSeek Sparse Attention (an indexer choosing each query's keys)",
    "glm_moe_dsa": "DeepSeek Sparse Attention (an indexer choosing each query's keys)",
    "deepseek_v4": "hyper-connections (mHC) and compressed sparse attention with an indexer",
    "hy_v4": "hyper-connections and sparse attention with an indexer",
    "dots3_note_text": "sparse attention with an indexer",
    "doge": "dynamic-mask attention and product-key retrieval experts",
    "jetmoe": "mixture-of-attention-heads (MoA) attention",
    "longcat_flash": "zero-computation experts and a shortcut-connected MoE beside two attention sublayers a layer",
    "kolibri1": "norms after attention and after the feed-forward as well as before, and a router biased on its logits",
    "laguna": "a gate on the attention output, per-layer head counts and rope parameters per attention kind",
    "mellum": "rope parameters per attention kind (its sliding and full layers rotate with different thetas)",
    "mimo_v2_flash": "per-layer key / value head counts, value heads of their own size and rope parameters per "
                     "attention kind",
    "zaya": "compressed convolutional attention (CCA) and residual scaling",
    "gemma4_text": "norms before and after each sublayer, logit softcapping, per-layer inputs and a MoE block beside "
                   "a dense MLP",
    "granitemoehybrid": "hybrid Mamba-2 state-space layers",
    "jamba": "hybrid Mamba state-space layers",
    "nemotron_h": "hybrid Mamba-2 state-space layers",
    "bailing_hybrid": "hybrid linear-attention (gated delta rule) layers",
    "kimi_linear": "hybrid Kimi Delta Attention linear-attention layers",
    "qwen3_next": "hybrid Gated DeltaNet linear-attention layers and a gate on the attention output",
    "qwen3_5_moe_text": "hybrid Gated DeltaNet linear-attention layers and a gate on the attention output",
    "lara_mini": "hybrid Gated DeltaNet linear-attention layers",
    "qwen4_exp_text": "hybrid Gated DeltaNet linear attention, hyper-connections and sparse attention with an indexer",
    "minimax": "hybrid lightning (linear) attention layers",
    "minimax_m3_vl_text": "lightning (linear) attention layers and sparse attention with an indexer",
    "lfm2_moe": "hybrid short-convolution layers",
    "inkling_text": "hybrid short-convolution layers",
    "inkling2_text": "hybrid short-convolution layers",
    "inkling2_loop_text": "looped layers (one block of layers run several times)",
    "qwen3_vl_moe_text": "multimodal rotary positions (M-RoPE)",
    "glm4v_moe_text": "multimodal rotary positions (M-RoPE)",
    "ernie4_5_vl_moe_text": "multimodal rotary positions (M-RoPE) and experts per modality",
    "qwen3_omni_moe_text": "multimodal rotary positions (M-RoPE)",
    # multimodal
    "llama4": f"{_MULTIMODAL}; its text model saved as Llama4ForCausalLM (model_type llama4_text) is read",
    "kimi_k25": f"{_MULTIMODAL} (DeepSeek-V3's text model inside)",
    **{t: _MULTIMODAL for t in ("aria", "ernie4_5_vl_moe", "glm4v_moe", "qwen3_vl_moe", "qwen3_omni_moe", "qwen3_5_moe",
                                "qwen4_exp", "step3p7", "dots3_note", "gemma4", "minimax_m3_vl", "inkling_mm_model",
                                "inkling2", "inkling2_loop", "glm5_next", "mistral_large4", "hy_v4_vl", "deepseek_ocr2",
                                "unlimited_ocr", "muse_spark", "qwen3_omni_moe_thinker")},
}


def reader(model_type) -> Callable[[dict], dict]:
    """The reader of `model_type`; any other fails naming why (REFUSED) and the supported model types."""
    if isinstance(model_type, str) and model_type in READERS:
        return READERS[model_type]
    why = REFUSED.get(model_type) if isinstance(model_type, str) else None
    head = f"model_type {model_type!r} is not supported: {why}" if why else f"unknown model_type {model_type!r}"
    raise ValueError(f"config.json: {head}; supported model types: {sorted(READERS)}")
