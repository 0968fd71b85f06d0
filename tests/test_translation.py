"""The translation workload (moejax.translation) and the sequence-to-sequence training run: pair encoding,
the loss and perplexity against brute force from the model's own logits, greedy translation against
moejax.generate, and a whole tiny training run exported and loaded back."""

import importlib.util
import os
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import moejax
from moejax import data, seq2seq, training, translation
from moejax.training import translation as mt_training

CODE = [textwrap.dedent(f'''
    def {name}(value, count={i}):
        """{summary}"""
        return value * {i} + count
    ''') for i, (name, summary) in enumerate([
        ("scale", "Return the value scaled by the factor."), ("shift", "Shift the value by one count."),
        ("repeat", "Repeat the value a number of times."), ("clip", "Clip the value into the range."),
        ("merge", "Merge two values into one value.")])]
PAIRS = data.function_pairs([data.Document(f"m{i}.py", c) for i, c in enumerate(CODE)])


def _repository_config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("config", os.path.join(os.path.dirname(__file__), "..", path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _tiny_config(**model):
    m = ml_collections.ConfigDict(dict(hidden_size=32, num_layers=2, num_heads=2, ffn_dim=48, sparse_step=2,
                                       num_experts=4, eval_capacity_fraction=1.0, **model))
    return mt_training.nllb_moe_config(m, vocab_size=300, max_positions=64)


@pytest.fixture(scope="module")
def tokenizer():
    return translation.train_tokenizer(PAIRS, 300)


@pytest.fixture(scope="module")
def model():
    return seq2seq.random_model(seq2seq.from_hf_config(_tiny_config()), seed=0)


def test_pairs_encode_with_nllb_special_tokens(tokenizer, model):
    assert [tokenizer.token_to_id(t) for t in translation.SPECIAL_TOKENS] == [0, 1, 2, 3]
    encoded = translation.encode_pairs(tokenizer, PAIRS, model.config, max_source_tokens=8, max_target_tokens=5)
    for i, p in enumerate(PAIRS):
        source = tokenizer.encode(p.source).ids[:7] + [2]
        target = [2] + tokenizer.encode(p.target).ids[:4] + [2]
        assert encoded.source[i][encoded.source_mask[i]].tolist() == source
        assert encoded.target[i][encoded.target_mask[i]].tolist() == target
        assert (encoded.source[i][~encoded.source_mask[i]] == 1).all()  # padding is <pad>
    with pytest.raises(ValueError, match="max_target_tokens=1"):
        translation.encode_pairs(tokenizer, PAIRS, model.config, 8, 1)


def _brute_force_nll(model, encoded):
    """Per pair: the summed -log p of its target tokens after the start, from an unpadded forward."""
    out = []
    for s, sm, t, tm in zip(*encoded):
        source, target = s[sm][None], t[tm][None]
        logits = model(source, decoder_input_ids=target[:, :-1])
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)[0]
        out.append(-sum(logp[j, target[0, j + 1]] for j in range(target.shape[1] - 1)))
    return np.asarray(out), encoded.target_mask[:, 1:].sum(1)


def test_loss_and_perplexity_against_brute_force(tokenizer, model):
    encoded = translation.encode_pairs(tokenizer, PAIRS, model.config, 12, 6)
    nll, counts = _brute_force_nll(model, encoded)
    terms = training.seq2seq_loss(model, tuple(jnp.asarray(a) for a in encoded), training.LossWeights(0.0, 0.0))
    # the loss is the mean over every counted target token of the padded batch
    np.testing.assert_allclose(float(terms.cross_entropy), nll.sum() / counts.sum(), rtol=1e-5)
    assert float(terms.total) == pytest.approx(float(terms.cross_entropy))
    weighted = training.seq2seq_loss(model, tuple(jnp.asarray(a) for a in encoded), training.LossWeights(0.5, 0.1))
    assert float(weighted.total) == pytest.approx(float(terms.cross_entropy) + 0.5 * float(weighted.load_balance)
                                                  + 0.1 * float(weighted.router_z), rel=1e-5)
    assert float(weighted.load_balance) >= 1.0 - 1e-5  # both stacks' MoE layers: minimal (1) at perfect balance
    assert translation.target_perplexity(model, encoded, batch_size=2) == pytest.approx(
        float(np.exp(nll.sum() / counts.sum())), rel=1e-5)


def test_translate_is_generate_cut_at_eos(tokenizer, model):
    encoded = translation.encode_pairs(tokenizer, PAIRS, model.config, 12, 6)
    texts = translation.translate(model, tokenizer, encoded, max_new_tokens=5, batch_size=2)
    for i, text in enumerate(texts):
        source = encoded.source[i][encoded.source_mask[i]].tolist()
        ids = np.asarray(moejax.generate(model, [source], max_new_tokens=5, stop_tokens=[2]))[0].tolist()
        assert text == tokenizer.decode(ids[:ids.index(2)] if 2 in ids else ids).strip()


def test_quality_against_sacrebleu_identity_and_mismatch():
    refs = [p.target for p in PAIRS]
    assert translation.quality(refs, refs)["chrf"] == pytest.approx(100.0)
    assert translation.copy_baseline(PAIRS)["chrf"] < 100.0
    with pytest.raises(ValueError, match="4 hypotheses for 5 references"):
        translation.quality(refs[:4], refs)


def test_a_tiny_training_run_learns_exports_and_loads_back(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, c in enumerate(CODE * 4):
        (corpus / f"m{i}.py").write_text(c)
    config = _repository_config("configs/train_mt.py", "quick")  # shrunk below
    config.corpus, config.vocab_size, config.validation_fraction, config.test_fraction = str(corpus), 300, 0.3, 0.0
    config.model.update(hidden_size=32, num_layers=2, num_heads=2, ffn_dim=48, num_experts=4)
    config.batch_size, config.steps, config.eval_every, config.eval_pairs = 8, 12, 6, 8
    config.max_source_tokens, config.max_target_tokens, config.learning_rate = 24, 8, 1e-2
    result = mt_training.run(config, str(tmp_path / "run"), progress=False, devices=jax.devices()[:1])
    losses = [h["cross_entropy"] for h in result["history"]["train"]]
    assert np.mean(losses[-3:]) < losses[0]  # it learns
    export = tmp_path / "export"
    seq2seq.export_pretrained(result["model"], str(export), tokenizer=result["tokenizer"])
    loaded = seq2seq.load_pretrained(str(export))
    source, target = np.array([[5, 6, 7, 2]]), np.array([[2, 8, 9]])
    np.testing.assert_allclose(np.asarray(loaded(source, decoder_input_ids=target)),
                               np.asarray(result["model"](source, decoder_input_ids=target)), atol=1e-5)
