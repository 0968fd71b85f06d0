"""Load-balanced expert placement (papers.md B): contiguous, greedy, anti-correlation, replicas, search.

1. A load trace: per token batch and MoE layer, the (token, expert) pairs the router chose
   (stats.load_trace). The model: the config's checkpoint (default: the trained default model,
   experiments/default_model), its batches the held-out text it never trained on: the config's corpus split as
   moejax.data splits it (split: validation or test), tokenized with the checkpoint's tokenizer, cut into
   consecutive seq_len windows in document order, batch_size windows per batch. Checkpoint "": a random model
   whose router weights are scaled up (random_model.router_scale), fed "topic" batches (Zipf token streams over
   topic-specific vocabularies, Dirichlet topic weights per batch).
2. Per layer and device count D, each method is fitted on the first half of the trace; on the second half:
   Max Load (largest device share in any batch), Avg Max Load (per-batch largest device share, averaged),
   and the modelled MoE time (each layer waits for its busiest device: D * its share, 1.0 = balanced).
3. Measured throughput: the model expert-parallel on the 8-device CPU mesh (expert=D, data=8/D) with each
   method's per-layer placements, dynamic gating, forward over the held-out batches.
4. The search benchmark (search_benchmark): placement.search's run time for 256 experts on 64 devices over
   1000 historical batches (synthetic skewed, correlated loads: the default model has only 32 experts),
   timed after a first call that compiles it; its Avg Max Load against contiguous and greedy on those
   batches and on 1000 more drawn the same way.

Results JSON is written after every cell (a rerun skips finished ones; a trace recorded from another model,
split or batch shape is discarded with the cells fitted on it); a PNG plot goes beside it. Settings:
configs/placement.py.

  python experiments/placement.py --workdir=experiments/results/placement
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

import harness
import moejax
from moejax import parallel, stats
from moejax import placement as pl
from moejax.results import Results

REPORT_PLOT = "Avg Max Load per method and device count"

# The random model: small enough for the CPU, enough experts for placement to matter.
RANDOM_MODEL = dict(harness.RANDOM_MIXTRAL, num_layers=4, num_experts_per_tok=2, moe_intermediate_size=128,
                    moe_layers=(True,) * 4)


def load_model(config):
    if config.checkpoint:
        return moejax.load_pretrained(config.checkpoint), f"checkpoint {config.checkpoint}"
    r = config.random_model
    return harness.random_model(RANDOM_MODEL, r.seed, r.router_scale), f"random model {RANDOM_MODEL}, router weights x{r.router_scale}"


def held_out_batches(config) -> tuple[list[np.ndarray], dict]:
    """config.batches batches of config.batch_size consecutive seq_len windows of the config.split token
    stream, in document order (so the fitting half and the test half are different documents)."""
    tokenizer = moejax.load_tokenizer(config.checkpoint)
    if tokenizer is None:
        raise app.UsageError(f"checkpoint {config.checkpoint!r} has no tokenizer.json to read the held-out text with")
    stream, info = harness.held_out_stream(tokenizer, config.corpus, config.split)
    windows = harness.full_windows(stream, config.seq_len)
    per_batch, count = config.batch_size, config.batches
    if len(windows) < count * per_batch:
        raise app.UsageError(f"the {config.split} split has {len(stream)} tokens: {len(windows)} windows of "
                             f"{config.seq_len}, fewer than batches x batch_size = {count * per_batch}")
    batches = [np.stack(windows[i * per_batch:(i + 1) * per_batch]).astype(np.int32) for i in range(count)]
    used = count * per_batch * config.seq_len
    return batches, {**info, "tokens_used": used, "fraction_of_split_used": used / len(stream)}


def token_batches(vocab: int, rng: np.random.Generator, topics: int, batches: int, batch_size: int,
                  seq_len: int) -> list[np.ndarray]:
    """Each topic is a Zipf distribution over its own random ordering of the vocabulary; each batch draws
    its sequences from a Dirichlet mixture of topics, so the experts a topic favours rise and fall together."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64) ** -1.1
    distributions = [np.zeros(vocab) for _ in range(topics)]
    for t in distributions:
        t[rng.permutation(vocab)] = ranks / ranks.sum()
    out = []
    for _ in range(batches):
        mix = rng.dirichlet(np.full(topics, 0.3))
        seq_topics = rng.choice(topics, size=batch_size, p=mix)
        out.append(np.stack([rng.choice(vocab, size=seq_len, p=distributions[t]) for t in seq_topics]))
    return [b.astype(np.int32) for b in out]


def fit(method: str, fit_loads: np.ndarray, tokens_per_batch: int, num_devices: int, config):
    """One layer's placement from its fitting half [B, E] of pair counts."""
    num_experts = fit_loads.shape[1]
    mean = fit_loads.mean(0)
    slots = num_experts + config.extra_slots_per_device * num_devices
    if method == "contiguous":
        return pl.contiguous(num_experts, num_devices)
    if method == "greedy":
        return pl.greedy(mean, num_devices)
    if method == "anti_correlation":  # the paper's A[b, e]: the fraction of the batch's tokens routed to e
        return pl.anti_correlation(fit_loads / tokens_per_batch, num_devices, config.anti_correlation_weight)
    if method == "search":
        return pl.search(fit_loads, num_devices, restarts=config.search_restarts)
    if method == "replicas":
        return pl.replicate(mean, num_devices, slots)
    if method == "replicas_search":
        return pl.search(fit_loads, start=pl.replicate(mean, num_devices, slots), restarts=config.search_restarts)
    raise ValueError(f"unknown method {method!r}")


def balance_cell(method: str, num_devices: int, trace: np.ndarray, tokens_per_batch: int, config):
    half = trace.shape[0] // 2
    fit_trace, test_trace = trace[:half], trace[half:]
    layers, placements = [], []
    start = time.perf_counter()
    for layer in range(trace.shape[1]):
        placement = pl.as_placement(fit(method, fit_trace[:, layer], tokens_per_batch, num_devices, config), num_devices)
        placements.append(placement)
        test, train = test_trace[:, layer], fit_trace[:, layer]
        layers.append({"max_load": pl.max_load(test, placement), "avg_max_load": pl.avg_max_load(test, placement),
                       "fit_avg_max_load": pl.avg_max_load(train, placement),
                       "max_replicas": int(placement.replica_count.max())})
    shares = np.stack([pl.device_shares(test_trace[:, l], placements[l]).max(1) for l in range(trace.shape[1])])
    cell = {"method": method, "devices": num_devices, "fit_seconds": time.perf_counter() - start,
            "slots_per_device": placements[0].slots_per_device,
            "max_load": max(l["max_load"] for l in layers),
            "avg_max_load": float(np.mean([l["avg_max_load"] for l in layers])),
            "fit_avg_max_load": float(np.mean([l["fit_avg_max_load"] for l in layers])),
            # a forward waits for the busiest device of every layer: D * share per layer, 1.0 = balanced
            "modelled_time": float((num_devices * shares).mean()),
            "layers": layers, "placements": [list(p.logical_of_slot) for p in placements]}
    return cell, placements


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    out = nnx.merge(graphdef, state).forward(tokens)
    return out.logits, out.needed_bucket


def throughput(model, placements, num_devices: int, batches: list[np.ndarray], repeats: int) -> dict:
    """tokens/s of the expert-parallel forward over the held-out batches with dynamic gating, its padded
    all-to-all sized by the largest bucket those batches need (a better placement needs a smaller one)."""
    mesh = parallel.make_mesh(expert=num_devices, data=8 // num_devices)
    ep = parallel.expert_parallel(model, mesh, placements=placements)
    tokens = [jnp.asarray(b) for b in batches]
    pairs_per_device = tokens[0].size * model.config.num_experts_per_tok // 8
    runner = parallel.ExpertParallelRunner(ep, lambda m, t: _forward(*nnx.split(m), t))
    bucket = 0
    for t in tokens:  # settle the largest bucket the held-out batches need
        runner.bucket = None
        runner(t, pairs_per_device=pairs_per_device)
        bucket = max(bucket, runner.bucket)
    graphdef, state = nnx.split(parallel.with_bucket(ep, bucket))
    seconds = harness.median_seconds(
        {"pass": lambda: [jax.block_until_ready(_forward(graphdef, state, t)) for t in tokens]}, repeats)["pass"]
    return {"tokens_per_second": sum(t.size for t in tokens) / seconds, "seconds": seconds, "bucket": bucket,
            "balanced_bucket": parallel.bucket_sizes(pairs_per_device, num_devices)[0]}


def benchmark_loads(num_experts: int, num_batches: int, rng: np.random.Generator, tokens: int = 2048,
                    top_k: int = 2, topics: int = 8) -> np.ndarray:
    """float64 [num_batches, num_experts] routed pairs: each topic prefers experts by a Dirichlet(0.5) draw,
    each batch mixes topics by a Dirichlet(0.3) draw, its tokens * top_k pairs are multinomial over that."""
    prefs = rng.dirichlet(np.full(num_experts, 0.5), size=topics)  # [topics, E]
    mix = rng.dirichlet(np.full(topics, 0.3), size=num_batches)  # [B, topics]
    p = mix @ prefs
    return np.stack([rng.multinomial(tokens * top_k, q / q.sum()) for q in p]).astype(np.float64)


def search_benchmark(config) -> dict:
    """search's run time at the issue's size, after a first call that compiles it, and what it buys: plain
    descent (restarts=0) and with config.search_restarts perturb-and-descend rounds."""
    num_experts, num_devices, num_batches = (int(v) for v in config.search_benchmark_shape)
    rng = np.random.default_rng(0)
    loads = benchmark_loads(num_experts, 2 * num_batches, rng)
    fit_loads, test_loads = loads[:num_batches], loads[num_batches:]
    placements = {"contiguous": pl.contiguous(num_experts, num_devices),
                  "greedy": pl.greedy(fit_loads.mean(0), num_devices)}
    runs = []
    for restarts in dict.fromkeys([0, config.search_restarts]):
        start = time.perf_counter()
        pl.search(fit_loads, num_devices, restarts=restarts)  # compiles (and runs once)
        first = time.perf_counter() - start
        start = time.perf_counter()
        found = pl.search(fit_loads, num_devices, restarts=restarts)
        runs.append({"restarts": restarts, "first_call_seconds": first, "seconds": time.perf_counter() - start,
                     "fit_avg_max_load": pl.avg_max_load(fit_loads, found),
                     "held_out_avg_max_load": pl.avg_max_load(test_loads, found)})
    return {"experts": num_experts, "devices": num_devices, "batches": num_batches,
            "loads": "synthetic: benchmark_loads (8 Dirichlet topics, 2048 tokens x top-2 per batch)",
            "trace_max_over_mean": float(np.mean(loads.max(1) / loads.mean(1))), "target_seconds": 2.0,
            "search": runs,
            "fit_avg_max_load": {k: pl.avg_max_load(fit_loads, v, num_devices) for k, v in placements.items()},
            "held_out_avg_max_load": {k: pl.avg_max_load(test_loads, v, num_devices) for k, v in placements.items()}}


def plot(cells: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(c["method"] for c in cells))
    devices = sorted({c["devices"] for c in cells})
    keys = [("avg_max_load", "Avg Max Load (held out)"), ("max_load", "Max Load (held out)"),
            ("modelled_time", "modelled MoE time (1 = balanced)"), ("tokens_per_second", "measured tokens/s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(18, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        for ax, (key, label) in zip(axes, keys):
            values = []
            for d in devices:
                c = next((c for c in cells if c["method"] == method and c["devices"] == d), None)
                v = None if c is None else (c.get("throughput", {}).get(key) if key == "tokens_per_second"
                                            else c[key])
                values.append(np.nan if v is None else v)
            ax.bar(np.arange(len(devices)) + i * width, values, width, label=method)
            ax.set_ylabel(label)
    for ax, (key, _) in zip(axes, keys):
        ax.set_xticks(np.arange(len(devices)) + 0.4 - width / 2, [f"D={d}" for d in devices])
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[:2]:
        ax.plot(np.arange(len(devices)) + 0.4 - width / 2, [1 / d for d in devices], "k_", markersize=30,
                label="perfect balance (1/D)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Expert placement: held-out load balance and expert-parallel throughput (8-device CPU mesh)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_cell(cell: dict) -> str:
    tput = cell.get("throughput", {})
    return (f"D={cell['devices']} {cell['method']:17s} Max Load {cell['max_load']:.3f}  Avg Max Load "
            f"{cell['avg_max_load']:.3f} (fit {cell['fit_avg_max_load']:.3f})  modelled time {cell['modelled_time']:.2f}  "
            + (f"{tput['tokens_per_second']:8.0f} tok/s (bucket {tput['bucket']})" if tput else ""))


def report_section(r: dict) -> list[str]:
    """The reproduction report's placement section."""
    lines = ["## Expert placement (Huang et al., papers.md B)", "",
             "Held-out batches (fit on the first half of the trace, test on the second). " + harness.PAPERS["placement"],
             "", "| method | devices | Max Load | Avg Max Load | Avg Max Load (fit half) | tokens/s |",
             "|---|---|---|---|---|---|"]
    for c in r["cells"]:
        throughput = c.get("throughput") or {}
        tps = f"{throughput['tokens_per_second']:.0f}" if "tokens_per_second" in throughput else "-"
        lines.append(f"| {c['method']} | {c['devices']} | {c['max_load']:.3f} | {c['avg_max_load']:.3f} | "
                     f"{c['fit_avg_max_load']:.3f} | {tps} |")
    bench = r.get("search_benchmark")
    if bench and "search" in bench:
        baselines = ", ".join(f"{k} {v:.4f}" for k, v in bench["held_out_avg_max_load"].items())
        lines += ["", f"Search benchmark ({bench['experts']} experts on {bench['devices']} devices, {bench['batches']} "
                  f"synthetic skewed batches; target < {bench['target_seconds']:g} s after compilation): "
                  + "; ".join(f"restarts={run['restarts']}: {run['seconds']:.2f} s, held-out Avg Max Load "
                              f"{run['held_out_avg_max_load']:.4f}" for run in bench["search"])
                  + f" ({baselines})."]
    return lines


def main(config, workdir):
    model, source = load_model(config)
    r = config.random_model
    if config.checkpoint:
        batches, data_info = held_out_batches(config)
    else:
        batches = token_batches(model.config.vocab_size, np.random.default_rng(r.seed), r.topics, config.batches,
                                config.batch_size, config.seq_len)
        data_info = {"corpus": f"random topic batches ({r.topics} topics)", "split": None}
    # what the trace (and every cell fitted on it) depends on: a rerun with other values starts over
    trace_key = {"source": source, "split": data_info["split"], "batches": config.batches,
                 "batch_size": config.batch_size, "seq_len": config.seq_len,
                 **({} if config.checkpoint else {"seed": r.seed, "topics": r.topics, "router_scale": r.router_scale})}
    results = Results(workdir, trace_key, on_mismatch="restart")
    trace_path = os.path.join(workdir, "trace.npy")
    if not results.resumed and os.path.exists(trace_path):
        os.remove(trace_path)
    if os.path.exists(trace_path):
        trace = np.load(trace_path)
    else:
        trace = stats.load_trace(model, batches)
        np.save(trace_path, trace)
    tokens_per_batch = config.batch_size * config.seq_len
    results.data.update({
        "source": source, "trace_shape": list(trace.shape), "tokens_per_batch": tokens_per_batch,
        "trace_max_over_mean": float(np.mean(trace.max(-1) / trace.mean(-1))), "data": data_info,
        **harness.header(), "top_k": model.config.num_experts_per_tok, "num_experts": model.config.num_experts,
        "config": config.to_dict()})
    def compute(key):
        cell, placements = balance_cell(key["method"], key["devices"], trace, tokens_per_batch, config)
        if config.throughput:
            cell["throughput"] = throughput(model, placements, key["devices"], batches[len(batches) // 2:],
                                            config.repeats)
        return cell

    keys = [{"method": m, "devices": int(d)} for d in config.devices for m in config.methods]
    harness.sweep(results, keys, compute, describe_cell, desc="placement cells")
    if config.search_benchmark and "search_benchmark" not in results.data:
        bench = search_benchmark(config)
        results.data["search_benchmark"] = bench
        results.save()
        baselines = ", ".join(f"{k} {v:.4f}" for k, v in bench["held_out_avg_max_load"].items())
        for run in bench["search"]:
            print(f"search benchmark: {bench['experts']} experts on {bench['devices']} devices over "
                  f"{bench['batches']} batches, restarts={run['restarts']}: {run['seconds']:.2f} s after "
                  f"compilation (first call {run['first_call_seconds']:.2f} s; target < 2 s); held-out Avg Max "
                  f"Load {run['held_out_avg_max_load']:.4f} ({baselines})")
    results.save()
    plot(results.cells, os.path.join(workdir, "plot.png"))
    print(f"Wrote {results.path} ({harness.PAPERS['placement']})")


if __name__ == "__main__":
    harness.run(main, workdir="workdir/placement")
