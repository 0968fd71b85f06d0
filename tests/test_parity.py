"""moejax against Hugging Face transformers (the reference) on tiny random checkpoints of every family."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import moejax
from moejax import routing
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
    """Precondition for exact generation parity: no top-k choice (of groups, then of experts) is within
    float noise of a tie. Softmax scores: relative gaps (rounding moves a score by about 1e-7 of itself);
    sigmoid choice scores (biased, in about [0, 1.2]): absolute gaps."""
    _, model = pair
    c = model.config
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, size=(2, 17)))
    out = model.forward(tokens)
    blocks = iter(model.moe_blocks())
    for r in out.routings:
        if r is None:
            continue
        block = next(blocks)
        if c.topk_method == "sparsemixer":
            assert _sparsemixer_margins_are_wide(np.asarray(r.logits), c.router_jitter_eps)
            continue
        bias = None if block.score_bias is None else block.score_bias[...]

        def gap(values, k):
            top = np.sort(np.asarray(values), axis=-1)[:, ::-1]
            if c.scoring_func == "sigmoid":
                return (top[:, k - 1] - top[:, k]).min() > 1e-5
            return (1 - top[:, k] / top[:, k - 1]).min() > 1e-4

        if c.topk_method != "greedy" and c.topk_group < c.n_group:
            assert gap(routing.group_scores(r.scores, c.topk_method, c.n_group, bias), c.topk_group)
        choice = routing.choice_scores(r.scores, c.topk_method, c.n_group, c.topk_group, bias)
        assert gap(jnp.where(jnp.isinf(choice), -1.0, choice), r.experts.shape[-1])


def _sparsemixer_margins_are_wide(logits, jitter_eps):
    """Each round's top logit clear of the next (relative gap), and no logit near its round's band edge."""
    for _ in range(2):
        top = np.sort(logits, axis=-1)[:, ::-1]
        peak = top[:, :1]
        edge = (peak - logits) / np.maximum(np.abs(logits), peak) - 2 * jitter_eps
        clear_of_next = ((top[:, 0] - top[:, 1]) / np.abs(top[:, 0])).min() > 1e-4
        if not (clear_of_next and np.abs(edge[np.isfinite(edge)]).min() > 1e-4):
            return False
        logits = np.where(logits == peak, -np.inf, logits)  # the second round, the first choice out
    return True


def test_left_padded_batch_matches_each_prompt_alone(pair):
    hf, model = pair
    prompts = _prompts()
    tokens, mask = pad_prompts(prompts)
    out = np.asarray(model(jnp.asarray(tokens), token_mask=jnp.asarray(mask)))
    for i, p in enumerate(prompts):
        ref = _hf_logits(hf, [p])[0]
        np.testing.assert_allclose(out[i, mask[i]], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mixtral-e8k3-mqa-tied-window", "deepseek_v2-lite",
                                  "gpt_oss-e4k2-window-yarn-clamped", "llama4_text-e4-interleaved-chunked-nope-qknorm"])
def test_long_prefill_matches(name, tmp_path):
    """Prompts longer than one attention query chunk (the chunked prefill path, with GPT-OSS's sinks and sliding
    layers, Llama 4's chunked ones), with a KV cache."""
    hf = hf_models.save(name, tmp_path)
    model = moejax.load_pretrained(tmp_path)
    prompts = [np.random.RandomState(2).randint(1, VOCAB, size=n).tolist() for n in (150, 290)]
    new = np.asarray(moejax.generate(model, prompts, max_new_tokens=4))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        np.testing.assert_array_equal(new[i], ref.sequences[0, len(p):].numpy())
        logits = np.asarray(model(jnp.asarray([p])))[0, -1]
        np.testing.assert_allclose(logits, ref.logits[0][0].numpy(), atol=1e-4, rtol=0)


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
