"""experiments/capacity_sweep.py on a tiny random model: a resumed sweep skips finished cells and ends with
the JSON an uninterrupted sweep writes; mc_accuracy is the mean of the tasks' acc; bad input is refused."""

import json
import os
import sys

import numpy as np
import pytest

import moejax
from moejax import evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import capacity_sweep as cs  # noqa: E402

# The script's built-in random model, made smaller so that the test stays fast.
TINY = dict(cs.RANDOM_MODEL, hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16, num_layers=1,
            moe_layers=(True,), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
SETTINGS = {"checkpoint": "tiny", "batch_size": 4}


class ByteTokenizer:
    """Stands in for a tokenizers.Tokenizer: score_multiple_choice only calls encode(text[, add_special_tokens]).ids
    (no special tokens to add here)."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=True):
        return self._Encoding([b % TINY["vocab_size"] for b in text.encode()])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    model = moejax.random_model(moejax.ModelConfig(**TINY), seed=0)
    folder = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    paths = []
    for name in ("alpha", "beta"):
        # contexts and choices of at most 16 bytes together: one padded shape, one compile per cell
        examples = [evaluation.MultipleChoice(f"ctx {name[0]}{i}", ("one", "two", "three"), int(rng.integers(3)))
                    for i in range(6)]
        paths.append(str(folder / f"{name}.jsonl"))
        evaluation.write_multiple_choice(examples, paths[-1])
    tasks = cs.load_tasks(paths, 4)
    sequences = list(rng.integers(0, TINY["vocab_size"], size=(8, 16)))  # two full batches of 4: one shape
    return model, sequences, tasks


def _sweep(inputs, workdir, factors, strategies, settings=SETTINGS):
    model, sequences, tasks = inputs
    return cs.run_sweep(model, sequences, tasks, ByteTokenizer(), str(workdir), factors=factors,
                        strategies=strategies, settings=settings, num_devices=4, batch_size=4, repeats=1,
                        progress=False)


def _without_timing(results):
    return [{k: v for k, v in c.items() if k not in cs.TIMING_KEYS} for c in results["cells"]]


def test_resumed_sweep_skips_finished_cells_and_matches_uninterrupted(inputs, tmp_path):
    # two policies only (each compiles its own forwards); "random" because its priorities must also repeat
    factors, strategies = ["none", "1.0"], ["random"]
    whole = _sweep(inputs, tmp_path / "whole", factors, strategies)

    interrupted = _sweep(inputs, tmp_path / "resumed", ["none"], strategies)  # stops after the first cell
    finished = json.load(open(tmp_path / "resumed" / "results.json"))["cells"]
    assert [(c["factor"], c["strategy"]) for c in interrupted["cells"]] == [("none", "dropless")]
    resumed = _sweep(inputs, tmp_path / "resumed", factors, strategies)

    # finished cells are read back, not recomputed: even their timings are unchanged
    assert resumed["cells"][:1] == finished
    assert json.load(open(tmp_path / "resumed" / "results.json")) == resumed
    assert _without_timing(resumed) == _without_timing(whole)
    assert [(c["factor"], c["strategy"]) for c in whole["cells"]] == cs.sweep_cells(factors, strategies)

    for cell in whole["cells"]:
        assert set(cell["tasks"]) == {"alpha", "beta"}
        accs = [t["acc"] for t in cell["tasks"].values()]
        assert all(0 <= a <= 1 for a in accs)
        assert cell["mc_accuracy"] == pytest.approx(np.mean(accs))
    dropless = whole["cells"][0]
    assert dropless["drop_rate"] == 0 and dropless["modelled_speedup"] == 1
    # a capacity factor of 1.0 on 4 x 16 tokens over 8 random experts must drop something
    assert whole["cells"][1]["drop_rate"] > 0 and whole["cells"][1]["tasks"] != {}

    tables = cs.markdown_tables(whole)
    assert "| random | " in tables and "gamma=1.0" in tables and "alpha: acc / acc_norm" in tables


def test_results_made_with_other_settings_are_refused(inputs, tmp_path):
    _sweep(inputs, tmp_path, ["none"], ["random"])
    with pytest.raises(ValueError, match="batch_size"):
        _sweep(inputs, tmp_path, ["none"], ["random"], settings=dict(SETTINGS, batch_size=8))


def test_task_examples_cap(inputs):
    _, _, tasks = inputs
    assert {name: len(examples) for name, examples in tasks.items()} == {"alpha": 4, "beta": 4}


@pytest.mark.parametrize("factor", ["0", "-1", "nan", "fast"])
def test_bad_factor_is_named(factor):
    with pytest.raises(ValueError, match=repr(factor)):
        cs.check_factors(["none", factor])


def test_bad_strategy_and_task_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="'bogus'"):
        cs.check_strategies(["score", "bogus"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cs.load_tasks([str(tmp_path / "missing.jsonl")], 10)
    with pytest.raises(ValueError, match="-1"):
        cs.load_tasks([], -1)


def test_authors_semantics_runs_every_cell_with_the_authors_preset(inputs, tmp_path):
    """config.authors_semantics: each capacity cell's policy is MoEPolicy.authors. The sweep's forwards are whole
    sequences (no decode step) and this OLMoE-shaped family does not normalise its top-k, so every number but
    the timings equals the default sweep's."""
    model, sequences, tasks = inputs
    factors, strategies = ["none", "1.0"], ["score", "expanded_local"]
    default = _sweep(inputs, tmp_path / "default", factors, strategies)
    authors = cs.run_sweep(model, sequences, tasks, ByteTokenizer(), str(tmp_path / "authors"), factors=factors,
                           strategies=strategies, settings=dict(SETTINGS, authors_semantics=True), num_devices=4,
                           batch_size=4, repeats=1, progress=False, authors=True)
    policies = [c["policy"] for c in authors["cells"]]
    assert policies == [repr(moejax.MoEPolicy()), repr(moejax.MoEPolicy.authors(1.0, "score")),
                        repr(moejax.MoEPolicy.authors(1.0, expanded="local", num_devices=4))]
    assert all("in_decode=False" in p for p in policies[1:])
    strip = lambda results: [{k: v for k, v in c.items() if k != "policy"} for c in _without_timing(results)]
    assert strip(authors) == strip(default)
    assert cs.policy_for("1.0", "score", 4) != cs.policy_for("1.0", "score", 4, authors=True)
    # the setting keeps the two kinds of results apart: a default sweep's results.json is not resumed under it
    with pytest.raises(ValueError, match="authors_semantics"):
        cs.run_sweep(model, sequences, tasks, ByteTokenizer(), str(tmp_path / "default"), factors=factors,
                     strategies=strategies, settings=dict(SETTINGS, authors_semantics=True), num_devices=4,
                     batch_size=4, repeats=1, progress=False, authors=True)



def test_a_cell_scores_lm_eval_tasks_and_records_what_the_policy_enforced():
    """config.lm_eval: every cell also runs lm-eval tasks through the moejax backend; the dropless cell's
    numbers equal the backend's own run, and a dropping cell's record shows its drops."""
    pytest.importorskip("lm_eval")
    from moejax.lm_eval_model import evaluate_tasks

    model = moejax.load_pretrained("experiments/default_model")
    tokenizer = moejax.load_tokenizer("experiments/default_model")
    lm_eval = dict(tasks=("moejax_next_word",), include_path="experiments/lm_eval_tasks", include_defaults=False,
                   limit=8)
    sequences = [list(range(1, 33))] * 8
    cells = {factor: cs.run_cell(model, sequences, {}, tokenizer, factor, strategy, num_devices=8, batch_size=8,
                                 repeats=1, lm_eval=lm_eval)
             for factor, strategy in (("none", "dropless"), ("0.5", "score"))}
    direct = evaluate_tasks(model, tokenizer, lm_eval["tasks"], include_path=lm_eval["include_path"],
                            include_defaults=False, batch_size=8, limit=8)
    assert cells["none"]["tasks"]["lm_eval/moejax_next_word"]["acc"] == direct["tasks"]["moejax_next_word"]["acc"]
    assert cells["none"]["mc_accuracy"] == direct["tasks"]["moejax_next_word"]["acc"]
    drop = {c: max(r["drop_rate"] for r in cells[c]["lm_eval"]["enforced"]["loads"]["moejax_next_word"].values())
            for c in cells}
    assert drop["none"] == 0 < drop["0.5"]
