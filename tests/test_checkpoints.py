"""Loading checkpoints: sharded files, orbax round trip, tokenizer, and clear errors for bad checkpoints."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
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
    _write_config(path, model_type="llama4")
    with pytest.raises(ValueError, match=r"unknown model_type 'llama4'.*deepseek_v2.*mixtral.*olmoe.*qwen2_moe"):
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
