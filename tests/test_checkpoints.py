"""Loading checkpoints: sharded files, orbax round trip, tokenizer, and clear errors for bad checkpoints."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import moejax
from tests import hf_models

TOKENS = np.random.RandomState(0).randint(0, 96, size=(2, 9))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    hf_models.save("qwen2_moe-e4k2", path)
    return path


@pytest.fixture(scope="module")
def reference_logits(checkpoint):
    return np.asarray(moejax.load_pretrained(checkpoint)(jnp.asarray(TOKENS)))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_sharded_checkpoint_loads_the_same(checkpoint, reference_logits, tmp_path):
    tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {n: s for s, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(os.path.join(checkpoint, "config.json"), tmp_path)
    logits = np.asarray(moejax.load_pretrained(tmp_path)(jnp.asarray(TOKENS)))
    np.testing.assert_array_equal(logits, reference_logits)


def test_orbax_round_trip(checkpoint, reference_logits, tmp_path):
    model = moejax.load_pretrained(checkpoint)
    moejax.save_converted(model, tmp_path / "converted")
    restored = moejax.load_pretrained(tmp_path / "converted")
    assert restored.config == model.config
    np.testing.assert_array_equal(np.asarray(restored(jnp.asarray(TOKENS))), reference_logits)


def test_split_experts_load_save_and_export_as_the_stacked_ones(checkpoint, reference_logits, tmp_path):
    """load_pretrained(expert_storage="split") computes the stacked model's logits; a split model saves and
    exports the checkpoints its stacked original writes."""
    split = moejax.load_pretrained(checkpoint, expert_storage="split")
    assert all(b.expert_storage == "split" for b in split.moe_blocks())
    np.testing.assert_allclose(np.asarray(split(jnp.asarray(TOKENS))), reference_logits, atol=1e-5, rtol=0)
    moejax.save_converted(split, tmp_path / "converted")
    restored = moejax.load_pretrained(tmp_path / "converted", expert_storage="split")
    assert all(b.expert_storage == "split" for b in restored.moe_blocks())
    stacked, original = moejax.load_pretrained(tmp_path / "converted"), moejax.load_pretrained(checkpoint)
    for got, want in zip(jax.tree.leaves(nnx.state(stacked)), jax.tree.leaves(nnx.state(original))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    moejax.export_pretrained(split, tmp_path / "exported")
    exported, original = (load_file(os.path.join(d, "model.safetensors")) for d in (tmp_path / "exported", checkpoint))
    assert sorted(exported) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    mesh = moejax.parallel.make_mesh(expert=4, data=2)  # the checkpoint has 4 experts
    sharded = moejax.load_pretrained(checkpoint, expert_storage="split", mesh=mesh)
    assert all(b.expert_storage == "split" for b in sharded.moe_blocks())
    np.testing.assert_allclose(np.asarray(sharded(jnp.asarray(TOKENS))), reference_logits, atol=1e-5, rtol=0)


def test_bfloat16_load_is_close(checkpoint, reference_logits):
    model = moejax.load_pretrained(checkpoint, dtype="bfloat16")
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    logits = np.asarray(model(jnp.asarray(TOKENS)))
    assert np.abs(logits - reference_logits).max() < 0.1 * np.abs(reference_logits).max()


def test_missing_tensor_is_named_with_its_shape(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight' "
                                         r"\(expected shape \(16, 32\)\)"):
        moejax.load_pretrained(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _edit_tensors(path, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros((3, 4), np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        moejax.load_pretrained(path)


def test_shape_mismatch_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _edit_tensors(path, lambda t: t.update({"model.norm.weight": np.ones((31,), np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(31,\), expected \(32,\)"):
        moejax.load_pretrained(path)


def _write_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_model_type_lists_supported(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _write_config(path, model_type="llama")
    with pytest.raises(ValueError, match=r"unknown model_type 'llama'.*deepseek_v2.*mixtral.*olmoe.*qwen2_moe"):
        moejax.load_pretrained(path)


def test_unknown_architecture_lists_supported(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _write_config(path, architectures=["Qwen2MoeForSequenceClassification"])
    with pytest.raises(ValueError, match=r"unsupported architecture 'Qwen2MoeForSequenceClassification'.*"
                                         r"Qwen2MoeForCausalLM"):
        moejax.load_pretrained(path)


def test_top_k_larger_than_experts_is_refused(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _write_config(path, num_experts_per_tok=5)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=5 is invalid.*num_experts=4"):
        moejax.load_pretrained(path)


def test_pickle_only_checkpoint_is_refused(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    os.rename(path / "model.safetensors", path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        moejax.load_pretrained(path)


def test_local_tokenizer_is_used(checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = _copy(checkpoint, tmp_path / "ck")
    assert moejax.load_tokenizer(path) is None
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    assert moejax.load_tokenizer(path).encode("hello world").ids == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# Files that cannot be read: the error names the file (and the tensor)


def test_config_that_is_not_json_names_the_file(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    (path / "config.json").write_text('{"model_type": "qwen2_moe",')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path / 'config.json'))} is not valid JSON"):
        moejax.load_pretrained(path)


def test_generation_config_that_is_not_json_names_the_file(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    (path / "generation_config.json").write_text("eos_token_id: 3")
    with pytest.raises(ValueError, match=r"generation_config\.json is not valid JSON"):
        moejax.load_pretrained(path)


def test_config_field_of_the_wrong_type_names_field_value_and_file(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _write_config(path, num_experts="4")
    with pytest.raises(ValueError, match=r"config\.json: num_experts='4' is invalid: must be an integer "
                                         r"\(in .*config\.json\)"):
        moejax.load_pretrained(path)


def test_quantized_checkpoint_is_refused_through_its_quantization_config(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _write_config(path, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match=r"quant_method='gptq', which moejax does not read; supported: \['fp8', 'mxfp4'\]"):
        moejax.load_pretrained(path)


def test_truncated_safetensors_file_is_named(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}.* is not a readable safetensors file \(truncated"):
        moejax.load_pretrained(path)


def _shard(checkpoint, path):
    """The checkpoint in two shards with an index; returns (names in shard 1, names in shard 2)."""
    tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
    names = sorted(tensors)
    shutil.copy(os.path.join(checkpoint, "config.json"), path)
    save_file({n: tensors[n] for n in names[::2]}, path / "a.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, path / "b.safetensors")
    return names[::2], names[1::2]


def test_index_without_weight_map_is_named(checkpoint, tmp_path):
    _shard(checkpoint, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json has no 'weight_map' object"):
        moejax.load_pretrained(tmp_path)


def test_tensor_mapped_to_the_wrong_shard_names_tensor_and_shard(checkpoint, tmp_path):
    first, second = _shard(checkpoint, tmp_path)
    weight_map = {**{n: "a.safetensors" for n in first}, **{n: "b.safetensors" for n in second}}
    weight_map[second[0]] = "a.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(second[0])}' is mapped to .*a\.safetensors', which "
                                         "does not hold it"):
        moejax.load_pretrained(tmp_path)


def test_index_naming_a_file_outside_the_checkpoint_is_refused(checkpoint, tmp_path):
    first, second = _shard(checkpoint, tmp_path)
    weight_map = {**{n: "a.safetensors" for n in first}, **{n: "../b.safetensors" for n in second}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"names shard '\.\./b\.safetensors', which is not a file of the checkpoint"):
        moejax.load_pretrained(tmp_path)


@pytest.mark.parametrize("dtype, name", [(np.int32, "I32"), (np.bool_, "BOOL"), (np.int8, "I8")])
def test_weight_of_a_non_float_dtype_is_refused_not_cast(checkpoint, tmp_path, dtype, name):
    path = _copy(checkpoint, tmp_path / "ck")
    _edit_tensors(path, lambda t: t.update({"model.norm.weight": np.ones((32,), dtype)}))
    with pytest.raises(ValueError, match=rf"tensor 'model\.norm\.weight' in model\.safetensors has dtype {name}; "
                                         r"weights must be floating point"):
        moejax.load_pretrained(path)


def test_float16_weights_load(checkpoint, reference_logits, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _edit_tensors(path, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    logits = np.asarray(moejax.load_pretrained(path)(jnp.asarray(TOKENS)))
    assert np.abs(logits - reference_logits).max() < 0.05 * np.abs(reference_logits).max()


def test_tokenizer_of_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"checkpoint directory '{re.escape(str(tmp_path / 'nope'))}' does "
                                                "not exist"):
        moejax.load_tokenizer(tmp_path / "nope")


def test_corrupt_tokenizer_names_the_file(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a readable tokenizers file"):
        moejax.load_tokenizer(path)


# ---------------------------------------------------------------------------------------------------------
# load_pretrained's arguments


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="int8"), ValueError, r"dtype='int8' must be a floating-point dtype"),
    (dict(dtype="float3"), ValueError, r"dtype='float3' is not a dtype"),
    (dict(policy="x"), ValueError, r"policy='x' must be a moejax\.MoEPolicy"),
    (dict(policy=dict(capacity_factor=1.5)), ValueError, r"policy=\{'capacity_factor': 1\.5\} must be"),
    (dict(gating="static"), ValueError, r"\['gating'\] apply to expert parallelism and need a mesh="),
    (dict(capacity_fraction=0.5), ValueError, r"\['capacity_fraction'\] apply to expert parallelism"),
    (dict(mesh="expert"), ValueError, r"mesh='expert' must be a jax\.sharding\.Mesh"),
    (dict(expert_storage="rows"), ValueError, r"unknown expert_storage 'rows'; supported: \('stacked', 'split'\)"),
])
def test_load_pretrained_argument_types_are_checked(checkpoint, kwargs, error, match):
    with pytest.raises(error, match=match):
        moejax.load_pretrained(checkpoint, **kwargs)


def test_load_pretrained_of_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory '.*nope' does not exist"):
        moejax.load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"path=3 must be a checkpoint directory"):
        moejax.load_pretrained(3)


# ---------------------------------------------------------------------------------------------------------
# The end-of-sequence token: generation_config.json over config.json, as transformers generates


def test_eos_comes_from_generation_config_then_config(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    _write_config(path, eos_token_id=7)
    assert moejax.load_pretrained(path).config.eos_token_id == 7  # generation_config.json names no eos
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 5], "pad_token_id": 1}))
    config = moejax.load_pretrained(path).config
    assert config.eos_token_id == (3, 5) and config.pad_token_id == 1


def test_generation_stops_at_the_checkpoints_eos_as_transformers_does(checkpoint, tmp_path):
    import torch
    import transformers

    model = moejax.load_pretrained(checkpoint)
    prompt = [[5, 9, 2, 17, 40]]
    free = np.asarray(moejax.generate(model, prompt, max_new_tokens=10))[0]
    eos = int(free[3])
    stop = int(np.argmax(free == eos))  # its first occurrence
    path = _copy(checkpoint, tmp_path / "ck")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0}))
    ours = np.asarray(moejax.generate(moejax.load_pretrained(path), prompt, max_new_tokens=10))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(1, 5, dtype=torch.long),
                             max_new_tokens=10, do_sample=False)[0, 5:].numpy()
    np.testing.assert_array_equal(ours[:stop + 1], free[:stop + 1])
    assert (ours[stop + 1:] == 0).all()  # the pad id after the stop
    np.testing.assert_array_equal(ours[:len(theirs)], theirs)  # transformers ends its sequence at the eos
    assert len(theirs) == stop + 1
    unstopped = np.asarray(moejax.generate(moejax.load_pretrained(path), prompt, max_new_tokens=10, stop_tokens=()))
    np.testing.assert_array_equal(unstopped[0], free)


# ---------------------------------------------------------------------------------------------------------
# Converted checkpoints: nothing lost


def _tiny(seed):
    from tests.tiny import tiny_config

    return moejax.random_model(tiny_config(), seed=seed)


TINY_TOKENS = np.random.RandomState(3).randint(0, 64, size=(2, 7))


def _logits(model):
    return np.asarray(model(jnp.asarray(TINY_TOKENS)))


@pytest.fixture(scope="module")
def old_and_new():
    old, new = _tiny(4), _tiny(5)
    return old, new, _logits(old), _logits(new)


def test_save_refuses_a_hugging_face_checkpoint_directory(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    before = sorted(os.listdir(path))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}' holds a Hugging Face checkpoint"):
            moejax.save_converted(moejax.load_pretrained(path), path, overwrite=overwrite)
    assert sorted(os.listdir(path)) == before


def test_a_directory_holding_both_kinds_is_refused_not_guessed(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "ck")
    moejax.save_converted(moejax.load_pretrained(path, dtype="bfloat16"), tmp_path / "converted")
    for entry in os.listdir(tmp_path / "converted"):  # what an older save_converted did to such a directory
        shutil.move(tmp_path / "converted" / entry, path / entry)
    with pytest.raises(ValueError, match=r"holds both a Hugging Face checkpoint and a converted one"):
        moejax.load_pretrained(path, dtype="float32")


def test_save_refuses_a_non_empty_directory(old_and_new, tmp_path):
    old, new, old_logits, _ = old_and_new
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"'{re.escape(str(tmp_path))}' exists and holds no converted"):
        moejax.save_converted(old, tmp_path, overwrite=True)
    assert os.listdir(tmp_path) == ["notes.txt"]
    moejax.save_converted(old, tmp_path / "ck")
    with pytest.raises(FileExistsError, match=r"already holds a converted checkpoint; pass overwrite=True"):
        moejax.save_converted(new, tmp_path / "ck")
    np.testing.assert_array_equal(_logits(moejax.load_pretrained(tmp_path / "ck")), old_logits)


def test_overwrite_replaces_and_leaves_one_parameter_directory(old_and_new, tmp_path):
    old, new, _, new_logits = old_and_new
    moejax.save_converted(old, tmp_path / "ck")
    moejax.save_converted(new, tmp_path / "ck", overwrite=True)
    np.testing.assert_array_equal(_logits(moejax.load_pretrained(tmp_path / "ck")), new_logits)
    assert len([e for e in os.listdir(tmp_path / "ck") if e.startswith("params")]) == 1
    assert os.listdir(tmp_path) == ["ck"]  # no temporary sibling left


def test_save_into_an_empty_directory(old_and_new, tmp_path):
    old, _, old_logits, _ = old_and_new
    (tmp_path / "empty").mkdir()
    moejax.save_converted(old, tmp_path / "empty")
    np.testing.assert_array_equal(_logits(moejax.load_pretrained(tmp_path / "empty")), old_logits)


def test_dtype_is_honoured_for_converted_checkpoints(old_and_new, tmp_path):
    old, _, old_logits, _ = old_and_new
    moejax.save_converted(old, tmp_path / "f32")
    bf16 = moejax.load_pretrained(tmp_path / "f32", dtype="bfloat16")
    assert bf16.dtype == jnp.bfloat16 and bf16.embed_tokens[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16.embed_tokens[...]),
                                  np.asarray(old.embed_tokens[...].astype(jnp.bfloat16)))
    moejax.save_converted(bf16, tmp_path / "bf16")
    assert moejax.restore_converted(tmp_path / "bf16").dtype == jnp.bfloat16  # dtype=None: as saved
    f32 = moejax.load_pretrained(tmp_path / "bf16")  # the default, float32, as for a Hugging Face checkpoint
    assert f32.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(f32)))
    with pytest.raises(ValueError, match=r"dtype='int32' must be a floating-point dtype"):
        moejax.load_pretrained(tmp_path / "f32", dtype="int32")


_KILLED_SAVE = r'''
import os, shutil, signal, sys
import moejax
import orbax.checkpoint as ocp
from moejax import checkpoints
from tests.tiny import tiny_config

point, directory = sys.argv[1], sys.argv[2]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "writing":  # the new parameters are being written (orbax writes in the background)
    save = ocp.StandardCheckpointer.save
    ocp.StandardCheckpointer.save = lambda self, *a, **k: (save(self, *a, **k), die())
elif point == "written":  # the new parameters are complete in the temporary sibling
    checkpoints._write_json_durably = die
elif point == "moved":  # the new parameters sit beside the old ones, unreferenced
    replace = os.replace
    os.replace = lambda a, b: die() if b.endswith("moejax_config.json") else replace(a, b)
elif point == "switched":  # moejax_config.json names the new parameters; the old ones are still there
    rmtree = shutil.rmtree
    shutil.rmtree = lambda p, *a, **k: die() if os.path.basename(p).startswith("params") else rmtree(p, *a, **k)
model = moejax.random_model(tiny_config(**eval(sys.argv[3])), seed=5)
print("saving", flush=True)
moejax.save_converted(model, directory, overwrite=True)
'''


def _killed_save(point, directory, config="{}"):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    return subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, point, str(directory), config], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.parametrize("point, survivor", [("writing", "old"), ("written", "old"), ("moved", "old"),
                                             ("switched", "new")])
def test_a_save_killed_mid_write_leaves_a_loadable_checkpoint(old_and_new, tmp_path, point, survivor):
    old, new, old_logits, new_logits = old_and_new
    moejax.save_converted(old, tmp_path / "ck")
    process = _killed_save(point, tmp_path / "ck")
    process.communicate(timeout=300)
    assert process.returncode == -9  # killed at that point, not finished
    expected = old_logits if survivor == "old" else new_logits
    np.testing.assert_array_equal(_logits(moejax.load_pretrained(tmp_path / "ck")), expected)
    # what the killed save left (a temporary sibling, unreferenced parameters) blocks nothing and is cleaned up
    moejax.save_converted(new, tmp_path / "ck", overwrite=True)
    np.testing.assert_array_equal(_logits(moejax.load_pretrained(tmp_path / "ck")), new_logits)
    assert len([e for e in os.listdir(tmp_path / "ck") if e.startswith("params")]) == 1


def test_a_first_save_killed_mid_write_leaves_no_half_checkpoint(old_and_new, tmp_path):
    _, new, _, new_logits = old_and_new
    process = _killed_save("written", tmp_path / "ck")
    process.communicate(timeout=300)
    assert process.returncode == -9
    assert not os.path.exists(tmp_path / "ck")
    moejax.save_converted(new, tmp_path / "ck")
    np.testing.assert_array_equal(_logits(moejax.load_pretrained(tmp_path / "ck")), new_logits)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.02, 0.1, 0.2, 0.4])  # a save of this model takes 0.15-0.5 s here
def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path, delay):
    import time

    config = "dict(hidden_size=128, moe_intermediate_size=512, num_experts=8)"  # tens of MB: a write takes a while
    from tests.tiny import tiny_config

    old, new = (moejax.random_model(tiny_config(**eval(config)), seed=s) for s in (4, 5))
    moejax.save_converted(old, tmp_path / "ck")
    process = _killed_save("none", tmp_path / "ck", config)
    assert process.stdout.readline().strip() == "saving"
    time.sleep(delay)
    process.kill()
    process.communicate(timeout=300)
    logits = _logits(moejax.load_pretrained(tmp_path / "ck"))
    if process.returncode == 0:  # it finished before the kill
        np.testing.assert_array_equal(logits, _logits(new))
    else:
        assert any(np.array_equal(logits, _logits(m)) for m in (old, new))
