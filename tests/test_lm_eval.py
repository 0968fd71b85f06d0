"""moejax as an lm-evaluation-harness model (moejax.lm_eval_model) on the committed default model and its local
tasks (experiments/lm_eval_tasks): against lm-eval's own Hugging Face backend (its outputs committed in
hf_reference.json, and rerun live on a few documents), a capacity policy through both moejax paths, expert
parallelism, the command line, and bad model args. Needs the eval extra (pip install -e .[test,eval])."""

import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

import moejax  # noqa: E402
from moejax import evaluation, lm_eval_model  # noqa: E402
from moejax.lm_eval_model import MoejaxLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "experiments", "lm_eval_tasks")
CHECKPOINT = "experiments/default_model"
MC_TASKS = ("moejax_next_word", "moejax_next_line")


def _load_make_tasks():
    spec = importlib.util.spec_from_file_location("make_tasks", os.path.join(TASKS, "make_tasks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tasks = _load_make_tasks()


@pytest.fixture(scope="module", autouse=True)
def from_the_repository_root():
    """The task YAMLs name their JSONL relative to the repository root (lm-eval reads data_files from the cwd)."""
    before = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(before)


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(TASKS, "hf_reference.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tasks_index():
    return make_tasks.task_manager(TASKS)


def assert_same_outputs(ours: dict, theirs: dict, documents: int | None = None, atol: float = 1e-4):
    """Per task: identical acc / acc_norm / exact_match (when all documents ran), every log-likelihood (a
    choice's, a whole document's over its rolling windows) within atol, the same is_greedy, identical text."""
    assert set(ours) == set(theirs)
    for task, mine in ours.items():
        ref = theirs[task]
        if documents is None:
            for metric in ("acc", "acc_norm", "exact_match"):
                if metric in ref["metrics"]:
                    assert mine["metrics"][metric] == ref["metrics"][metric], (task, metric)
            for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                if metric in ref["metrics"]:
                    assert math.isclose(mine["metrics"][metric], ref["metrics"][metric], rel_tol=1e-5), (task, metric)
        responses = ref["responses"][:documents]
        assert len(mine["responses"]) == len(responses), task
        for doc, (a, b) in enumerate(zip(mine["responses"], responses)):
            for x, y in zip(a, b):
                if isinstance(y, str):
                    assert x == y, (task, doc)
                elif isinstance(y, list):
                    assert abs(x[0] - y[0]) <= atol and x[1] == y[1], (task, doc, x, y)
                else:
                    assert abs(x - y) <= atol, (task, doc, x, y)


# ---------------------------------------------------------------------------------------------------------
# Against lm-eval's hf backend


@pytest.mark.slow
def test_moejax_serves_lm_eval_as_its_hf_backend_does(reference):
    """Every request of the four local tasks (multiple choice, rolling perplexity, greedy generation), at
    the model's 512 positions and with max_length=128 (contexts, prompts and rolling windows cut from the
    left): the committed hf outputs, acc / acc_norm equal, log-likelihoods within 1e-4, the same text."""
    ours = make_tasks.reference_runs("moejax", f"pretrained={CHECKPOINT}", TASKS, batch_size=16)
    assert set(ours) == set(reference["runs"])
    for run in ours:
        assert_same_outputs(ours[run], reference["runs"][run])
    truncated = reference["runs"]["max_length_128"]["moejax_next_word"]["responses"]
    assert truncated != reference["runs"]["default"]["moejax_next_word"]["responses"][:len(truncated)]


@pytest.mark.slow
def test_committed_reference_is_what_lm_eval_hf_computes(reference):
    """The first documents of each task, rerun with lm-eval's hf backend now."""
    pytest.importorskip("accelerate", reason="lm-eval's hf backend imports accelerate (not in the test extra)")
    import lm_eval

    assert reference["versions"]["lm_eval"] == lm_eval.__version__
    live = make_tasks.reference_runs("hf", reference["model_args"], TASKS, limit=2, runs=("default",))
    assert_same_outputs(live["default"], reference["runs"]["default"], documents=2, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# A capacity policy, one device and expert-parallel


@pytest.mark.slow
def test_capacity_policy_gives_the_numbers_of_moejax_evaluation(reference):
    """With capacity-aware drop, the lm-eval path and moejax.evaluation.score_multiple_choice (same
    requests, same batch size) agree exactly, and the run records the drop it enforced."""
    task = MC_TASKS[0]
    model = moejax.load_pretrained(CHECKPOINT, policy=moejax.MoEPolicy(capacity_factor=1.0, drop="score"))
    tokenizer = moejax.load_tokenizer(CHECKPOINT)
    out = lm_eval_model.evaluate_tasks(model, tokenizer, [task], include_path=TASKS, include_defaults=False,
                                       batch_size=16)
    assert out["moejax"]["policy"]["capacity_factor"] == 1.0
    encode_pair = MoejaxLM.for_model(model, tokenizer)._encode_pair
    examples = evaluation.read_multiple_choice(os.path.join(TASKS, f"{task}.jsonl"))
    direct = evaluation.score_multiple_choice(model, tokenizer, examples, batch_size=16, encode_pair=encode_pair)
    assert (out["tasks"][task]["acc"], out["tasks"][task]["acc_norm"]) == (direct["acc"], direct["acc_norm"])
    requests = [encode_pair(e.context, c) for e in examples for c in e.choices]
    dropping = evaluation.score_continuations(model, requests, batch_size=16, with_loads=True)
    dropless = [ll for doc in reference["runs"]["default"][task]["responses"] for ll, _ in doc]
    assert not np.allclose(dropping.log_likelihoods, dropless, atol=1e-3)  # the policy acted
    record = out["moejax"]["loads"][task]["loglikelihood"]
    assert record["requests"] == len(requests)
    routed = sum(l.routed.sum() for l in dropping.loads.values())
    kept = sum(l.kept_of_routed.sum() for l in dropping.loads.values())
    assert 0 < record["drop_rate"] == pytest.approx(1 - kept / routed, abs=1e-12)
    for layer, l in dropping.loads.items():
        assert record["layers"][str(layer)]["kept"] == l.kept.tolist()
        assert sum(record["layers"][str(layer)]["routed"]) == l.tokens * model.config.num_experts_per_tok


@pytest.mark.slow
def test_expert_parallel_model_matches_the_reference(reference, tasks_index):
    """mesh=2x4 (data x expert, dynamic gating: dropless) on the 8 host devices."""
    ours = make_tasks.run_lm_eval("moejax", f"pretrained={CHECKPOINT},mesh=2x4", MC_TASKS[:1], tasks_index,
                                  batch_size=8, limit=4)
    assert_same_outputs(ours, {MC_TASKS[0]: reference["runs"]["default"][MC_TASKS[0]]}, documents=4)


@pytest.mark.slow
def test_generation_stops_early_without_changing_the_text():
    """A row stops at the first token whose text holds a stop sequence; the text equals generating every
    token and cutting at the stop sequences (sequences over several tokens included)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.utils import postprocess_generated_text

    lm = MoejaxLM(pretrained=CHECKPOINT, batch_size=8)
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(TASKS, "moejax_complete_line.jsonl"))][:5]
    until = ["(", "s ", "\n"]
    kwargs = {"until": until, "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, kwargs), 0, ("t", i, 1)) for i, p in enumerate(prompts)]
    texts = lm.generate_until(requests)
    full = moejax.generate(lm.model, [lm.tok_encode(p) for p in prompts], 12)
    expected = []
    for row in np.asarray(full).tolist():
        row = row[:row.index(lm.eot_token_id)] if lm.eot_token_id in row else row
        expected.append(postprocess_generated_text(lm.tok_decode(row), until + ["<|endoftext|>"], None))
    assert texts == expected
    assert lm.loads["t"]["generate_until"]["requests"] == 5


# ---------------------------------------------------------------------------------------------------------
# Entry points, records and bad input


def test_moejax_is_a_model_name_in_lm_evals_registry():
    from lm_eval.api.registry import get_model

    assert get_model("moejax") is MoejaxLM


@pytest.mark.slow
def test_command_line_runs_and_records_the_enforced_drop(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "moejax.lm_eval_model", "--model_args",
           f"pretrained={CHECKPOINT},capacity_factor=1.5,drop=score,batch_size=4", "--include_path", TASKS,
           "--tasks", "moejax_next_word", "--limit", "3", "--output_path", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "moejax_next_word" in done.stdout
    (path,) = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    with open(path) as f:
        config = json.load(f)["config"]["moejax"]
    assert config["policy"]["capacity_factor"] == 1.5 and config["batch_size"] == 4
    record = config["loads"]["moejax_next_word"]["loglikelihood"]
    assert record["requests"] == 12 and 0 <= record["drop_rate"] < 1 and len(record["layers"]) == 3


def _create(args: str):
    from lm_eval.api.registry import get_model

    return get_model("moejax").create_from_arg_string(args, {"batch_size": 1, "max_batch_size": None, "device": None})


@pytest.mark.parametrize("args, error", [
    ("capacity=1.5", "unknown argument 'capacity'"),
    ("drop=scor,capacity_factor=1", "unknown drop strategy 'scor'"),
    ("capacity_factor=0", "capacity_factor=0 must be > 0"),
    ("capacity_factor=abc", "capacity_factor='abc' must be > 0"),
    ("expanded=locl,capacity_factor=1", "unknown expanded mode 'locl'"),
    ("scope=device", "needs a capacity_factor"),
    ("in_decode=maybe", "in_decode='maybe' must be true or false"),
    ("num_devices=0", "num_devices=0 must be an integer >= 1"),
    ("batch_size=auto", "batch_size='auto' must be an integer >= 1"),
    ("mesh=2y4", "mesh='2y4' must be E"),
    ("mesh=3", "mesh=3: a mesh of data=1 x expert=3 needs 3 devices"),
    ("gating=static", "gating='static' applies to expert parallelism and needs a mesh"),
    ("dtype=int8", "dtype='int8' must be a floating-point dtype"),
    ("prefix_token_id=100000", "prefix_token_id=100000 must be a token id in"),
])
def test_bad_model_args_fail_naming_the_value(args, error):
    with pytest.raises(ValueError, match="moejax model_args: .*" + error.replace("(", r"\(").replace(")", r"\)")):
        _create(f"pretrained={CHECKPOINT},{args}")


def test_empty_contexts_start_from_the_tokenizers_bos_as_in_the_hf_backend(tmp_path):
    """tokenizer_config.json's bos_token, not config.json's bos_token_id (here they differ), starts an empty
    context and a rolling window, as in lm-eval's hf backend; prefix_token_id= overrides both alike."""
    pytest.importorskip("accelerate", reason="lm-eval's hf backend imports accelerate (not in the test extra)")
    import shutil

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    path = tmp_path / "ck"
    shutil.copytree(os.path.join(ROOT, CHECKPOINT), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "bos_token_id": 1}))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    requests = [Instance("loglikelihood_rolling", {}, ("import os\nprint(os.sep)\n",), 0, ("t", 0, 1)),
                Instance("loglikelihood", {}, ("", "import os"), 1, ("t", 1, 1))]
    for extra in ({}, {"prefix_token_id": 7}):
        ours = MoejaxLM(pretrained=str(path), batch_size=2, **extra)
        theirs = HFLM(pretrained=str(path), dtype="float32", batch_size=2, device="cpu", **extra)
        assert ours.prefix_token_id == theirs.prefix_token_id == extra.get("prefix_token_id", 0)
        assert ours.eot_token_id == theirs.eot_token_id == 0
        np.testing.assert_allclose(ours.loglikelihood_rolling(requests[:1]), theirs.loglikelihood_rolling(requests[:1]),
                                   atol=1e-4)
        np.testing.assert_allclose([ll for ll, _ in ours.loglikelihood(requests[1:])],
                                   [ll for ll, _ in theirs.loglikelihood(requests[1:])], atol=1e-4)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<not a token>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token='<not a token>' is not a token"):
        MoejaxLM(pretrained=str(path))


def test_missing_checkpoint_and_missing_pretrained_fail_through_lm_eval(tmp_path, tasks_index):
    import lm_eval

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"pretrained='{missing}': checkpoint directory") + ".* does not exist"):
        lm_eval.simple_evaluate(model="moejax", model_args=f"pretrained={missing}", tasks=[MC_TASKS[0]],
                                task_manager=tasks_index)
    with pytest.raises(ValueError, match="pretrained=PATH .* is required"):
        _create("dtype=float32")
    (tmp_path / "no_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(ROOT, CHECKPOINT, name), tmp_path / "no_tokenizer" / name)
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        _create(f"pretrained={tmp_path / 'no_tokenizer'}")


def test_model_args_batch_size_wins_over_the_command_lines_default():
    assert _create(f"pretrained={CHECKPOINT},batch_size=4").batch_size == 4
    assert _create(f"pretrained={CHECKPOINT}").batch_size == 1  # lm-eval's --batch_size default


def test_unsupported_generation_kwargs_are_refused():
    from lm_eval.api.instance import Instance

    lm = _create(f"pretrained={CHECKPOINT}")
    request = Instance("generate_until", {}, ("x = ", {"until": ["\n"], "top_k": 5}), 0, ("t", 0, 1))
    with pytest.raises(ValueError, match=r"generation kwargs \['top_k'\] are not supported"):
        lm.generate_until([request])


def test_committed_task_files_are_what_make_tasks_writes(tmp_path):
    make_tasks.main(["--out", str(tmp_path), "--documents", "1"])
    for name in ("moejax_next_word", "moejax_next_line", "moejax_complete_line"):
        for suffix in (".jsonl", ".yaml"):
            mine, committed = (open(os.path.join(d, name + suffix), encoding="utf-8").read()
                               for d in (str(tmp_path), TASKS))
            assert mine.replace(str(tmp_path), "experiments/lm_eval_tasks") == committed, name + suffix
