"""experiments/reproduce.py: both papers on a decoder LM and an encoder-decoder MT model, one report.

  ./launch.sh reproduce --quick                                   # the trained default model, quick sweeps
  ./launch.sh reproduce --config=configs/reproduce.py:quick       # the same
  ./launch.sh reproduce --config=configs/reproduce.py:olmoe --config.checkpoint=/data/OLMoE-1B-7B-0924
  ./launch.sh reproduce --config=configs/reproduce.py:mixtral,quick --config.checkpoint=/data/Mixtral-8x7B-v0.1
  ./launch.sh reproduce --quick --config.capacity.tasks='()' --config.placement.devices='(4, 8)'
  ./launch.sh reproduce --config=configs/reproduce.py:nllb_moe --config.mt_checkpoint=/data/nllb-moe-54b

The argument after the colon names a model preset (default, olmoe, qwen_moe, deepseek_v2, mixtral, qwen3_moe,
deepseek_v3, glm4_moe, granitemoe, ernie4_5_moe, dots1, minimax_m2, gpt_oss, llama4_text, phimoe, exaone_moe, solar_open, glm4_moe_lite, sarvam_moe, dbrx, hy_v3, flint,
aria_text, granitemoe_swa; nllb_moe: the MT stages only, on an NLLB-MoE
checkpoint) and/or "quick". The LM stages run on `checkpoint`, the MT stages (translation: quality, decoder routing,
buffering, placement and capacity-aware drop on MT; mt_gating: static vs dynamic gating on MT layer shapes) on
`mt_checkpoint` (the default preset: the trained default MT model, experiments/mt_model; the LM presets run the LM
stages only). Each stage's settings are the
config of its script (configs/<script>.py, its "quick" variant under quick), nested here as config.<stage>:
override any of them with --config.<stage>.FIELD=VALUE. checkpoint and num_devices are set once at the top and
shared by every LM stage that has them. A real checkpoint needs its own directory (config.json, safetensors,
tokenizer.json; FP8 and MXFP4 releases are dequantized at load); the evaluation text is the Python standard
library corpus of moejax.data, tokenised with the checkpoint's tokenizer.
"""

import importlib.util
import os

import ml_collections

# expert-parallel devices the papers used per model (capacity scope, straggler model, placement)
PRESETS = {
    "default": dict(checkpoint="experiments/default_model", num_devices=8, mt_checkpoint="experiments/mt_model"),
    "olmoe": dict(checkpoint="", num_devices=8),          # 64 experts on 8 GPUs, as He et al.
    "qwen_moe": dict(checkpoint="", num_devices=8),
    "deepseek_v2": dict(checkpoint="", num_devices=8),
    "qwen3_moe": dict(checkpoint="", num_devices=8),      # Qwen3-30B-A3B: 128 experts, top-8
    "deepseek_v3": dict(checkpoint="", num_devices=8),    # DeepSeek-V3 / R1 (FP8), Moonlight: 64-256 experts
    "glm4_moe": dict(checkpoint="", num_devices=8),       # GLM-4.5-Air: 128 experts
    "granitemoe": dict(checkpoint="", num_devices=8),     # Granite-3.x MoE (granitemoe / granitemoeshared): 32-40 experts
    "ernie4_5_moe": dict(checkpoint="", num_devices=8),   # ERNIE-4.5-21B-A3B: 64 experts
    "dots1": dict(checkpoint="", num_devices=8),          # dots.llm1: 128 experts
    "minimax_m2": dict(checkpoint="", num_devices=8),     # MiniMax-M2: 256 experts (its FP8 release loads dequantized)
    "gpt_oss": dict(checkpoint="", num_devices=8),        # gpt-oss-20b / 120b: 32 / 128 experts (MXFP4 dequantized)
    "llama4_text": dict(checkpoint="", num_devices=8),    # Llama 4 Scout / Maverick text: 16 / 128 experts, top-1
    "phimoe": dict(checkpoint="", num_devices=8),         # Phi-3.5-MoE: 16 experts, top-2
    "exaone_moe": dict(checkpoint="", num_devices=8),     # K-EXAONE
    "solar_open": dict(checkpoint="", num_devices=8),     # Solar Open
    "glm4_moe_lite": dict(checkpoint="", num_devices=8),  # GLM-4.7-Flash
    "sarvam_moe": dict(checkpoint="", num_devices=8),     # Sarvam-30B
    "dbrx": dict(checkpoint="", num_devices=8),           # DBRX: 16 experts, top-4
    "hy_v3": dict(checkpoint="", num_devices=8),          # Hy3
    "flint": dict(checkpoint="", num_devices=8),
    "aria_text": dict(checkpoint="", num_devices=8),      # Aria's text model
    "granitemoe_swa": dict(checkpoint="", num_devices=8),
    "mixtral": dict(checkpoint="", num_devices=8),        # one expert per GPU, as He et al.
    "nllb_moe": dict(checkpoint=None, num_devices=8, mt_checkpoint=""),  # NLLB-MoE-54B (128 experts): MT stages only
}
# stage -> the script that runs it (experiments/<script>.py, configured by configs/<script>.py), in run order
STAGES = {"straggler": "evaluate", "capacity": "capacity_sweep", "gating": "gating_throughput",
          "buffering": "buffering", "placement": "placement", "translation": "translation",
          "mt_gating": "gating_throughput"}
MT_STAGES = ("translation", "mt_gating")
MT_LAYERS = ("mt_encoder", "mt_decoder")  # experiments/gating_throughput.LAYERS: NLLB-MoE's layer shapes, scaled


def _script_config(script: str, variant: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{script}.py")
    spec = importlib.util.spec_from_file_location(f"config_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    parts = [p for p in arg.split(",") if p]
    quick = "quick" in parts
    models = [p for p in parts if p != "quick"] or ["default"]
    if len(models) > 1 or models[0] not in PRESETS:
        raise ValueError(f"unknown model preset {','.join(models)!r}; presets: {sorted(PRESETS)} (and 'quick')")
    config = ml_collections.ConfigDict()
    config.model = models[0]
    config.quick = quick
    preset = PRESETS[config.model]
    # the LM stages run where the preset names an LM (checkpoint), the MT stages where it names an MT model
    lm, mt = preset["checkpoint"] is not None, preset.get("mt_checkpoint") is not None
    config.checkpoint = preset["checkpoint"] or ""
    config.mt_checkpoint = preset.get("mt_checkpoint") or ""
    config.num_devices = preset["num_devices"]
    config.stages = tuple(s for s in STAGES if (mt if s in MT_STAGES else lm))
    for stage in config.stages:
        script = STAGES[stage]
        sub = _script_config(script, "quick" if quick else "")
        for shared in ("checkpoint", "num_devices"):
            if shared in sub:
                sub[shared] = config.get_ref("mt_checkpoint" if shared == "checkpoint" and stage in MT_STAGES
                                             else shared)
        if stage == "mt_gating":
            sub.layers = MT_LAYERS
        sub.script = script
        config[stage] = sub
    return config
