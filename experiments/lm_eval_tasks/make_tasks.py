"""Write lm-evaluation-harness tasks made from a checkpoint's held-out text: local YAML + JSONL, no network.

    python experiments/lm_eval_tasks/make_tasks.py        # this directory, for experiments/default_model
    python experiments/lm_eval_tasks/make_tasks.py --source=WORKDIR --out=DIR --corpus=/data/text --prefix=mine

--source is a directory that experiments/evaluate.py wrote (its next_word.jsonl and next_line.jsonl: held-out
continuation tasks, choices from other test documents); --corpus and its split fractions are the ones the
checkpoint trained with (the rolling-perplexity documents come from its test split). Four tasks, all tagged
PREFIX_tasks:

    PREFIX_next_word      multiple_choice          the next identifier (acc, acc_norm)
    PREFIX_next_line      multiple_choice          the next line (acc, acc_norm)
    PREFIX_complete_line  generate_until "\\n"      the rest of a line after its indentation (exact_match)
    PREFIX_heldout_text   loglikelihood_rolling    whole test documents (word / byte perplexity, bits per byte)

lm-eval's `dataset_path: json` resolves `data_files` from the working directory, so the YAMLs name their JSONL
relative to the repository root when --out is inside it (absolute otherwise): run lm-eval from the root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from moejax import data, evaluation  # noqa: E402

MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _data_path(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def write_task(out: str, name: str, records: list[dict], config: dict) -> None:
    """out/NAME.jsonl with the records and out/NAME.yaml: an lm-eval task reading it as its test split."""
    jsonl = os.path.join(out, f"{name}.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": _data_path(jsonl)}},
            "test_split": "test", **config, "metadata": {"version": 1.0}}
    with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(task, f, sort_keys=False, allow_unicode=True, width=120)


def multiple_choice(examples: list[evaluation.MultipleChoice], tag: str) -> tuple[list[dict], dict]:
    """The choices carry their own leading space or newline, so the target delimiter is empty; acc_norm
    divides by each choice's length in characters, as moejax.evaluation.score_multiple_choice does."""
    records = [{"context": e.context, "choices": list(e.choices), "gold": e.gold} for e in examples]
    return records, {"tag": [tag], "output_type": "multiple_choice", "doc_to_text": "context",
                     "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": "",
                     "metric_list": MC_METRICS}


def complete_line(examples: list[evaluation.MultipleChoice], tag: str, max_gen_toks: int) -> tuple[list[dict], dict]:
    """From next-line examples: the prompt is the context, the newline and the gold line's indentation; the
    target is the rest of that line, generated greedily until the next newline."""
    records = []
    for e in examples:
        line = e.choices[e.gold][1:]  # the gold choice is "\n" + line
        indent = line[:len(line) - len(line.lstrip())]
        records.append({"prompt": e.context + "\n" + indent, "target": line.strip()})
    return records, {"tag": [tag], "output_type": "generate_until", "doc_to_text": "prompt",
                     "doc_to_target": "target", "target_delimiter": "",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
                     "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


def heldout_text(documents: list[data.Document], tag: str, chars: int) -> tuple[list[dict], dict]:
    """Each document's first `chars` characters, cut at the end of a line."""
    records = []
    for d in documents:
        text = d.text if len(d.text) <= chars else d.text[:d.text.rfind("\n", 0, chars) + 1]
        if text.strip():
            records.append({"name": d.name, "text": text})
    return records, {"tag": [tag], "output_type": "loglikelihood_rolling", "doc_to_text": "",
                     "doc_to_target": "text",
                     "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}


# ---------------------------------------------------------------------------------------------------------
# lm-eval's own Hugging Face backend on these tasks: the reference the moejax backend is tested against


# (run, model_args after pretrained and dtype, tasks, limit, hf batch size). The hf backend generates one prompt
# at a time: its left padding uses the tokenizer's pad id 2048, outside this model's 2048-token embedding.
REFERENCE_CALLS = (
    ("default", "", ("moejax_next_word", "moejax_next_line", "moejax_heldout_text"), None, 8),
    ("default", "", ("moejax_complete_line",), None, 1),
    ("max_length_128", ",max_length=128", ("moejax_next_word", "moejax_heldout_text"), 20, 8),
    ("max_length_128", ",max_length=128", ("moejax_complete_line",), 8, 1),
)


def task_manager(include_path: str):
    """lm-eval's task index of the YAMLs in include_path alone (indexing its built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=False)


def run_lm_eval(model: str, model_args: str, tasks, tasks_index, batch_size: int, limit=None) -> dict:
    """{task: {"metrics": {name: value}, "responses": [each document's requests' responses, by doc_id]}} of
    one lm_eval.simple_evaluate call (log-likelihoods as [value, is_greedy], generations as text)."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit,
                                      task_manager=tasks_index, batch_size=batch_size,
                                      device="cpu" if model == "hf" else None, log_samples=True, bootstrap_iters=0)
    out = {}
    for task in tasks:
        samples = sorted(results["samples"][task], key=lambda x: x["doc_id"])
        out[task] = {"metrics": {k.removesuffix(",none"): float(v) for k, v in results["results"][task].items()
                                 if k.endswith(",none") and "_stderr" not in k},
                     "responses": [json.loads(json.dumps(x["filtered_resps"], default=float)) for x in samples]}
    return out


def reference_runs(model: str, model_args: str, include_path: str, batch_size: int | None = None, limit=None,
                   runs=None) -> dict:
    """{run: {task: run_lm_eval's record}} over REFERENCE_CALLS (or those of `runs`); batch_size None: the hf
    batch sizes there; limit: at most this many documents per task."""
    out, index = {}, task_manager(include_path)
    for run, extra, tasks, call_limit, hf_batch in REFERENCE_CALLS:
        if runs is None or run in runs:
            limits = [x for x in (call_limit, limit) if x is not None]
            out.setdefault(run, {}).update(run_lm_eval(model, model_args + extra, tasks, index,
                                                       batch_size or hf_batch, min(limits) if limits else None))
    return out


def write_hf_reference(out: str, checkpoint: str) -> None:
    import lm_eval
    import torch
    import transformers

    args = f"pretrained={checkpoint},dtype=float32"
    reference = {"command": "python experiments/lm_eval_tasks/make_tasks.py --hf_reference",
                 "model_args": args, "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__,
                                                  "transformers": transformers.__version__},
                 "calls": [list(c) for c in REFERENCE_CALLS], "runs": reference_runs("hf", args, out)}
    with open(os.path.join(out, "hf_reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=os.path.join(ROOT, "experiments/results/default_model"),
                   help="experiments/evaluate.py's workdir: next_word.jsonl, next_line.jsonl")
    p.add_argument("--out", default=here)
    p.add_argument("--corpus", default="stdlib", help="moejax.data.load_documents source of the held-out documents")
    p.add_argument("--validation_fraction", type=float, default=0.05)
    p.add_argument("--test_fraction", type=float, default=0.05)
    p.add_argument("--prefix", default="moejax")
    p.add_argument("--examples", type=int, default=40, help="multiple-choice examples per task")
    p.add_argument("--generation_examples", type=int, default=16)
    p.add_argument("--max_gen_toks", type=int, default=24)
    p.add_argument("--documents", type=int, default=6)
    p.add_argument("--document_chars", type=int, default=2500)
    p.add_argument("--hf_reference", action="store_true",
                   help="only (re)write OUT/hf_reference.json: lm-eval's hf backend on the tasks in OUT")
    p.add_argument("--checkpoint", default="experiments/default_model", help="the --hf_reference checkpoint")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.hf_reference:  # the YAMLs' data_files are relative to the repository root
        out = os.path.abspath(a.out)
        os.chdir(ROOT)
        write_hf_reference(out, a.checkpoint)
        return
    tag = f"{a.prefix}_tasks"
    sources = {unit: evaluation.read_multiple_choice(os.path.join(a.source, f"next_{unit}.jsonl"))
               for unit in ("word", "line")}
    test = data.split_documents(data.load_documents(a.corpus), a.validation_fraction, a.test_fraction)["test"]
    tasks = {"next_word": multiple_choice(sources["word"][:a.examples], tag),
             "next_line": multiple_choice(sources["line"][:a.examples], tag),
             "complete_line": complete_line(sources["line"][:a.generation_examples], tag, a.max_gen_toks),
             "heldout_text": heldout_text(test[:a.documents], tag, a.document_chars)}
    for name, (records, config) in tasks.items():
        write_task(a.out, f"{a.prefix}_{name}", records, config)
        print(f"{a.prefix}_{name}: {len(records)} documents")


if __name__ == "__main__":
    main()
