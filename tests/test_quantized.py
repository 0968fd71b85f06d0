"""Quantized checkpoints (moejax.quantization): tiny models quantized here in the published formats (FP8 e4m3
with block scales as DeepSeek-V3 ships, MXFP4 experts as GPT-OSS ships), dequantized by moejax and compared with
a numpy brute force, with transformers' own dequantization, and end to end with the dequantized float checkpoint."""

import copy
import json
import math
import os
import re
import tracemalloc

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from safetensors.torch import save_file

import moejax
from moejax import quantization
from moejax.checkpoints import _Tensors
from tests import hf_models

FP8_MAX = 448.0  # the largest float8 e4m3fn value
DEEPSEEK_V3 = "deepseek_v3-e8k2-groups-dense-first"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


# ---- the published formats, written as their quantizers do (the reference side of every test) ----

def quantize_fp8(w: np.ndarray, block) -> tuple[np.ndarray, np.ndarray]:
    """w [..., R, C] -> (float8_e4m3fn, float32 scale_inv [..., ceil(R/br), ceil(C/bc)]): each block's amax maps
    to 448, in transformers' Fp8Quantize arithmetic (scale = 448 / amax, stored as 1 / scale), partial blocks too."""
    br, bc = block
    rows, cols = w.shape[-2:]
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = np.zeros((*w.shape[:-2], nr * br, nc * bc), np.float32)
    padded[..., :rows, :cols] = w
    amax = np.abs(padded.reshape(*w.shape[:-2], nr, br, nc, bc)).max(axis=(-3, -1))
    scale = np.where(amax > 0, FP8_MAX / np.where(amax > 0, amax, 1), 1.0).astype(np.float32)
    expanded = np.repeat(np.repeat(scale, br, -2), bc, -1)[..., :rows, :cols]
    return np.clip(w * expanded, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), 1 / scale


def fp8_brute_force(weight: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    rows, cols = weight.shape[-2:]
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return weight.astype(np.float32) * scale_inv[..., i // block[0], j // block[1]]


def _fp4_from_bits(code: np.ndarray) -> np.ndarray:
    """e2m1 from its sign, exponent and mantissa bits (not a table): exponent 0 is subnormal (m * 0.5)."""
    sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
    magnitude = np.where(exponent == 0, 0.5 * mantissa, (1 + 0.5 * mantissa) * 2.0 ** (exponent.astype(np.int32) - 1))
    return np.where(sign == 1, -magnitude, magnitude).astype(np.float32)


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GPT-OSS experts w [E, in, out] -> (blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32]): per group
    of 32 inputs the OCP MX shared exponent floor(log2 amax) - 2 (6 = 1.5 * 2**2 is e2m1's largest), each value
    rounded to the nearest e2m1, two per byte with the even element in the low nibble."""
    rows = np.swapaxes(w, 1, 2)
    groups = rows.reshape(*rows.shape[:-1], -1, 32)
    amax = np.abs(groups).max(-1)
    exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127).astype(np.int32)
    scaled = groups / np.ldexp(1.0, exponent)[..., None]
    table = _fp4_from_bits(np.arange(16, dtype=np.uint8))
    codes = np.abs(scaled[..., None] - table).argmin(-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).astype(np.uint8)


def mxfp4_brute_force(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    e, rows, groups, _ = blocks.shape
    x, r, j = np.meshgrid(np.arange(e), np.arange(rows), np.arange(groups * 32), indexing="ij")
    byte = blocks[x, r, j // 32, (j % 32) // 2]
    code = np.where(j % 2 == 0, byte & 0x0F, byte >> 4)
    value = _fp4_from_bits(code) * 2.0 ** (scales[x, r, j // 32].astype(np.float64) - 127)
    return np.swapaxes(value, 1, 2).astype(np.float32)  # [E, in, out]


def _torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(array.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(np.ascontiguousarray(array))


def _write(directory, tensors: dict, config: dict):
    os.makedirs(directory, exist_ok=True)
    save_file({n: _torch(t) for n, t in tensors.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


def _fp8_modules(hf_model) -> tuple[set, set]:
    """The modules transformers' FP8 integration quantizes (every nn.Linear but lm_head; the experts): what a
    release stores as float8 with scales. The router, norms and embeddings stay floating point."""
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    model = copy.deepcopy(hf_model)  # its modules are replaced in place
    replaced = replace_with_fp8_linear(model, get_keys_to_not_convert(model),
                                       transformers.FineGrainedFP8Config(weight_block_size=(128, 128)))
    kinds = {n: type(m).__name__ for n, m in replaced.named_modules()}
    return {n for n, k in kinds.items() if k == "FP8Linear"}, {n for n, k in kinds.items() if k.startswith("FP8Experts")}


def fp8_checkpoint(directory, hf_model, block, dequantized_directory=None) -> dict:
    """`hf_model` saved as an FP8 block-scaled checkpoint (and, given a second directory, as the float32
    checkpoint of exactly its dequantized weights); returns the stored tensors."""
    linears, experts = _fp8_modules(hf_model)
    hf_model.save_pretrained(directory)
    state = load_file(os.path.join(directory, "model.safetensors"))
    config = json.load(open(os.path.join(directory, "config.json")))
    stored, dequantized = {}, {}
    for name, value in state.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and (module in linears or any(module.startswith(f"{e}.") for e in experts)):
            stored[name], stored[f"{name}_scale_inv"] = quantize_fp8(value, block)
            dequantized[name] = fp8_brute_force(stored[name], stored[f"{name}_scale_inv"], block)
        else:
            stored[name] = dequantized[name] = value
    _write(directory, stored, {**config, "quantization_config": {**FP8_CONFIG, "weight_block_size": list(block)}})
    if dequantized_directory is not None:
        _write(dequantized_directory, dequantized, config)
    return stored


def gpt_oss(seed: int = 0):
    """A tiny transformers GPT-OSS (experts [E, in, out] with in = 64 and 96: 2 and 3 MXFP4 groups)."""
    config = transformers.GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32.0, beta_slow=1.0, truncate=False))
    torch.manual_seed(seed)
    return transformers.GptOssForCausalLM(config).eval()


def mxfp4_checkpoint(directory, float_directory) -> dict:
    """A tiny GPT-OSS as GPT-OSS ships: experts in MXFP4 (`*_blocks` / `*_scales`), the rest (biases, router,
    attention, sinks, embeddings) as stored; and, in `float_directory`, the float32 checkpoint of exactly the
    dequantized weights. Returns the MXFP4 checkpoint's tensors."""
    gpt_oss().save_pretrained(float_directory)
    state = load_file(os.path.join(float_directory, "model.safetensors"))
    config = json.load(open(os.path.join(float_directory, "config.json")))
    stored, dequantized = {}, {}
    for name, value in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[f"{name}_blocks"], stored[f"{name}_scales"] = quantize_mxfp4(value)
            dequantized[name] = mxfp4_brute_force(stored[f"{name}_blocks"], stored[f"{name}_scales"])
        else:
            stored[name] = dequantized[name] = value
    quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _write(directory, stored, {**config, "quantization_config": quantization_config})
    _write(float_directory, dequantized, config)
    return stored


# ---- dequantization against the brute force and transformers' own functions ----

@pytest.mark.parametrize("shape, block", [((40, 24), (16, 16)), ((3, 33, 20), (8, 16)), ((32, 48), (16, 16)),
                                          ((7, 130), (128, 128))])
def test_fp8_dequantization_is_the_weight_times_its_blocks_scale(shape, block):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    rng = np.random.RandomState(0)
    weight, scale_inv = quantize_fp8(rng.randn(*shape).astype(np.float32) * 3, block)
    want = fp8_brute_force(weight, scale_inv, block)
    got = quantization.dequantize_fp8(weight, scale_inv, block)
    np.testing.assert_array_equal(got, want)
    # transformers: the backward-pass helper (partial blocks) and, where blocks divide the shape, the load op
    np.testing.assert_array_equal(got, _dequantize_fp8_weight(_torch(weight), _torch(scale_inv), list(block),
                                                              torch.float32).numpy())
    if shape[-2] % block[0] == 0 and shape[-1] % block[1] == 0:
        for dtype, torch_dtype in ((np.float32, torch.float32), (ml_dtypes.bfloat16, torch.bfloat16)):
            ref = Fp8Dequantize(None)._dequantize_one(_torch(weight), _torch(scale_inv), torch_dtype)
            np.testing.assert_array_equal(quantization.dequantize_fp8(weight, scale_inv, block, dtype),
                                          ref.float().numpy().astype(dtype))


def test_the_fp8_quantizer_here_is_transformers_where_blocks_divide_the_shape():
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0)) * 2
    hf_quantizer = type("Q", (), {"quantization_config": transformers.FineGrainedFP8Config(weight_block_size=(16, 16))})
    ref = Fp8Quantize(hf_quantizer())._quantize_one("x.weight", w)
    weight, scale_inv = quantize_fp8(w.numpy(), (16, 16))
    np.testing.assert_array_equal(_torch(weight).view(torch.uint8), ref["x.weight"].view(torch.uint8))
    # to 2 ulp: of its two divisions (448 / amax, 1 / scale) torch's CPU kernel takes each through a reciprocal
    np.testing.assert_array_max_ulp(scale_inv, ref["x.weight_scale_inv"].numpy(), maxulp=2)


def test_mxfp4_dequantization_is_transformers_convert_moe_packed_tensors():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.RandomState(0)
    blocks = rng.randint(0, 256, size=(3, 10, 4, 16)).astype(np.uint8)
    scales = rng.randint(118, 136, size=(3, 10, 4)).astype(np.uint8)
    got = quantization.dequantize_mxfp4(blocks, scales)
    assert got.shape == (3, 4 * 32, 10)
    np.testing.assert_array_equal(got, mxfp4_brute_force(blocks, scales))
    for dtype, torch_dtype in ((np.float32, torch.float32), (ml_dtypes.bfloat16, torch.bfloat16)):
        ref = convert_moe_packed_tensors(_torch(blocks), _torch(scales), dtype=torch_dtype)
        np.testing.assert_array_equal(quantization.dequantize_mxfp4(blocks, scales, dtype),
                                      ref.float().numpy().astype(dtype))


def test_the_mxfp4_quantizer_here_round_trips_values_mxfp4_can_hold():
    rng = np.random.RandomState(1)
    fp4 = _fp4_from_bits(rng.randint(0, 16, size=(2, 64, 5)).astype(np.uint8))
    fp4[:, ::32] = 6.0  # each group of 32 inputs reaches e2m1's largest value: its exponent is the group's
    w = fp4 * np.ldexp(1.0, rng.randint(-6, 3, size=(2, 2, 5))).repeat(32, axis=1)
    np.testing.assert_array_equal(quantization.dequantize_mxfp4(*quantize_mxfp4(w)), w)


# ---- whole checkpoints ----

TOKENS = np.random.RandomState(0).randint(0, 96, size=(2, 9))


@pytest.fixture(scope="module")
def fp8_partial_blocks(tmp_path_factory):
    """(FP8 checkpoint, float checkpoint of its dequantized weights) with 16 x 12 blocks: every quantized shape
    (48, 32, 20, 56, 16, 24) has partial last blocks on one axis or both."""
    directory = tmp_path_factory.mktemp("fp8")
    fp8_checkpoint(directory / "fp8", hf_models.build(DEEPSEEK_V3), (16, 12), directory / "float")
    return directory / "fp8", directory / "float"


def _params(model) -> dict:
    from flax import nnx

    return {path: np.asarray(value) for path, value in nnx.to_flat_state(nnx.state(model))}


def test_an_fp8_deepseek_v3_checkpoint_loads_as_its_dequantized_float_checkpoint(fp8_partial_blocks):
    fp8, dequantized = fp8_partial_blocks
    for dtype in ("float32", "bfloat16"):
        a, b = _params(moejax.load_pretrained(fp8, dtype=dtype)), _params(moejax.load_pretrained(dequantized, dtype=dtype))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), dtype
        assert {str(v.dtype) for k, v in a.items() if "score_bias" not in str(k)} == {dtype}
    logits = moejax.load_pretrained(fp8)(jnp.asarray(TOKENS))
    np.testing.assert_array_equal(logits, moejax.load_pretrained(dequantized)(jnp.asarray(TOKENS)))


def test_transformers_reads_the_fp8_checkpoint_moejax_reads_to_the_same_logits(tmp_path):
    # transformers' dequantizing loader needs blocks that divide every shape (it refuses partial ones): 4 x 8
    fp8_checkpoint(tmp_path, hf_models.build(DEEPSEEK_V3), (4, 8))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor(TOKENS)).logits.numpy()
    got = np.asarray(moejax.load_pretrained(tmp_path)(jnp.asarray(TOKENS)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_an_mxfp4_gpt_oss_checkpoint_shows_the_tensors_of_its_float_checkpoint(tmp_path):
    """The hook on what the load plan reads (GPT-OSS's plan itself is moejax.families' and checkpoints._plan's):
    names, shapes, dtypes and values, against the float checkpoint and transformers' own MXFP4 loader."""
    stored = mxfp4_checkpoint(tmp_path / "mxfp4", tmp_path / "float")
    assert any(n.endswith("gate_up_proj_blocks") for n in stored)
    view = quantization.DequantizedTensors(_Tensors(str(tmp_path / "mxfp4")), quantization.Mxfp4(), np.float32)
    dequantized, plain = load_file(tmp_path / "float" / "model.safetensors"), _Tensors(str(tmp_path / "float"))
    assert view.names() == set(dequantized)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mxfp4", dtype=torch.float32).state_dict()
    for name, want in dequantized.items():
        assert (view.shape(name), view.dtype(name)) == (plain.shape(name), plain.dtype(name)), name
        np.testing.assert_array_equal(view.get(name), want, err_msg=name)
        np.testing.assert_array_equal(hf[name].numpy(), want, err_msg=name)


def test_an_mxfp4_gpt_oss_checkpoint_loads_as_its_dequantized_float_checkpoint(tmp_path):
    """End to end: moejax.load_pretrained of the MXFP4 checkpoint is the model of its dequantized float
    checkpoint (the same parameters, the same logits), and transformers' MXFP4 loader computes those logits."""
    mxfp4_checkpoint(tmp_path / "mxfp4", tmp_path / "float")
    a, b = _params(moejax.load_pretrained(str(tmp_path / "mxfp4"))), _params(moejax.load_pretrained(str(tmp_path / "float")))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tokens = np.asarray(TOKENS)  # within GPT-OSS's tiny vocabulary (96)
    logits = np.asarray(moejax.load_pretrained(str(tmp_path / "mxfp4"))(jnp.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mxfp4", dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()


def _peak_bytes_while_loading(path) -> int:
    moejax.load_pretrained(path)  # compile and cache once, outside the measurement
    tracemalloc.start()
    try:
        moejax.load_pretrained(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_loader_never_holds_the_quantized_checkpoint_twice(tmp_path, monkeypatch):
    """Peak host memory of a load (numpy arrays and the rest, tracemalloc) of an FP8 checkpoint against that of
    its float32 dequantized checkpoint: within one stacked-experts parameter (0.5 MB), where holding every
    dequantized tensor (the control below) adds the whole checkpoint (3.3 MB)."""
    config = transformers.DeepseekV3Config(**{**hf_models._BASE, **hf_models.VARIANTS[DEEPSEEK_V3][2],
                                              "n_routed_experts": 64, "moe_intermediate_size": 64})
    torch.manual_seed(0)
    fp8_checkpoint(tmp_path / "fp8", transformers.DeepseekV3ForCausalLM(config), (16, 16), tmp_path / "float")
    dequantized = load_file(tmp_path / "float" / "model.safetensors")
    total = sum(t.nbytes for t in dequantized.values())
    one_parameter = config.n_routed_experts * config.moe_intermediate_size * config.hidden_size * 4
    assert total > 4 * one_parameter
    baseline = _peak_bytes_while_loading(tmp_path / "float")
    assert _peak_bytes_while_loading(tmp_path / "fp8") < baseline + one_parameter

    held, read = [], quantization.DequantizedTensors.get

    def read_and_hold(self, name):
        held.append(read(self, name))
        return held[-1]

    monkeypatch.setattr(quantization.DequantizedTensors, "get", read_and_hold)
    assert _peak_bytes_while_loading(tmp_path / "fp8") > baseline + total / 2  # the measurement sees a held copy


# ---- bad input: each error names what is wrong and where ----

def _edited(source, destination, edit_tensors=None, **config_changes):
    """A copy of checkpoint `source` with its tensors edited and config.json keys changed (None: removed)."""
    from safetensors.torch import load_file as load_torch

    tensors = load_torch(os.path.join(source, "model.safetensors"))
    config = json.load(open(os.path.join(source, "config.json")))
    for key, value in config_changes.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    os.makedirs(destination)
    save_file(edit_tensors(tensors) if edit_tensors else tensors, os.path.join(destination, "model.safetensors"))
    with open(os.path.join(destination, "config.json"), "w") as f:
        json.dump(config, f)
    return destination


def test_an_unknown_quant_method_is_refused_by_name_with_the_supported_ones(fp8_partial_blocks, tmp_path):
    path = _edited(fp8_partial_blocks[0], tmp_path / "ck", quantization_config={"quant_method": "compressed-tensors"})
    with pytest.raises(ValueError, match=r"quant_method='compressed-tensors', which moejax does not read; supported: "
                                         r"\['fp8', 'mxfp4'\].*\(in .*config\.json\)"):
        moejax.load_pretrained(path)


@pytest.mark.parametrize("key, value", [("activation_scheme", "static"), ("fmt", "e5m2"), ("expert_dtype", "fp4"),
                                        ("weight_block_size", None), ("weight_block_size", [128]),
                                        ("scale_fmt", "e4m3")])
def test_an_fp8_setting_moejax_cannot_honour_is_refused_by_name(key, value):
    with pytest.raises(ValueError, match=rf"quantization_config {key}={re.escape(repr(value))} "):
        quantization.read_format({**FP8_CONFIG, key: value})


def test_a_missing_scale_tensor_is_named_with_its_weight_and_file(fp8_partial_blocks, tmp_path):
    scale = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    path = _edited(fp8_partial_blocks[0], tmp_path / "ck", lambda t: {n: v for n, v in t.items() if n != scale})
    with pytest.raises(ValueError, match=rf"missing scale tensor '{re.escape(scale)}' for quantized weight "
                                         rf"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' in "
                                         rf"{re.escape(str(path / 'model.safetensors'))}"):
        moejax.load_pretrained(path)


def test_a_scale_of_the_wrong_shape_is_named_with_the_shape_expected(fp8_partial_blocks, tmp_path):
    scale = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"  # weight [56, 16], 16 x 12 blocks: [4, 2]
    path = _edited(fp8_partial_blocks[0], tmp_path / "ck", lambda t: {**t, scale: torch.ones(3, 2)})
    with pytest.raises(ValueError, match=rf"scale tensor '{re.escape(scale)}' in .*model\.safetensors has shape "
                                         r"\(3, 2\), expected \(4, 2\) for weight '.*kv_b_proj\.weight' of shape \(56, 16\)"):
        moejax.load_pretrained(path)


def test_float8_weights_without_a_quantization_config_are_refused(fp8_partial_blocks, tmp_path):
    path = _edited(fp8_partial_blocks[0], tmp_path / "ck", quantization_config=None)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' in model\.safetensors has "
                                         r"dtype F8_E4M3; .*quantization_config names \(fp8, mxfp4\)"):
        moejax.load_pretrained(path)


def test_mxfp4_blocks_without_scales_and_scales_without_blocks_are_named(tmp_path):
    blocks, scales = quantize_mxfp4(np.ones((2, 32, 4), np.float32))
    _write(tmp_path, {"a.experts.down_proj_blocks": blocks, "b.experts.down_proj_scales": scales,
                      "c.experts.down_proj_blocks": blocks[0], "c.experts.down_proj_scales": scales[0]}, {})
    with pytest.raises(ValueError) as error:
        quantization.DequantizedTensors(_Tensors(str(tmp_path)), quantization.Mxfp4(), np.float32)
    file = re.escape(str(tmp_path / "model.safetensors"))
    assert re.search(rf"missing scale tensor 'a\.experts\.down_proj_scales' for quantized weight "
                     rf"'a\.experts\.down_proj_blocks' in {file}", str(error.value))
    assert re.search(rf"scale tensor 'b\.experts\.down_proj_scales' in {file} has no weight "
                     r"'b\.experts\.down_proj_blocks'", str(error.value))
    assert re.search(r"quantized weight 'c\.experts\.down_proj_blocks' in .* has shape \(4, 1, 16\), not "
                     r"\[experts, rows, groups, 16\]", str(error.value))


@pytest.mark.parametrize("scale_dtype", [torch.uint8, torch.float8_e8m0fnu])
def test_fp8_weights_with_e8m0_scales_dequantize_by_powers_of_two(scale_dtype, tmp_path):
    """scale_fmt "ue8m0": each block's scale stored as an exponent byte b, the scale 2 ** (b - 127)."""
    rng = np.random.RandomState(2)
    weight = (rng.randn(20, 40) * 50).astype(ml_dtypes.float8_e4m3fn)
    exponents = rng.randint(110, 140, size=(2, 3)).astype(np.uint8)
    save_file({"x.weight": _torch(weight), "x.weight_scale_inv": torch.from_numpy(exponents).view(scale_dtype)},
              tmp_path / "model.safetensors")
    view = quantization.DequantizedTensors(_Tensors(str(tmp_path)), quantization.read_format(
        {**FP8_CONFIG, "scale_fmt": "ue8m0", "weight_block_size": [16, 16]}), np.float32)
    assert view.names() == {"x.weight"}
    scales = (2.0 ** (exponents.astype(np.float64) - 127)).astype(np.float32)
    np.testing.assert_array_equal(view.get("x.weight"), fp8_brute_force(weight, scales, (16, 16)))


def test_a_sharded_fp8_checkpoint_with_scales_apart_from_their_weights_loads_the_same(fp8_partial_blocks, tmp_path):
    from safetensors.torch import load_file as load_torch

    fp8, dequantized = fp8_partial_blocks
    tensors = load_torch(fp8 / "model.safetensors")
    scales = {n for n in tensors if n.endswith("_scale_inv")}  # every scale in the other shard from its weight
    shards = {"model-00001-of-00002.safetensors": {n: t for n, t in tensors.items() if n not in scales},
              "model-00002-of-00002.safetensors": {n: tensors[n] for n in scales}}
    for file, part in shards.items():
        save_file(part, tmp_path / file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: file for file, part in shards.items() for n in part}}))
    (tmp_path / "config.json").write_text((fp8 / "config.json").read_text())
    a, b = _params(moejax.load_pretrained(tmp_path)), _params(moejax.load_pretrained(dequantized))
    assert all(np.array_equal(a[k], b[k]) for k in b)
