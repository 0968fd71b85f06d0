"""Capacity-aware inference sweep (papers.md A): capacity factor x drop strategy -> quality, loads, speed.

Per cell: perplexity on held-out validation text (the config's corpus split by document as moejax.data
splits it, tokenised with the checkpoint's tokenizer), lm-eval style multiple-choice accuracy on the config's
tasks, drop rate, tokens that lost every expert, max/mean load of the experts after the policy, the modelled
MoE-layer speedup under expert parallelism (a layer waits for its busiest device) and the measured one: the
time of the busiest device's expert work at the loads the router asked for (what dropless computes) over
that at the loads the policy leaves, timed side by side in the cell (this CPU has no real 8-device mesh to
time per device).

results.json is written after every cell (a rerun with the same settings skips finished cells; one with
other settings is refused rather than mixed), then plot.png (perplexity and MC accuracy against measured
speedup) and README.md (the tables of markdown_tables, the machine and the command). Settings: configs/
capacity_sweep.py; --config.authors_semantics=True runs every cell with moejax.MoEPolicy.authors, the
semantics of the paper authors' code.

  python experiments/capacity_sweep.py --config.sequences=64
"""

from __future__ import annotations

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import harness
import moejax
from moejax import evaluation, placement, stats
from moejax.generate import pad_prompts
from moejax.kernels import grouped_ffn
from moejax.kernels.base import stacked
from moejax.results import Results

STRATEGIES = ("score", "first", "last", "random", "expanded_local", "expanded_global")
PAPER_FACTORS = ("2.0", "1.5", "1.0")  # the capacity factors of the papers' speedups (harness.CAPACITY_SPEEDUP)
# The built-in model when the checkpoint is empty (and the tests' tiny model): OLMoE-shaped, random weights.
RANDOM_MODEL = dict(architecture="olmoe", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=32, qk_norm=True, moe_layers=(True, True), num_experts=32,
                    num_experts_per_tok=4, moe_intermediate_size=64)
TIMING_KEYS = ("busiest_device_seconds", "routed_busiest_device_seconds", "measured_speedup", "seconds")  # differ run to run
HAND_WRITTEN = "<!-- Everything below this line is written by hand and kept when the README is regenerated. -->"
REPORT_PLOT = "quality against measured speedup per strategy"


# ---------------------------------------------------------------------------------------------------------
# Inputs


def check_factors(factors) -> list[str]:
    """The capacity factors as cell keys (a number's str, e.g. "1.5"; "none", the dropless reference that always
    runs, may be listed), duplicates removed; one that is not a finite number > 0 fails naming it."""
    out = []
    for f in factors:
        key = f.strip() if isinstance(f, str) else f
        if key != "none":
            try:
                value = float(key)
            except (TypeError, ValueError):
                raise ValueError(f"capacity factor {f!r} is neither 'none' nor a number") from None
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"capacity factor {f!r} must be a finite number > 0 (or 'none': dropless)")
            key = key if isinstance(key, str) else str(value)
        if key not in out:
            out.append(key)
    return out


def check_strategies(strategies) -> list[str]:
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; strategies: {STRATEGIES}")
    if not strategies:
        raise ValueError(f"strategies is empty; strategies: {STRATEGIES}")
    return list(dict.fromkeys(strategies))


def policy_for(factor: str, strategy: str, num_devices: int, authors: bool = False) -> moejax.MoEPolicy:
    """The cell's policy: moejax's default semantics, or with `authors` the authors' (MoEPolicy.authors)."""
    if factor == "none":
        return moejax.MoEPolicy()
    make = moejax.MoEPolicy.authors if authors else moejax.MoEPolicy
    if strategy.startswith("expanded_"):
        return make(capacity_factor=float(factor), expanded=strategy.split("_", 1)[1], num_devices=num_devices)
    return make(capacity_factor=float(factor), drop=strategy)


def task_name(path: str) -> str:
    name = os.path.basename(path)
    return name[:-len(".jsonl")] if name.endswith(".jsonl") else name


def load_tasks(paths, examples: int) -> dict[str, list[evaluation.MultipleChoice]]:
    """{task name: its first `examples` examples (0: all)}; a missing or malformed file fails naming it."""
    if examples < 0:
        raise ValueError(f"task_examples={examples} must be >= 0 (0: all)")
    tasks = {}
    for path in paths:
        name = task_name(path)
        if name in tasks:
            raise ValueError(f"two task files are named {name!r}: {path!r} and another")
        tasks[name] = evaluation.read_multiple_choice(path)[:examples or None]
    return tasks


def validation_sequences(tokenizer, corpus, count: int, length: int) -> tuple[list[np.ndarray], dict]:
    """`count` full windows of `length` tokens spread evenly over the validation split's token stream of the
    corpus config, so that they cover many documents rather than the first few."""
    stream, info = harness.held_out_stream(tokenizer, corpus, "validation")
    windows = harness.full_windows(stream, length)
    if len(windows) < count:
        raise ValueError(f"the validation split has {len(stream)} tokens: {len(windows)} windows of {length}, "
                         f"fewer than sequences={count}")
    picks = np.linspace(0, len(windows) - 1, count).round().astype(int)
    return [windows[i] for i in picks], info


# ---------------------------------------------------------------------------------------------------------
# One cell


@functools.partial(jax.jit, static_argnums=0)
def _routings(graphdef, state, tokens, mask):
    return nnx.merge(graphdef, state).forward(tokens, token_mask=mask).routings


def layer_counts(model, sequences, batch_size: int) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]:
    """Per MoE layer, over every evaluation batch: routed, kept, and kept-of-routed pairs per expert, tokens,
    tokens that lost every expert."""
    graphdef, state = nnx.split(model)
    totals: dict[int, list] = {}
    for start in range(0, len(sequences), batch_size):
        tokens, mask = pad_prompts(sequences[start:start + batch_size])
        routings = _routings(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))
        loads = stats.layer_loads(routings, jnp.asarray(mask), top_k=model.config.num_experts_per_tok)
        for layer, l in loads.items():
            t = totals.setdefault(layer, [0, 0, 0, 0, 0])
            for i, value in enumerate((l.routed, l.kept, l.kept_of_routed, l.tokens, l.tokens_without_experts)):
                t[i] = t[i] + value
    return {layer: tuple(t) for layer, t in totals.items()}


def busiest_device_seconds(block, loads: dict[str, np.ndarray], device_of_expert: np.ndarray, num_devices: int,
                           batches: int, repeats: int) -> dict[str, float]:
    """{name: median time of the expert work of the device with the most pairs (per batch) under those
    per-expert loads}, with the block's real weights, timed side by side (harness.median_seconds)."""
    fn = jax.jit(functools.partial(grouped_ffn, activation=block.activation))
    weights = stacked(block.expert_weights())  # every FFN kind (gated or not, biases); split storage stacked
    calls = {}
    for name, load in loads.items():
        per_batch = np.ceil(load / batches).astype(np.int32)
        busiest = int(np.argmax(stats.device_loads(per_batch, device_of_expert, num_devices)))
        experts = np.flatnonzero(device_of_expert == busiest)
        sizes = jnp.asarray(per_batch[experts])
        rows = jnp.asarray(np.random.default_rng(0).normal(size=(max(1, int(sizes.sum())), block.config.hidden_size)),
                           weights.up.dtype)
        calls[name] = functools.partial(fn, rows, sizes, jax.tree.map(lambda w: w[experts], weights))
    return harness.median_seconds(calls, repeats)


def run_cell(model, sequences, tasks, tokenizer, factor: str, strategy: str, *, num_devices: int, batch_size: int,
             repeats: int, authors: bool = False, lm_eval: dict | None = None) -> dict:
    start = time.perf_counter()
    policy = policy_for(factor, strategy, num_devices, authors)
    m = moejax.with_policy(model, policy)
    device_of_expert = placement.contiguous(model.config.num_experts, num_devices)
    counts = layer_counts(m, sequences, batch_size)
    batches = -(-len(sequences) // batch_size)
    blocks = {i: layer.mlp for i, layer in enumerate(m.layers) if counts.get(i) is not None}
    # Measured speedup, like the modelled one: each layer's routed loads (what dropless computes there) against
    # its kept loads, timed side by side in this cell.
    timings = [busiest_device_seconds(blocks[i], {"routed": c[0], "kept": c[1]}, device_of_expert, num_devices,
                                      batches, repeats) for i, c in counts.items()]
    routed_time, kept_time = (sum(t[name] for t in timings) for name in ("routed", "kept"))
    routed = sum(c[0].sum() for c in counts.values())
    kept_of_routed = sum(c[2].sum() for c in counts.values())
    scores = {name: evaluation.score_multiple_choice(m, tokenizer, examples, batch_size=batch_size)
              for name, examples in tasks.items()}
    lm_eval_record = None
    if lm_eval:  # lm-eval's own tasks through the moejax backend: its metrics, and what the policy enforced
        from moejax.lm_eval_model import evaluate_tasks

        run = evaluate_tasks(m, tokenizer, lm_eval["tasks"], include_path=lm_eval["include_path"] or None,
                             include_defaults=lm_eval["include_defaults"], batch_size=batch_size,
                             limit=lm_eval["limit"] or None)
        lm_eval_record = {"tasks": run["tasks"], "enforced": run["moejax"]}
        scores.update({f"lm_eval/{name}": metrics for name, metrics in run["tasks"].items() if "acc" in metrics})
    return {
        "factor": factor, "strategy": strategy, "policy": repr(policy),
        "perplexity": evaluation.perplexity(m, sequences, batch_size=batch_size),
        "tasks": {name: {"acc": s["acc"], "acc_norm": s["acc_norm"]} for name, s in scores.items()},
        **({"lm_eval": lm_eval_record} if lm_eval_record else {}),
        "mc_accuracy": float(np.mean([s["acc"] for s in scores.values()])) if scores else None,
        "drop_rate": float(1 - kept_of_routed / routed),
        "added_pairs": float((sum(c[1].sum() for c in counts.values()) - kept_of_routed) / routed),
        "tokens_without_experts": float(sum(c[4] for c in counts.values()) / sum(c[3] for c in counts.values())),
        "kept_max_over_mean": float(np.mean([stats.max_over_mean(c[1]) for c in counts.values()])),
        "routed_max_over_mean": float(np.mean([stats.max_over_mean(c[0]) for c in counts.values()])),
        "modelled_speedup": float(np.mean([stats.modelled_speedup(c[0], c[1], device_of_expert, num_devices)
                                           for c in counts.values()])),
        "busiest_device_seconds": kept_time,
        "routed_busiest_device_seconds": routed_time,
        "measured_speedup": routed_time / kept_time,
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------------------
# The sweep


def describe_cell(cell: dict) -> str:
    acc = "" if cell["mc_accuracy"] is None else f"  acc {cell['mc_accuracy']:.3f}"
    return (f"gamma={cell['factor']:>5} {cell['strategy']:>16}: ppl {cell['perplexity']:9.3f}{acc}  drop "
            f"{cell['drop_rate']:.3f}  max/mean {cell['kept_max_over_mean']:.2f}  speedup modelled "
            f"{cell['modelled_speedup']:.2f} measured {cell['measured_speedup']:.2f}  ({cell['seconds']:.0f} s)")


def sweep_cells(factors, strategies) -> list[tuple[str, str]]:
    """Dropless first (the quality reference; its measured speedup shows the timing noise), then factor x
    strategy."""
    return [("none", "dropless")] + [(f, s) for f in factors if f != "none" for s in strategies]


def run_sweep(model, sequences, tasks, tokenizer, workdir: str, *, factors, strategies, settings: dict,
              num_devices: int = 8, batch_size: int = 8, repeats: int = 5, extra: dict | None = None,
              progress: bool = True, authors: bool = False, lm_eval: dict | None = None) -> dict:
    """Run every cell not yet in workdir/results.json, writing the file after each. `settings` are what the
    numbers depend on: a results.json made with other settings is refused, never mixed in. `authors`: the
    cells' policies are MoEPolicy.authors (say so in `settings`). lm_eval: {"tasks", "include_path",
    "include_defaults", "limit"} to score lm-eval tasks in every cell as well (moejax.lm_eval_model)."""
    if (tasks or lm_eval) and tokenizer is None:
        raise ValueError("multiple-choice tasks need the checkpoint's tokenizer; this model has none")
    results = Results(workdir, settings)
    results.data.update(extra or {})
    keys = [{"factor": f, "strategy": s} for f, s in sweep_cells(factors, strategies)]
    harness.sweep(results, keys, lambda key: run_cell(model, sequences, tasks, tokenizer, key["factor"], key["strategy"],
                                                      num_devices=num_devices, batch_size=batch_size, repeats=repeats,
                                                      authors=authors, lm_eval=lm_eval),
                  describe_cell, desc="capacity cells", progress=progress)
    results.save()
    return results.data


# ---------------------------------------------------------------------------------------------------------
# Tables, plot, README


def _grid(results: dict):
    cells = results["cells"]
    factors = sorted({c["factor"] for c in cells if c["factor"] != "none"}, key=float)
    strategies = [s for s in STRATEGIES if any(c["strategy"] == s for c in cells)]
    by_key = {(c["factor"], c["strategy"]): c for c in cells}
    dropless = next((c for c in cells if c["factor"] == "none"), None)
    return factors, strategies, by_key, dropless


def _table(factors, strategies, by_key, render) -> list[str]:
    """Rows: strategy, columns: capacity factor, cells render(cell) ("-" where a cell did not run)."""
    lines = ["| strategy | " + " | ".join(f"gamma={f}" for f in factors) + " |", "|---|" + "---:|" * len(factors)]
    for s in strategies:
        lines.append(f"| {s} | " + " | ".join("-" if (f, s) not in by_key else render(by_key[(f, s)])
                                               for f in factors) + " |")
    return lines


def _titled(title: str, *table) -> list[str]:
    return [title, ""] + _table(*table) + [""]


def speedup_table(by_key: dict, factors) -> list[str]:
    """The MoE-layer speedups of token drop (score) and expanded drop (local), modelled and measured, beside
    the paper's (harness.CAPACITY_SPEEDUP) at the capacity factors both have; [] where there are none."""
    comparable = [f for f in PAPER_FACTORS if f in factors]
    if not comparable:
        return []
    lines = ["| | " + " | ".join(f"gamma={f}" for f in comparable) + " |", "|---|" + "---:|" * len(comparable)]
    for label, strategy in (("token drop (score)", "score"), ("expanded drop (local)", "expanded_local")):
        for kind in ("modelled", "measured"):
            values = [by_key.get((f, strategy), {}).get(f"{kind}_speedup") for f in comparable]
            lines.append(f"| moejax {label}, {kind} | "
                         + " | ".join("-" if v is None else f"{v:.2f}x" for v in values) + " |")
    for model, rows in harness.CAPACITY_SPEEDUP.items():
        for kind, values in rows.items():
            lines.append(f"| paper: {model}, {kind} | " + " | ".join(f"{values[f]:.2f}x" for f in comparable) + " |")
    return lines


def markdown_tables(results: dict) -> str:
    """The sweep in the paper's shape (rows: strategy, columns: capacity factor): perplexity, MC accuracy,
    and drop rate with modelled / measured speedup; then the speedups beside the paper's."""
    factors, strategies, by_key, dropless = _grid(results)
    lines = []
    if dropless:
        acc = "" if dropless.get("mc_accuracy") is None else (
            f", MC accuracy {dropless['mc_accuracy']:.3f} ("
            + ", ".join(f"{n} {t['acc']:.3f}" for n, t in dropless["tasks"].items()) + ")")
        lines += [f"Dropless reference: perplexity {dropless['perplexity']:.3f}{acc}; its measured speedup, routed "
                  f"loads timed against themselves, is {dropless['measured_speedup']:.2f}x (the timing noise).", ""]

    def ppl(c):
        change = f" ({c['perplexity'] / dropless['perplexity'] - 1:+.1%})" if dropless else ""
        return f"{c['perplexity']:.3f}{change}"

    def acc(c):
        if c.get("mc_accuracy") is None:
            return "-"
        change = f" ({c['mc_accuracy'] - dropless['mc_accuracy']:+.3f})" if dropless and dropless.get("mc_accuracy") is not None else ""
        return f"{c['mc_accuracy']:.3f}{change}"

    grid = (factors, strategies, by_key)
    lines += _titled("Validation perplexity (change against dropless):", *grid, ppl)
    lines += _titled("Multiple-choice accuracy, mean acc over the tasks (change against dropless):", *grid, acc)
    if any(c.get("tasks") for c in results["cells"]):
        for name in (dropless or results["cells"][0]).get("tasks", {}):
            lines += _titled(f"{name}: acc / acc_norm:", *grid,
                             lambda c: f"{c['tasks'][name]['acc']:.3f} / {c['tasks'][name]['acc_norm']:.3f}")
    lines += _titled("Drop rate (routed pairs dropped) / modelled speedup / measured speedup of the MoE layers:",
                     *grid, lambda c: f"{c['drop_rate']:.1%} / {c['modelled_speedup']:.2f}x / {c['measured_speedup']:.2f}x")
    speedups = speedup_table(by_key, factors)
    if speedups:
        lines += ["MoE-layer speedup beside the paper's (He et al. 2025, papers.md A; token drop = score):", "",
                  *speedups, ""]
    return "\n".join(lines)


def report_section(results: dict) -> list[str]:
    """The reproduction report's capacity section: one grid of every cell, then the speedups beside the
    paper's. Without multiple-choice tasks (tasks=()), the cells show no accuracy."""
    factors, strategies, by_key, dropless = _grid(results)
    with_tasks = any(c.get("mc_accuracy") is not None for c in results["cells"])
    lines = ["## Capacity-aware token drop and expanded drop (He et al., papers.md A)", ""]
    if dropless:
        acc = "" if dropless.get("mc_accuracy") is None else f", multiple-choice acc {dropless['mc_accuracy']:.3f}"
        lines.append(f"Dropless: perplexity {dropless['perplexity']:.2f}{acc}. Cells: perplexity / "
                     + ("multiple-choice acc / " if with_tasks else "")
                     + "measured MoE-layer speedup (busiest device's expert work against dropless) / drop rate."
                     + ("" if with_tasks else " No multiple-choice tasks ran."))

    def cell(c):
        acc = "" if c.get("mc_accuracy") is None else f" / {c['mc_accuracy']:.3f}"
        return f"{c['perplexity']:.2f}{acc} / {c['measured_speedup']:.2f}x / {c['drop_rate']:.1%}"

    lines += [""] + _table(factors, strategies, by_key, cell)
    speedups = speedup_table(by_key, factors)
    if speedups:
        lines += ["", "Speedup beside the paper's (modelled: a layer waits for its busiest device; measured as above):",
                  "", *speedups]
    return lines


def comparison_at(results: dict, factor: str = "1.5") -> list[str]:
    """Sentences stating, from the numbers alone, whether score-based and expanded drop lose less quality
    than first / last / random drop at `factor` (the issue's claim)."""
    _, _, by_key, _ = _grid(results)
    baselines = [s for s in ("first", "last", "random") if (factor, s) in by_key]
    if not baselines:
        return []
    out = []
    for metric, better, fmt in (("perplexity", min, "{:.3f}"), ("mc_accuracy", max, "{:.3f}")):
        if any(by_key[(factor, s)].get(metric) is None for s in baselines):
            continue
        best_name = better(baselines, key=lambda s: by_key[(factor, s)][metric])
        best = by_key[(factor, best_name)][metric]
        for s in ("score", "expanded_local", "expanded_global"):
            if (factor, s) not in by_key:
                continue
            value = by_key[(factor, s)][metric]
            wins = value < best if metric == "perplexity" else value > best
            out.append(f"- gamma={factor}, {metric}: {s} {fmt.format(value)} vs the best of first/last/random "
                       f"({best_name}) {fmt.format(best)}: {'better' if wins else 'NOT better'}.")
    return out


def plot(cells: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("perplexity", "validation perplexity")]
    if any(c.get("mc_accuracy") is not None for c in cells):
        panels.append(("mc_accuracy", "multiple-choice accuracy (mean acc)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    dropless = next((c for c in cells if c["factor"] == "none"), None)
    for ax, (key, label) in zip(axes[0], panels):
        for strategy in STRATEGIES:
            points = sorted((c["measured_speedup"], c[key], c["factor"]) for c in cells if c["strategy"] == strategy)
            if not points:
                continue
            xs, ys, fs = zip(*points)
            ax.plot(xs, ys, marker="o", label=strategy)
            for x, y, f in points:
                ax.annotate(f, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        if dropless:
            ax.plot([dropless["measured_speedup"]], [dropless[key]], "k*", markersize=12, label="dropless")
        ax.set_xlabel("measured MoE-layer speedup (busiest device)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("quality against measured speedup; point labels: capacity factor gamma", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_readme(workdir: str, results: dict) -> None:
    """README.md from results.json; anything below HAND_WRITTEN in an existing README is kept."""
    path = os.path.join(workdir, "README.md")
    kept = ""
    if os.path.exists(path):
        text = open(path, encoding="utf-8").read()
        if HAND_WRITTEN in text:
            kept = text.split(HAND_WRITTEN, 1)[1].lstrip("\n")
    s = results["settings"]
    cells = results["cells"]
    lines = [f"# Capacity-aware inference sweep on `{s['checkpoint']}`", "",
             f"Command: `{results.get('command', '?')}`", "",
             f"Machine (shared with other jobs): {harness.describe(results.get('machine', {}))}. {len(cells)} cells "
             f"in {sum(c.get('seconds', 0) for c in cells) / 60:.1f} min of cell time.", "",
             f"Perplexity: {s['sequences']} windows of {s['length']} tokens spread over the {s.get('split', '?')} "
             f"split of `{s.get('corpus', '?')}` (the documents training never saw; split as moejax.data "
             "splits the training corpus). Multiple choice: "
             + (", ".join(f"`{t}`" for t in s["tasks"]) or "none")
             + f", the first {s['task_examples'] or 'all'} examples of each (acc: the highest log-likelihood "
             f"choice is gold; chance 0.25). Batches of {s['batch_size']} sequences (or choice requests) share the "
             f"capacity C = ceil(gamma * T * k / E) of a forward; expert axis of {s['num_devices']} devices "
             "(contiguous placement) for expanded drop, the latency model and the busiest device."
             + (" Policies: `moejax.MoEPolicy.authors` (the authors' code's semantics)." if s.get("authors_semantics")
                else ""), "",
             "Speedups are of the MoE layers only. Modelled: a layer waits for its busiest device, whose time is its "
             "kept pairs. Measured: the time of the busiest device's expert work (grouped SwiGLU with the real "
             "weights), summed over layers: at the per-batch loads the router asked for (dropless) over at the loads the "
             f"policy leaves, both timed in the same cell with interleaved repeats (median of {s['repeats']}); on this "
             "CPU, not an 8-GPU mesh, so communication is not in it. The dropless row's measured speedup (routed "
             "against the same loads) shows how much of a measured number is timing noise.", "",
             "![quality against measured speedup](plot.png)", "",
             markdown_tables(results),
             "Score / expanded drop against first / last / random at gamma=1.5 (computed from the table):", ""]
    lines += comparison_at(results, "1.5") + ["", HAND_WRITTEN, "", kept]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")


# ---------------------------------------------------------------------------------------------------------


def main(config, workdir):
    from absl import app, logging

    logging.set_verbosity(logging.WARNING)
    try:
        factors = check_factors(config.factors)
        strategies = check_strategies(config.strategies)
        for name, least in (("sequences", 1), ("length", 2), ("batch_size", 1), ("repeats", 1), ("num_devices", 1)):
            if config[name] < least:
                raise ValueError(f"config.{name}={config[name]} must be >= {least}")
        tasks = load_tasks(config.tasks, config.task_examples)
    except (OSError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    settings = {"checkpoint": config.checkpoint or "random built-in", "sequences": config.sequences,
                "length": config.length, "batch_size": config.batch_size, "num_devices": config.num_devices,
                "repeats": config.repeats, "tasks": list(config.tasks), "task_examples": config.task_examples}
    if config.authors_semantics:  # only when set, so that results.json files from before the option resume
        settings["authors_semantics"] = True
    lm_eval = None
    if config.lm_eval.tasks:  # likewise
        lm_eval = {k: (list(v) if k == "tasks" else v) for k, v in config.lm_eval.to_dict().items()}
        settings["lm_eval"] = lm_eval
    if config.checkpoint:
        model = moejax.load_pretrained(config.checkpoint)
        tokenizer = moejax.load_tokenizer(config.checkpoint)
        if tokenizer is None:
            raise app.UsageError(f"checkpoint {config.checkpoint!r} has no tokenizer.json to read the validation "
                                 "text and the tasks with")
        sequences, corpus = validation_sequences(tokenizer, config.corpus, config.sequences, config.length)
        settings.update(corpus=corpus["corpus"], split="validation",
                        validation_fraction=config.corpus.validation_fraction, test_fraction=config.corpus.test_fraction)
    else:
        if tasks or config.lm_eval.tasks:
            raise app.UsageError("the random built-in model (checkpoint empty) has no tokenizer: pass "
                                 "--config.tasks='()' and no --config.lm_eval.tasks")
        model, tokenizer, corpus = harness.random_model(RANDOM_MODEL), None, {}
        rng = np.random.default_rng(0)
        sequences = list(rng.integers(0, model.config.vocab_size, size=(config.sequences, config.length)))
        settings.update(corpus="random tokens", split="-")
    if model.config.num_experts % config.num_devices:
        raise app.UsageError(f"config.num_devices={config.num_devices} does not divide the model's "
                             f"{model.config.num_experts} experts")
    results = run_sweep(model, sequences, tasks, tokenizer, workdir, factors=factors, strategies=strategies,
                        settings=settings, num_devices=config.num_devices, batch_size=config.batch_size,
                        repeats=config.repeats, extra={**harness.header(), "corpus": corpus},
                        authors=config.authors_semantics, lm_eval=lm_eval)
    plot(results["cells"], os.path.join(workdir, "plot.png"))
    write_readme(workdir, results)
    print(markdown_tables(results))
    print(f"Wrote {os.path.join(workdir, 'results.json')}, plot.png and README.md")


if __name__ == "__main__":
    harness.run(main, workdir="experiments/results/capacity_sweep")
