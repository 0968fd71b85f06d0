"""Evaluate a checkpoint on a text corpus: perplexity against a unigram baseline, multiple-choice accuracy,
and how unevenly its experts are loaded in prefill and in decode.

    python experiments/evaluate.py --checkpoint=experiments/default_model --workdir=experiments/results/default_model

Any checkpoint that moejax.load_pretrained reads and that has a tokenizer.json works. The corpus and its
split come from the training config (--config, default configs/train_default.py), so the validation and
test documents are the ones training never saw. Writes results.json (incrementally, atomically) and
README.md to --workdir, and the held-out continuation tasks it built (next word, next line; choices drawn
from other test documents) as JSONL files.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_default.py", "The corpus and split settings.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "experiments/default_model", "Checkpoint directory.")
_WORKDIR = flags.DEFINE_string("workdir", "experiments/results/default_model", "Where results are written.")
_LENGTH = flags.DEFINE_integer("length", 256, "Tokens per perplexity / routing sequence.")
_MAX_SEQUENCES = flags.DEFINE_integer("max_sequences", 0, "Cap on validation sequences (0: all).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per evaluation batch.")
_EXAMPLES = flags.DEFINE_integer("examples", 500, "Examples in the held-out continuation task.")
_CHOICES = flags.DEFINE_integer("choices", 4, "Choices per continuation example.")
_TASKS = flags.DEFINE_multi_string("task", [], "More lm-eval style JSONL tasks ({context, choices, gold}).")
_DECODE_PROMPTS = flags.DEFINE_integer("decode_prompts", 16, "Prompts decoded together for decode routing.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 32, "Greedy decode steps recorded.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np
    from flax import nnx

    import moejax
    from moejax.results import write_json_atomically
    from moejax import data, evaluation

    config, workdir = _CONFIG.value, _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    results_path = os.path.join(workdir, "results.json")
    results = {
        "checkpoint": _CHECKPOINT.value, "corpus": config.corpus,
        "command": " ".join(["python"] + sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "jax": jax.__version__, "backend": jax.default_backend()},
    }
    model = moejax.load_pretrained(_CHECKPOINT.value)
    tokenizer = moejax.load_tokenizer(_CHECKPOINT.value)
    if tokenizer is None:
        raise ValueError(f"checkpoint {_CHECKPOINT.value!r} has no tokenizer.json to read the corpus with")
    c = model.config
    results["model"] = {"architecture": c.architecture, "layers": c.num_layers, "hidden_size": c.hidden_size,
                        "experts": c.num_experts, "top_k": c.num_experts_per_tok, "vocab_size": c.vocab_size,
                        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model))))}

    documents = data.load_documents(config.corpus)
    splits = data.split_documents(documents, config.validation_fraction, config.test_fraction)
    separator = tokenizer.token_to_id(data.END_OF_DOCUMENT)
    separator = separator if separator is not None else 0
    streams = {s: data.token_stream(data.encode_documents(tokenizer, splits[s]), separator)
               for s in ("train", "validation")}
    results["corpus_tokens"] = {s: int(len(v)) for s, v in streams.items()}
    results["corpus_documents"] = {s: len(v) for s, v in splits.items()}
    sequences = data.chunks(streams["validation"], _LENGTH.value, _MAX_SEQUENCES.value or None)

    start = time.perf_counter()
    ppl = evaluation.perplexity(model, sequences, batch_size=_BATCH.value)
    unigram = data.unigram_perplexity(data.unigram_log_probs(streams["train"], c.vocab_size), sequences)
    results["validation"] = {"perplexity": ppl, "unigram_perplexity": unigram, "sequences": len(sequences),
                             "tokens_scored": int(sum(len(s) - 1 for s in sequences)), "sequence_length": _LENGTH.value,
                             "batch_size": _BATCH.value, "seconds": time.perf_counter() - start}
    print(f"validation perplexity {ppl:.2f} (unigram {unigram:.2f}) over {len(sequences)} sequences")
    write_json_atomically(results_path, results)

    tasks = {}
    for unit in evaluation.CONTINUATION_UNITS:  # held out: built from the test split
        name = f"next_{unit}"
        tasks[name] = evaluation.continuation_task([d.text for d in splits["test"]], _EXAMPLES.value, _CHOICES.value,
                                                   seed=0, unit=unit)
        evaluation.write_multiple_choice(tasks[name], os.path.join(workdir, f"{name}.jsonl"))
    tasks.update({os.path.basename(p): evaluation.read_multiple_choice(p) for p in _TASKS.value})
    results["multiple_choice"] = {}
    for name, examples in tasks.items():
        start = time.perf_counter()
        scores = evaluation.score_multiple_choice(model, tokenizer, examples, batch_size=16)
        scores["seconds"] = time.perf_counter() - start
        results["multiple_choice"][name] = scores
        print(f"{name}: acc {scores['acc']:.3f}, acc_norm {scores['acc_norm']:.3f} (chance {scores['chance']:.3f}, "
              f"{scores['examples']} examples)")
        write_json_atomically(results_path, results)

    prefill = evaluation.prefill_loads(model, sequences, batch_size=_BATCH.value)
    results["prefill_routing"] = prefill
    for layer, total, batch in zip(prefill["layers"], prefill["max_over_mean"], prefill["batch_max_over_mean"]):
        print(f"layer {layer}: max/mean expert load {total:.2f} over the corpus, {batch:.2f} per batch of "
              f"{_BATCH.value} x {_LENGTH.value} tokens")
    rng = np.random.default_rng(0)
    picks = rng.choice(len(sequences), size=min(_DECODE_PROMPTS.value, len(sequences)), replace=False)
    prompts = [sequences[i][:32].tolist() for i in sorted(picks)]
    decode = evaluation.decode_loads(model, prompts, _DECODE_STEPS.value)
    results["decode_routing"] = decode
    for layer, idle, mom in zip(decode["layers"], decode["idle_fraction"], decode["step_max_over_mean"]):
        print(f"layer {layer}: decode step of {len(prompts)} tokens leaves {idle:.1%} of experts idle; "
              f"max/mean load {mom:.2f}")
    write_json_atomically(results_path, results)
    _write_readme(workdir, results)


def _write_readme(workdir: str, r: dict) -> None:
    v = r["validation"]
    lines = [f"# Evaluation of `{r['checkpoint']}`", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs; Python {r['machine']['python']}, "
             f"JAX {r['machine']['jax']} ({r['machine']['backend']}). Corpus: `{r['corpus']}` (the standard "
             "library's source differs between Python versions: these numbers are for this one).", "",
             f"Corpus tokens: {r['corpus_tokens']}; documents: {r['corpus_documents']}.", "",
             "| metric | value |", "|---|---|",
             f"| validation perplexity ({v['sequences']} x {v['sequence_length']} tokens) | {v['perplexity']:.2f} |",
             f"| unigram baseline perplexity (add-one, train split) | {v['unigram_perplexity']:.2f} |"]
    for name, s in r["multiple_choice"].items():
        lines.append(f"| {name}: acc / acc_norm / chance ({s['examples']} examples) | "
                     f"{s['acc']:.3f} / {s['acc_norm']:.3f} / {s['chance']:.3f} |")
    p, d = r["prefill_routing"], r["decode_routing"]
    lines += ["", "Routing (routed pairs per expert; max/mean = 1 is perfectly balanced):", "",
              "| layer | max/mean, whole validation set | max/mean per prefill batch "
              f"({p['batch_size']} seqs) | idle experts per decode step ({d['batch_size']} tokens) | "
              "max/mean per decode step |", "|---|---|---|---|---|"]
    for i, layer in enumerate(p["layers"]):
        lines.append(f"| {layer} | {p['max_over_mean'][i]:.2f} | {p['batch_max_over_mean'][i]:.2f} | "
                     f"{d['idle_fraction'][i]:.1%} | {d['step_max_over_mean'][i]:.2f} |")
    with open(os.path.join(workdir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
