"""Evaluate a checkpoint on a text corpus: perplexity against a unigram baseline, multiple-choice accuracy,
and how unevenly its experts are loaded in prefill and in decode (the reproduction's straggler stage).

    python experiments/evaluate.py --workdir=experiments/results/default_model
    python experiments/evaluate.py --config=configs/evaluate.py:quick --config.checkpoint=DIR --workdir=DIR2

Any checkpoint that moejax.load_pretrained reads and that has a tokenizer.json works. The corpus and its
split are the config's corpus (configs/evaluate.py: the ones the default model trained with), so the
validation and test documents are the ones training never saw. Writes results.json (incrementally,
atomically: a rerun with the same config resumes after the last finished step) and README.md to --workdir,
and the held-out continuation tasks it built (next word, next line; choices drawn from other test
documents) as JSONL files.
"""

from __future__ import annotations

import os
import time

import harness


def main(config, workdir):
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np
    from flax import nnx

    import moejax
    from moejax import data, evaluation
    from moejax.results import Results

    model = moejax.load_pretrained(config.checkpoint)
    tokenizer = moejax.load_tokenizer(config.checkpoint)
    if tokenizer is None:
        raise ValueError(f"checkpoint {config.checkpoint!r} has no tokenizer.json to read the corpus with")
    # the checkpoint's files too: one retrained to the same path starts over instead of keeping old numbers
    results = Results(workdir, settings={**config.to_dict(), "checkpoint_files": harness.checkpoint_identity(
        config.checkpoint)}, on_mismatch="restart")
    r = results.data
    r.update(checkpoint=config.checkpoint, corpus=config.corpus.source, **harness.header())
    c = model.config
    r["model"] = {"architecture": c.architecture, "layers": c.num_layers, "hidden_size": c.hidden_size,
                  "experts": c.num_experts, "top_k": c.num_experts_per_tok, "vocab_size": c.vocab_size,
                  "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model))))}
    splits = harness.corpus_splits(config.corpus)
    streams = {s: data.document_stream(tokenizer, splits[s]) for s in ("train", "validation")}
    r["corpus_tokens"] = {s: int(len(v)) for s, v in streams.items()}
    r["corpus_documents"] = {s: len(v) for s, v in splits.items()}
    sequences = data.chunks(streams["validation"], config.length, config.max_sequences or None)

    if "validation" not in r:
        start = time.perf_counter()
        ppl = evaluation.perplexity(model, sequences, batch_size=config.batch_size)
        unigram = data.unigram_perplexity(data.unigram_log_probs(streams["train"], c.vocab_size), sequences)
        r["validation"] = {"perplexity": ppl, "unigram_perplexity": unigram, "sequences": len(sequences),
                           "tokens_scored": int(sum(len(s) - 1 for s in sequences)),
                           "sequence_length": config.length, "batch_size": config.batch_size,
                           "seconds": time.perf_counter() - start}
        results.save()
    v = r["validation"]
    print(f"validation perplexity {v['perplexity']:.2f} (unigram {v['unigram_perplexity']:.2f}) over "
          f"{v['sequences']} sequences")

    tasks = {}
    for unit in evaluation.CONTINUATION_UNITS:  # held out: built from the test split
        name = f"next_{unit}"
        tasks[name] = evaluation.continuation_task([d.text for d in splits["test"]], config.examples,
                                                   config.choices, seed=0, unit=unit)
        evaluation.write_multiple_choice(tasks[name], os.path.join(workdir, f"{name}.jsonl"))
    tasks.update({os.path.basename(p): evaluation.read_multiple_choice(p) for p in config.tasks})
    scored = r.setdefault("multiple_choice", {})
    for name, examples in tasks.items():
        if name not in scored:
            start = time.perf_counter()
            scored[name] = evaluation.score_multiple_choice(model, tokenizer, examples, batch_size=16)
            scored[name]["seconds"] = time.perf_counter() - start
            results.save()
        s = scored[name]
        print(f"{name}: acc {s['acc']:.3f}, acc_norm {s['acc_norm']:.3f} (chance {s['chance']:.3f}, "
              f"{s['examples']} examples)")

    if "prefill_routing" not in r:
        r["prefill_routing"] = evaluation.prefill_loads(model, sequences, batch_size=config.batch_size)
        results.save()
    prefill = r["prefill_routing"]
    for layer, total, batch in zip(prefill["layers"], prefill["max_over_mean"], prefill["batch_max_over_mean"]):
        print(f"layer {layer}: max/mean expert load {total:.2f} over the corpus, {batch:.2f} per batch of "
              f"{config.batch_size} x {config.length} tokens")
    if "decode_routing" not in r:
        rng = np.random.default_rng(0)
        picks = rng.choice(len(sequences), size=min(config.decode_prompts, len(sequences)), replace=False)
        prompts = [sequences[i][:32].tolist() for i in sorted(picks)]
        # every step runs (no stop token): idle experts are the router's, not those of rows that finished
        r["decode_routing"] = evaluation.decode_loads(model, prompts, config.decode_steps, stop_tokens=())
        results.save()
    decode = r["decode_routing"]
    for layer, idle, mom in zip(decode["layers"], decode["idle_fraction"], decode["step_max_over_mean"]):
        print(f"layer {layer}: decode step of {decode['batch_size']} tokens leaves {idle:.1%} of experts idle; "
              f"max/mean load {mom:.2f}")
    _write_readme(workdir, r)


def _write_readme(workdir: str, r: dict) -> None:
    v = r["validation"]
    lines = [f"# Evaluation of `{r['checkpoint']}`", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {harness.describe(r['machine'])}. Corpus: `{r['corpus']}` (the standard library's source "
             "differs between Python versions: these numbers are for this one).", "",
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


def report_section(r: dict) -> list[str]:
    """The reproduction report's straggler section."""
    pre, dec = r["prefill_routing"], r["decode_routing"]
    lines = ["## Straggler effect (He et al., papers.md A)", "",
             f"Model quality first: validation perplexity {r['validation']['perplexity']:.2f} "
             f"(unigram {r['validation']['unigram_perplexity']:.1f}); multiple choice "
             + ", ".join(f"{name} acc {t['acc']:.3f} (chance {t['chance']:.3f})"
                         for name, t in r["multiple_choice"].items()) + ".", "",
             f"Busiest expert's load over the mean load (N_e / N_bar) per MoE layer; {harness.PAPERS['straggler']}.",
             "", "| layer | whole split | worst prefill batch | worst decode step | experts idle per decode step |",
             "|---|---|---|---|---|"]
    for i, layer in enumerate(pre["layers"]):
        lines.append(f"| {layer} | {pre['max_over_mean'][i]:.2f} | {pre['batch_max_over_mean'][i]:.2f} | "
                     f"{dec['step_max_over_mean'][i]:.2f} | {dec['idle_fraction'][i]:.1%} |")
    lines.append(f"\nPrefill batches of {pre['batch_size']} sequences; decode: {dec['batch_size']} prompts, "
                 f"{dec['steps']} greedy steps.")
    return lines


if __name__ == "__main__":
    harness.run(main, workdir="experiments/results/default_model")
