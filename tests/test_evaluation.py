"""Perplexity against a brute-force computation, one unpadded sequence at a time."""

import json
import math
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import evaluation
from tests.tiny import tiny_config


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_perplexity_matches_brute_force():
    model = moejax.random_model(tiny_config(), seed=4)
    rs = np.random.RandomState(0)
    sequences = [rs.randint(0, 64, size=n).tolist() for n in (2, 9, 17, 5, 30)]
    nll, count = 0.0, 0
    for s in sequences:
        logprobs = _log_softmax(np.asarray(model(jnp.asarray([s])), np.float64)[0])
        nll -= sum(logprobs[i, s[i + 1]] for i in range(len(s) - 1))
        count += len(s) - 1
    expected = math.exp(nll / count)
    assert math.isclose(evaluation.perplexity(model, sequences, batch_size=3), expected, rel_tol=1e-4)
    assert math.isclose(evaluation.perplexity(model, sequences, batch_size=1), expected, rel_tol=1e-4)


def test_perplexity_bad_input():
    model = moejax.random_model(tiny_config(), seed=4)
    with pytest.raises(ValueError, match="two or more tokens"):
        evaluation.perplexity(model, [[1]])
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluation.perplexity(model, [[1, 2]], batch_size=0)


# ---------------------------------------------------------------------------------------------------------
# Multiple choice (lm-eval style) and routing statistics, against brute force on a tiny random model.



from moejax import data, stats  # noqa: E402

_TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
          "import os\nprint(os.sep, os.getcwd())\n", "for i in range(10):\n    total += i * i\n"] * 2


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_tokenizer(_TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def decisive_model():
    """Vocabulary 300 for the tokenizer; routers scaled so that top-k choices are far from ties."""
    model = moejax.random_model(tiny_config(vocab_size=300, num_experts=8, num_experts_per_tok=2), seed=7)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * 20
    return model


_RIGHT_PADDED = 64


def _unpadded_forward(model, ids):
    """forward of one unpadded sequence; the tail of filler tokens after it cannot change its positions
    (causal attention, dropless routing), and one length compiles once."""
    out = _jitted_forward(model, jnp.asarray([list(ids) + [1] * (_RIGHT_PADDED - len(ids))]))
    return out._replace(logits=out.logits[:, :len(ids)])


_jitted_forward = nnx.jit(lambda model, tokens: model.forward(tokens))


def _brute_force_log_likelihood(model, context, continuation):
    ids = list(context) + list(continuation)
    logprobs = _log_softmax(np.asarray(_unpadded_forward(model, ids).logits, np.float64)[0])
    return sum(logprobs[len(context) + i - 1, ids[len(context) + i]] for i in range(len(continuation)))


EXAMPLES = [
    evaluation.MultipleChoice("def add(a, b):\n", ("    return a + b", "class Point:", "x"), 0),
    evaluation.MultipleChoice("import os\n", ("print(os.sep)", "    y: int = 0"), 1),
    evaluation.MultipleChoice("for i in range(10):\n    ", ("total += i * i\n", "import os", "a", "b + c"), 2),
    evaluation.MultipleChoice("x", ("y", "yy"), 0),
]


def test_multiple_choice_against_brute_force(decisive_model, tokenizer):
    correct = correct_norm = 0
    for e in EXAMPLES:
        context = tokenizer.encode(e.context).ids
        ll = np.array([_brute_force_log_likelihood(decisive_model, context, tokenizer.encode(c).ids) for c in e.choices])
        correct += int(np.argmax(ll)) == e.gold
        correct_norm += int(np.argmax(ll / np.array([len(c) for c in e.choices]))) == e.gold
    for batch_size in (2, 16):  # several batches, and one batch mostly of filler rows
        scores = evaluation.score_multiple_choice(decisive_model, tokenizer, EXAMPLES, batch_size=batch_size)
        assert scores["acc"] == correct / 4 and scores["acc_norm"] == correct_norm / 4
        assert math.isclose(scores["chance"], (1 / 3 + 1 / 2 + 1 / 4 + 1 / 2) / 4)
    assert 0 < correct < 4 or 0 < correct_norm < 4  # the metrics are not trivially 0 or 1 here


def test_continuation_log_likelihoods_against_brute_force(decisive_model):
    rs = np.random.RandomState(1)
    requests = [(rs.randint(1, 300, size=n).tolist(), rs.randint(1, 300, size=m).tolist())
                for n, m in ((1, 1), (7, 3), (3, 12), (5, 30), (40, 1))]  # padded to 16 or 64 tokens
    expected = [_brute_force_log_likelihood(decisive_model, c, x) for c, x in requests]
    for batch_size in (3, 8):
        ours = evaluation.continuation_log_likelihoods(decisive_model, requests, batch_size=batch_size)
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="request 1: the context is empty"):
        evaluation.continuation_log_likelihoods(decisive_model, [([1], [2]), ([], [3])])


def test_task_files_with_bad_lines_fail_naming_file_and_line(tmp_path):
    path = tmp_path / "task.jsonl"
    good = json.dumps({"context": "a", "choices": ["b", "c"], "gold": 1})
    path.write_text(good + "\n\n" + good + "\n")
    assert evaluation.read_multiple_choice(str(path)) == [evaluation.MultipleChoice("a", ("b", "c"), 1)] * 2
    path.write_text(good + "\n" + '{"context": "a", "choices": ["b"' + "\n")
    with pytest.raises(ValueError, match=r"task.jsonl:2: not valid JSON"):
        evaluation.read_multiple_choice(str(path))
    path.write_text(good + "\n" + good + "\n" + json.dumps({"context": "a", "choices": ["b", "c"], "gold": 2}) + "\n")
    with pytest.raises(ValueError, match=r"task.jsonl:3: 'gold'=2 is not an index into the 2 choices"):
        evaluation.read_multiple_choice(str(path))
    path.write_text(json.dumps({"context": "a", "choices": "bc", "gold": 0}) + "\n")
    with pytest.raises(ValueError, match=r"task.jsonl:1: 'choices' must be a list"):
        evaluation.read_multiple_choice(str(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        evaluation.read_multiple_choice(str(tmp_path / "missing.jsonl"))


def test_gold_out_of_range_in_code_is_refused(decisive_model, tokenizer):
    with pytest.raises(ValueError, match="'gold'=-1"):
        evaluation.score_multiple_choice(decisive_model, tokenizer, [evaluation.MultipleChoice("a", ("b", "c"), -1)])


@pytest.mark.parametrize("unit", evaluation.CONTINUATION_UNITS)
def test_continuation_task_is_held_out_text_with_foreign_distractors(unit, tmp_path):
    texts = [f"# module {t}\n" + "".join(f"value_{t}_{i} = compute_{t}_{i % 7}(item_{t}_{i}, {t})\n" for i in range(30))
             for t in range(5)]
    examples = evaluation.continuation_task(texts, num_examples=20, num_choices=4, context_chars=120, seed=3, unit=unit)
    assert len(examples) == 20
    assert examples == evaluation.continuation_task(texts, num_examples=20, num_choices=4, context_chars=120, seed=3,
                                                    unit=unit)
    assert len({e.gold for e in examples}) > 1  # the gold position varies
    for e in examples:
        source = next(t for t in texts if e.context in t)
        gold = e.choices[e.gold]
        following = source[source.index(e.context) + len(e.context):]
        assert following.startswith(gold)
        if unit == "line":
            assert gold.startswith("\n") and following[len(gold):len(gold) + 1] in ("\n", "")
        else:
            assert gold.startswith(" ") and not following[len(gold):len(gold) + 1].isalnum()
        assert len(e.context) <= 120 + 60
        for i, choice in enumerate(e.choices):
            if i != e.gold:
                assert choice not in source and 0.8 <= len(choice) / len(gold) <= 1.25  # foreign, of like length
    path = tmp_path / "task.jsonl"
    evaluation.write_multiple_choice(examples, str(path))
    assert evaluation.read_multiple_choice(str(path)) == examples
    with pytest.raises(ValueError, match="unit='token'"):
        evaluation.continuation_task(texts, num_examples=1, unit="token")


def test_prefill_loads_against_brute_force(decisive_model):
    rs = np.random.RandomState(2)
    sequences = [rs.randint(0, 300, size=n).tolist() for n in (5, 17, 9)]
    loads = evaluation.prefill_loads(decisive_model, sequences, batch_size=2)
    expected = 0
    for s in sequences:  # one unpadded sequence at a time
        routings = _unpadded_forward(decisive_model, s).routings
        expected = expected + np.stack([np.asarray(stats.expert_counts(r._replace(experts=r.experts[:len(s)],
                                                                                  keep=r.keep[:len(s)]),
                                                                       kept=False, top_k=2)) for r in routings])
    np.testing.assert_array_equal(np.asarray(loads["expert_loads"]), expected)
    assert loads["tokens"] == 31 and loads["layers"] == [0, 1]
    np.testing.assert_allclose(loads["max_over_mean"], expected.max(-1) / expected.mean(-1), rtol=1e-6)


def test_decode_loads_follow_greedy_generation(decisive_model):
    prompts = [[5, 9, 200, 17], [42, 8]]
    steps = 5
    loads = evaluation.decode_loads(decisive_model, prompts, steps)
    generated = np.asarray(moejax.generate(decisive_model, prompts, max_new_tokens=steps))
    # brute force: decode step s routes generated token s at position len(prompt) + s; recompute every
    # position of each unpadded sequence at once, without a cache
    experts = [np.stack([np.asarray(r.experts) for r in _unpadded_forward(decisive_model, p + row.tolist()).routings])
               for p, row in zip(prompts, generated)]  # [layers, positions, k] per prompt
    idle = np.zeros(2)
    for step in range(steps):
        routed = np.zeros((2, 8), bool)
        for p, e in zip(prompts, experts):
            for layer in range(2):
                routed[layer, e[layer, len(p) + step]] = True
        idle += (~routed).mean(axis=-1)
    np.testing.assert_allclose(loads["idle_fraction"], idle / steps, rtol=1e-6)
    assert loads["steps"] == steps and loads["batch_size"] == 2


def test_a_choice_is_scored_without_the_special_tokens_a_tokenizer_prepends(decisive_model, tokenizer):
    """A Llama-style tokenizer.json prepends a BOS to every encoding: the context keeps it, the choices (which
    continue the context) must not, as lm-eval encodes continuations."""
    import copy

    from tokenizers.processors import TemplateProcessing

    with_bos = copy.deepcopy(tokenizer)
    bos = with_bos.id_to_token(0)
    with_bos.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    assert with_bos.encode("x").ids[0] == 0 and with_bos.encode("x", add_special_tokens=False).ids[0] != 0
    examples = EXAMPLES[:2]
    scored = []
    real = evaluation.continuation_log_likelihoods
    spy = lambda model, requests, **kw: scored.extend(requests) or real(model, requests, **kw)
    with mock.patch.object(evaluation, "continuation_log_likelihoods", spy):
        evaluation.score_multiple_choice(decisive_model, with_bos, examples)
    expected = [(with_bos.encode(e.context).ids, with_bos.encode(c, add_special_tokens=False).ids)
                for e in examples for c in e.choices]
    assert [(list(c), list(x)) for c, x in scored] == expected
    context, choice = expected[0]
    assert context[0] == 0 and choice[0] != 0  # the BOS starts the context only


def test_evaluation_refuses_longrope_past_its_short_regime_as_the_model_does(tmp_path):
    from tests import hf_models

    hf_models.save("phimoe-e4k2-biases-lm-head-bias-longrope", tmp_path)  # original_max_position_embeddings 64
    model = moejax.load_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(1, 96, size=100).tolist()
    for call in (lambda: model(jnp.asarray([ids])), lambda: evaluation.perplexity(model, [ids]),
                 lambda: evaluation.score_continuations(model, [(ids[:90], ids[90:])])):
        with pytest.raises(ValueError, match=r"100 positions runs past original_max_position_embeddings=64"
                                             r"|99 positions runs past original_max_position_embeddings=64"):
            call()
    assert math.isfinite(evaluation.perplexity(model, [ids[:60]]))  # within it: computed


def test_decode_loads_count_the_real_prompt_positions_not_the_padded_ones():
    import warnings

    model = moejax.random_model(tiny_config(max_position_embeddings=12), seed=0)
    prompts = [[1, 2, 3], [4, 5]]  # padded to 8; 3 real tokens + 5 steps stay within 12 positions
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # generate warns past the positions; not here
        loads = evaluation.decode_loads(model, prompts, steps=5)
    assert loads["steps"] == 5
