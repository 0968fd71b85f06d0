"""moejax against Hugging Face transformers (the reference) on tiny random checkpoints of every family."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import moejax
from moejax.generate import pad_prompts
from tests import hf_models

VARIANTS = sorted(hf_models.VARIANTS)
VOCAB = 96


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
    """(transformers model, moejax model loaded from its save_pretrained checkpoint)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = hf_models.save(request.param, path)
    return hf, moejax.load_pretrained(path)


def _prompts(seed=1):
    rs = np.random.RandomState(seed)
    return [rs.randint(1, VOCAB, size=5).tolist(), rs.randint(1, VOCAB, size=13).tolist()]


def _hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


def test_logits_match(pair):
    hf, model = pair
    tokens = np.random.RandomState(0).randint(0, VOCAB, size=(2, 17))
    ref = _hf_logits(hf, tokens)
    out = np.asarray(model(jnp.asarray(tokens)))
    assert out.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # a non-trivial comparison
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_router_margins_are_wide(pair):
    """Precondition for exact generation parity: no top-k choice is within float noise of a tie."""
    _, model = pair
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, size=(2, 17)))
    out = model.forward(tokens)
    for r in out.routings:
        if r is None:
            continue
        k = r.experts.shape[-1]
        sorted_scores = np.sort(np.asarray(r.scores), axis=-1)[:, ::-1]
        assert (sorted_scores[:, k - 1] - sorted_scores[:, k]).min() > 1e-5


def test_left_padded_batch_matches_each_prompt_alone(pair):
    hf, model = pair
    prompts = _prompts()
    tokens, mask = pad_prompts(prompts)
    out = np.asarray(model(jnp.asarray(tokens), token_mask=jnp.asarray(mask)))
    for i, p in enumerate(prompts):
        ref = _hf_logits(hf, [p])[0]
        np.testing.assert_allclose(out[i, mask[i]], ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches(pair):
    hf, model = pair
    prompts = _prompts()
    new = np.asarray(moejax.generate(model, prompts, max_new_tokens=16))
    assert new.shape == (2, 16) and new.dtype == np.int32
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16, do_sample=False)[0, len(p):].numpy()
        np.testing.assert_array_equal(new[i], ref)
