"""export_pretrained: moejax models written as Hugging Face checkpoints that transformers and moejax load alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import moejax
from tests.tiny import tiny_config

CONFIGS = {
    # intermediate_size: these families have one FFN size, the experts'
    "mixtral": dict(architecture="mixtral", tie_word_embeddings=True, sliding_window=8, intermediate_size=24),
    "olmoe": dict(architecture="olmoe", qk_norm=True, norm_topk_prob=False, num_experts=8, num_experts_per_tok=3,
                  intermediate_size=24),
    "qwen2_moe": dict(architecture="qwen2_moe", qkv_bias=True, norm_topk_prob=False, shared_expert_intermediate_size=40,
                      shared_expert_gate=True, moe_layers=(True, False), intermediate_size=56),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_exported_checkpoint_loads_in_transformers_and_moejax(family, tmp_path):
    model = moejax.random_model(tiny_config(**CONFIGS[family]), seed=5)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * 10  # decisive routing, as a trained model has
    moejax.export_pretrained(model, tmp_path)
    tokens = np.random.RandomState(0).randint(0, 64, size=(2, 12))
    ours = np.asarray(model(jnp.asarray(tokens)))
    reloaded = moejax.load_pretrained(tmp_path)
    assert reloaded.config == model.config
    np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(tokens))), ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == moejax.config.to_hf_config(model.config)["architectures"][0]
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_unexpressible_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot export as mixtral: norm_topk_prob=False"):
        moejax.export_pretrained(moejax.random_model(tiny_config(norm_topk_prob=False)), tmp_path)


def _trained_kind_of_model(dtype=jnp.float32):
    """A random model of the kind moejax.training builds (OLMoE, tied embeddings), routers made decisive."""
    from moejax import training

    config = training.model_config("olmoe", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                   max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=0)
    model = moejax.random_model(config, seed=3, dtype=dtype)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * 10
    return model


def test_training_model_exports_in_bfloat16_with_its_tokenizer(tmp_path):
    """The default model's path: trained float32 -> bfloat16 checkpoint + tokenizer.json, read by both libraries."""
    from moejax import data

    model = _trained_kind_of_model()
    model_bf16 = moejax.load_pretrained(_export(model, tmp_path / "f32"), dtype="bfloat16")
    tokenizer = data.train_tokenizer(["def f(x):\n    return x + 1\n"] * 4, vocab_size=270)
    moejax.export_pretrained(model_bf16, tmp_path / "bf16", tokenizer=tokenizer)
    reloaded = moejax.load_pretrained(tmp_path / "bf16")  # float32 compute from the bfloat16 tensors
    for ours, theirs in zip(jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jnp.asarray(theirs, jnp.bfloat16), np.float32))
    text = "def g(y):\n    return y\n"
    assert moejax.load_tokenizer(tmp_path / "bf16").decode(tokenizer.encode(text).ids) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    tokens = np.random.RandomState(1).randint(0, 64, size=(2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(tokens))), theirs, atol=1e-4, rtol=0)


def _export(model, directory):
    moejax.export_pretrained(model, directory)
    return directory


def test_committed_default_model_loads_in_both_libraries_and_predicts_python():
    """experiments/default_model works on a fresh machine with no training, and it has learned something."""
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "default_model")
    model = moejax.load_pretrained(path)
    tokenizer = moejax.load_tokenizer(path)
    text = "import os\n\n\ndef join(a, b):\n    return os.path.join(a, b)\n"
    tokens = np.asarray([tokenizer.encode(text).ids])
    assert tokenizer.decode(tokens[0].tolist()) == text
    ours = np.asarray(model(jnp.asarray(tokens)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    logprobs = ours[0, :-1] - np.log(np.exp(ours[0, :-1]).sum(-1, keepdims=True))
    perplexity = float(np.exp(-logprobs[np.arange(tokens.shape[1] - 1), tokens[0, 1:]].mean()))
    assert perplexity < 100  # a uniform guess is 2048; the unigram baseline about 560


def _sharded(model, directory):
    """`model` exported, then rewritten as a sharded checkpoint (two shards and the index naming them), with a
    generation_config.json: the layout the Hub serves, which an export over it must not leave half in place."""
    import json
    import os

    from safetensors.numpy import load_file, save_file

    moejax.export_pretrained(model, directory)
    tensors = load_file(directory / "model.safetensors")
    os.remove(directory / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, held in shards.items():
        save_file({n: tensors[n] for n in held}, directory / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: shard for shard, held in shards.items() for n in held}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    return directory


def _old_and_new():
    old, new = (moejax.random_model(tiny_config(), seed=s) for s in (4, 5))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(2, 12)))
    return old, new, tokens, np.asarray(old(tokens)), np.asarray(new(tokens))


def test_an_export_over_a_checkpoint_is_refused_or_replaces_it_whole(tmp_path):
    import os

    old, new, tokens, old_logits, new_logits = _old_and_new()
    path = _sharded(old, tmp_path / "ck")
    np.testing.assert_array_equal(np.asarray(moejax.load_pretrained(path)(tokens)), old_logits)
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError, match=r"'.*ck' is not empty \(config.json, generation_config.json, .*overwrite=True"):
        moejax.export_pretrained(new, path)
    assert sorted(os.listdir(path)) == before
    np.testing.assert_array_equal(np.asarray(moejax.load_pretrained(path)(tokens)), old_logits)
    # replaced whole: the stale index (which loaders read before model.safetensors) and shards are gone
    moejax.export_pretrained(new, path, overwrite=True)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["ck"]  # no temporary or replaced sibling left
    np.testing.assert_array_equal(np.asarray(moejax.load_pretrained(path)(tokens)), new_logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(np.asarray(tokens))).logits.numpy(), new_logits, atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError, match=r"is a file"):
        moejax.export_pretrained(new, path / "config.json", overwrite=True)


class _FailingTokenizer:
    def save(self, path):
        raise OSError(f"disk full writing {path}")


@pytest.mark.parametrize("failure", ["tokenizer", "rename"])
def test_an_export_that_fails_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch, failure):
    import os

    old, new, tokens, old_logits, _ = _old_and_new()
    path = _sharded(old, tmp_path / "ck")
    before = sorted(os.listdir(path))
    tokenizer = None
    if failure == "tokenizer":  # after model.safetensors and config.json are written
        tokenizer = _FailingTokenizer()
    else:  # the new checkpoint complete, the old one moved aside: renaming the new one into place fails
        rename = os.rename
        monkeypatch.setattr(os, "rename", lambda a, b: (_ for _ in ()).throw(OSError("rename failed"))
                            if ".partial-" in os.fspath(a) else rename(a, b))
    with pytest.raises(OSError, match="disk full|rename failed"):
        moejax.export_pretrained(new, path, tokenizer=tokenizer, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before and os.listdir(tmp_path) == ["ck"]
    np.testing.assert_array_equal(np.asarray(moejax.load_pretrained(path)(tokens)), old_logits)
