"""A checkpoint directory's files read as transformers reads them, and bad values in them named with their
file: config.json values of the wrong kind, a bad generation_config.json, rope_scaling over rope_parameters,
model.safetensors over a stale shard index."""

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import moejax
from tests import hf_models

TOKENS = np.array([[3, 17, 42, 5, 9, 60, 11, 2, 33, 70, 1, 4]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    hf_models.save("qwen2_moe-e4k2", path)
    return path


def _edited(checkpoint, tmp_path, file="config.json", **values):
    path = tmp_path / "ck"
    shutil.copytree(checkpoint, path)
    content = json.loads((path / file).read_text()) if (path / file).exists() else {}
    (path / file).write_text(json.dumps({**content, **values}))
    return path


def _transformers_logits(path):
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("values, match", [
    (dict(num_attention_heads=0), r"num_attention_heads=0 is invalid: must be a positive integer"),
    (dict(decoder_sparse_step=0), r"decoder_sparse_step=0 is invalid: must be a positive integer"),
    (dict(rope_scaling="linear"), r"rope_scaling='linear' is invalid: must be an object"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": "4"}), r"rope_parameters.factor='4' is invalid: must be a number"),
    (dict(hidden_act=["silu"]), r"hidden_act=\['silu'\] is invalid: must be a string"),
    # a kind of value no check foresees still names the file, not a bare TypeError
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": None,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     r"config\.json holds a value moejax cannot read \(TypeError"),
])
def test_a_bad_config_value_is_named_with_its_file(checkpoint, tmp_path, values, match):
    path = _edited(checkpoint, tmp_path, **values)
    with pytest.raises(ValueError, match=match) as error:
        moejax.load_pretrained(path)
    assert str(path / "config.json") in str(error.value)


def test_a_bad_generation_config_value_names_generation_config_json(checkpoint, tmp_path):
    path = _edited(checkpoint, tmp_path, file="generation_config.json", eos_token_id="2")
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id='2' is invalid: must be a token id"
                                         rf".*\(in {re.escape(str(path / 'generation_config.json'))}\)"):
        moejax.load_pretrained(path)


def test_rope_scaling_replaces_rope_parameters_as_in_transformers(tmp_path):
    """A model card's "add rope_scaling to config.json for YaRN" on a config transformers 5 wrote."""
    hf_models.save("qwen3_moe-e8k2-head_dim", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = moejax.load_pretrained(tmp_path)
    assert (model.config.rope.kind, model.config.rope.factor) == ("yarn", 4.0)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), _transformers_logits(tmp_path),
                               atol=1e-4, rtol=0)


def test_model_safetensors_wins_over_a_stale_shard_index_as_in_transformers(tmp_path):
    hf_models.build("mixtral-e4k2", seed=0).save_pretrained(tmp_path, max_shard_size="20KB")  # index + shards
    assert (tmp_path / "model.safetensors.index.json").exists()
    new = hf_models.build("mixtral-e4k2", seed=5)
    save_file({k: v.contiguous() for k, v in new.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    expected = _transformers_logits(tmp_path)
    with torch.no_grad():
        np.testing.assert_array_equal(expected, new(torch.tensor(TOKENS)).logits.numpy())  # transformers: the new
    np.testing.assert_allclose(np.asarray(moejax.load_pretrained(tmp_path)(jnp.asarray(TOKENS))), expected,
                               atol=1e-4, rtol=0)


def test_overwriting_a_converted_checkpoint_removes_only_its_own_parameters(tmp_path):
    from tests.tiny import tiny_config

    path = tmp_path / "ck"
    moejax.save_converted(moejax.random_model(tiny_config(), seed=0), path)
    (old,) = [e.name for e in path.iterdir() if e.name.startswith("params-")]
    shutil.copytree(path / old, path / "params_backup")  # the user's own
    (path / "params_notes.txt").write_text("lr=3e-4\n")
    moejax.save_converted(moejax.random_model(tiny_config(), seed=1), path, overwrite=True)
    names = sorted(e.name for e in path.iterdir())
    assert old not in names and {"params_backup", "params_notes.txt"} <= set(names)
    assert len([n for n in names if re.fullmatch(r"params-[0-9a-f]{12}", n)]) == 1


def test_no_path_and_no_dtype_are_named(checkpoint):
    with pytest.raises(ValueError, match=r"path=None must be a checkpoint directory"):
        moejax.load_tokenizer(None)
    with pytest.raises(ValueError, match=r"dtype=None is not a floating-point dtype"):
        moejax.load_pretrained(checkpoint, dtype=None)
