"""Load-balanced expert placement (papers.md B): contiguous, greedy, anti-correlation, replicas, search.

1. A load trace: per token batch and MoE layer, the (token, expert) pairs the router chose
   (stats.load_trace). The model: --checkpoint (default: the trained default model, experiments/default_model),
   its batches the held-out text it never trained on: the corpus of --config split as moejax.data and
   experiments/evaluate.py split it (--split: validation or test), tokenized with the checkpoint's
   tokenizer, cut into consecutive --seq_len windows in document order, --batch_size windows per batch.
   --checkpoint= (empty): a random model whose router weights are scaled up (--router_scale), fed "topic"
   batches (Zipf token streams over topic-specific vocabularies, Dirichlet topic weights per batch).
2. Per layer and device count D, each method is fitted on the first half of the trace; on the second half:
   Max Load (largest device share in any batch), Avg Max Load (per-batch largest device share, averaged),
   and the modelled MoE time (each layer waits for its busiest device: D * its share, 1.0 = balanced).
3. Measured throughput: the model expert-parallel on the 8-device CPU mesh (expert=D, data=8/D) with each
   method's per-layer placements, dynamic gating, forward over the held-out batches.
4. The search benchmark (--search_benchmark): placement.search's run time for 256 experts on 64 devices over
   1000 historical batches (synthetic skewed, correlated loads: the default model has only 32 experts),
   timed after a first call that compiles it; its Avg Max Load against contiguous and greedy on those
   batches and on 1000 more drawn the same way.

Results JSON is written after every cell (a rerun skips finished ones; a trace recorded from another model,
split or batch shape is discarded with the cells fitted on it); a PNG plot goes beside it.

  python experiments/placement.py --workdir=experiments/results/placement
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any device is touched; harmless where devices are real

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

import moejax  # noqa: E402
from moejax import parallel, stats  # noqa: E402
from moejax import placement as pl  # noqa: E402
from moejax.results import write_json_atomically  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "workdir/placement", "Where results.json and plot.png go.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "experiments/default_model",
                                  "A load_pretrained directory with a tokenizer.json; empty: a random model.")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_default.py",
                                          "The corpus and its split (as experiments/evaluate.py reads them).")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "Held-out split the trace is read from.")
_METHODS = flags.DEFINE_list("methods", ["contiguous", "greedy", "anti_correlation", "search", "replicas",
                                         "replicas_search"], "Placement methods (see METHODS).")
_DEVICES = flags.DEFINE_list("devices", ["2", "4", "8"], "Expert-axis sizes D (must divide the 8 devices).")
_BATCHES = flags.DEFINE_integer("batches", 64, "Token batches in the trace (first half fits, second tests).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_TOPICS = flags.DEFINE_integer("topics", 8, "Random model only: token topics mixed per batch.")
_ROUTER_SCALE = flags.DEFINE_float("router_scale", 8.0, "Random model only: router weights times this.")
_EXTRA_SLOTS = flags.DEFINE_integer("extra_slots_per_device", 1, "Replicas: spare expert slots per device.")
_WEIGHT = flags.DEFINE_float("anti_correlation_weight", 0.5, "w in mean_load + w * correlation.")
_RESTARTS = flags.DEFINE_integer("search_restarts", 32, "search: perturb-and-descend rounds.")
_THROUGHPUT = flags.DEFINE_boolean("throughput", True, "Measure forward throughput on the CPU mesh.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes over the held-out batches (median reported).")
_SEED = flags.DEFINE_integer("seed", 0, "Random model only: seed for the model and the token batches.")
_BENCHMARK = flags.DEFINE_boolean("search_benchmark", True, "Time search at 256 experts, 64 devices, 1000 batches.")
_BENCH_SHAPE = flags.DEFINE_list("search_benchmark_shape", ["256", "64", "1000"],
                                 "experts, devices, historical batches of the search benchmark.")

# The random model: small enough for the CPU, enough experts for placement to matter.
RANDOM_MODEL = dict(architecture="mixtral", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=32, intermediate_size=256, num_experts=32, num_experts_per_tok=2,
                    moe_intermediate_size=128, norm_topk_prob=True, max_position_embeddings=1024,
                    moe_layers=(True,) * 4)


def load_model():
    if _CHECKPOINT.value:
        return moejax.load_pretrained(_CHECKPOINT.value), f"checkpoint {_CHECKPOINT.value}"
    model = moejax.random_model(moejax.ModelConfig(**RANDOM_MODEL), seed=_SEED.value)
    for block in model.moe_blocks():
        block.router[...] = block.router[...] * _ROUTER_SCALE.value
    return model, f"random model {RANDOM_MODEL}, router weights x{_ROUTER_SCALE.value}"


def held_out_batches(checkpoint: str) -> tuple[list[np.ndarray], dict]:
    """--batches batches of --batch_size consecutive --seq_len windows of the --split token stream, in
    document order (so the fitting half and the test half are different documents)."""
    from moejax import data

    tokenizer = moejax.load_tokenizer(checkpoint)
    if tokenizer is None:
        raise app.UsageError(f"checkpoint {checkpoint!r} has no tokenizer.json to read the held-out text with")
    config = _CONFIG.value
    splits = data.split_documents(data.load_documents(config.corpus), config.validation_fraction,
                                  config.test_fraction)
    separator = tokenizer.token_to_id(data.END_OF_DOCUMENT)
    stream = data.token_stream(data.encode_documents(tokenizer, splits[_SPLIT.value]),
                               separator if separator is not None else 0)
    windows = [w for w in data.chunks(stream, _SEQ_LEN.value) if len(w) == _SEQ_LEN.value]
    per_batch = _BATCH_SIZE.value
    if len(windows) < _BATCHES.value * per_batch:
        raise app.UsageError(f"the {_SPLIT.value} split has {len(stream)} tokens: {len(windows)} windows of "
                             f"{_SEQ_LEN.value}, fewer than --batches x --batch_size = {_BATCHES.value * per_batch}")
    batches = [np.stack(windows[i * per_batch:(i + 1) * per_batch]).astype(np.int32) for i in range(_BATCHES.value)]
    used = _BATCHES.value * per_batch * _SEQ_LEN.value
    return batches, {"corpus": config.corpus, "split": _SPLIT.value, "documents": len(splits[_SPLIT.value]),
                     "split_tokens": int(len(stream)), "tokens_used": used,
                     "fraction_of_split_used": used / len(stream)}


def token_batches(vocab: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each topic is a Zipf distribution over its own random ordering of the vocabulary; each batch draws
    its sequences from a Dirichlet mixture of topics, so the experts a topic favours rise and fall together."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64) ** -1.1
    topics = [np.zeros(vocab) for _ in range(_TOPICS.value)]
    for t in topics:
        t[rng.permutation(vocab)] = ranks / ranks.sum()
    batches = []
    for _ in range(_BATCHES.value):
        mix = rng.dirichlet(np.full(_TOPICS.value, 0.3))
        seq_topics = rng.choice(_TOPICS.value, size=_BATCH_SIZE.value, p=mix)
        batches.append(np.stack([rng.choice(vocab, size=_SEQ_LEN.value, p=topics[t]) for t in seq_topics]))
    return [b.astype(np.int32) for b in batches]


def fit(method: str, fit_loads: np.ndarray, tokens_per_batch: int, num_devices: int):
    """One layer's placement from its fitting half [B, E] of pair counts."""
    num_experts = fit_loads.shape[1]
    mean = fit_loads.mean(0)
    slots = num_experts + _EXTRA_SLOTS.value * num_devices
    if method == "contiguous":
        return pl.contiguous(num_experts, num_devices)
    if method == "greedy":
        return pl.greedy(mean, num_devices)
    if method == "anti_correlation":  # the paper's A[b, e]: the fraction of the batch's tokens routed to e
        return pl.anti_correlation(fit_loads / tokens_per_batch, num_devices, _WEIGHT.value)
    if method == "search":
        return pl.search(fit_loads, num_devices, restarts=_RESTARTS.value)
    if method == "replicas":
        return pl.replicate(mean, num_devices, slots)
    if method == "replicas_search":
        return pl.search(fit_loads, start=pl.replicate(mean, num_devices, slots), restarts=_RESTARTS.value)
    raise ValueError(f"unknown method {method!r}")


def balance_cell(method: str, num_devices: int, trace: np.ndarray, tokens_per_batch: int):
    half = trace.shape[0] // 2
    fit_trace, test_trace = trace[:half], trace[half:]
    layers, placements = [], []
    start = time.perf_counter()
    for layer in range(trace.shape[1]):
        placement = pl.as_placement(fit(method, fit_trace[:, layer], tokens_per_batch, num_devices), num_devices)
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


def throughput(model, placements, num_devices: int, batches: list[np.ndarray]) -> dict:
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
    jax.block_until_ready(_forward(graphdef, state, tokens[0]))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for t in tokens:
            jax.block_until_ready(_forward(graphdef, state, t))
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
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


def search_benchmark() -> dict:
    """search's run time at the issue's size, after a first call that compiles it, and what it buys: plain
    descent (restarts=0) and with --search_restarts perturb-and-descend rounds."""
    num_experts, num_devices, num_batches = (int(v) for v in _BENCH_SHAPE.value)
    rng = np.random.default_rng(0)
    loads = benchmark_loads(num_experts, 2 * num_batches, rng)
    fit_loads, test_loads = loads[:num_batches], loads[num_batches:]
    placements = {"contiguous": pl.contiguous(num_experts, num_devices),
                  "greedy": pl.greedy(fit_loads.mean(0), num_devices)}
    runs = []
    for restarts in dict.fromkeys([0, _RESTARTS.value]):
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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def main(argv):
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"cells": []}
    model, source = load_model()
    if _CHECKPOINT.value:
        batches, data_info = held_out_batches(_CHECKPOINT.value)
    else:
        batches = token_batches(model.config.vocab_size, np.random.default_rng(_SEED.value))
        data_info = {"corpus": f"random topic batches ({_TOPICS.value} topics)", "split": None}
    # what the trace (and every cell fitted on it) depends on: a rerun with other values starts over
    trace_key = {"source": source, "split": data_info["split"], "batches": _BATCHES.value,
                 "batch_size": _BATCH_SIZE.value, "seq_len": _SEQ_LEN.value,
                 **({} if _CHECKPOINT.value else {"seed": _SEED.value, "topics": _TOPICS.value,
                                                   "router_scale": _ROUTER_SCALE.value})}
    trace_path = os.path.join(_WORKDIR.value, "trace.npy")
    if results.get("trace_key") != trace_key:
        results = {"cells": []}
        if os.path.exists(trace_path):
            os.remove(trace_path)
    if os.path.exists(trace_path):
        trace = np.load(trace_path)
    else:
        trace = stats.load_trace(model, batches)
        np.save(trace_path, trace)
    tokens_per_batch = _BATCH_SIZE.value * _SEQ_LEN.value
    results.update({
        "source": source, "trace_shape": list(trace.shape), "tokens_per_batch": tokens_per_batch,
        "trace_max_over_mean": float(np.mean(trace.max(-1) / trace.mean(-1))),
        "trace_key": trace_key, "data": data_info, "command": " ".join(["python"] + sys.argv),
        "top_k": model.config.num_experts_per_tok, "num_experts": model.config.num_experts,
        "flags": {f: flags.FLAGS[f].value for f in ("checkpoint", "split", "batches", "batch_size", "seq_len",
                                                    "topics", "router_scale", "extra_slots_per_device",
                                                    "anti_correlation_weight", "search_restarts", "repeats",
                                                    "seed")},
        "machine": {"devices": jax.device_count(), "backend": jax.default_backend(), "cpus": os.cpu_count(),
                    "cpu_model": cpu_model(), "jax": jax.__version__, "flax": __import__("flax").__version__,
                    "numpy": np.__version__, "python": platform.python_version()}})
    todo = [(m, int(d)) for d in _DEVICES.value for m in _METHODS.value
            if not any(c["method"] == m and c["devices"] == int(d) for c in results["cells"])]
    for method, num_devices in tqdm(todo, desc="placement cells"):
        cell, placements = balance_cell(method, num_devices, trace, tokens_per_batch)
        if _THROUGHPUT.value:
            cell["throughput"] = throughput(model, placements, num_devices, batches[len(batches) // 2:])
        results["cells"].append(cell)
        write_json_atomically(path, results)
        tput = cell.get("throughput", {})
        tqdm.write(f"D={num_devices} {method:17s} Max Load {cell['max_load']:.3f}  Avg Max Load "
                   f"{cell['avg_max_load']:.3f} (fit {cell['fit_avg_max_load']:.3f})  modelled time "
                   f"{cell['modelled_time']:.2f}  " + (f"{tput['tokens_per_second']:8.0f} tok/s (bucket "
                                                       f"{tput['bucket']})" if tput else ""))
    if _BENCHMARK.value and "search_benchmark" not in results:
        bench = search_benchmark()
        results["search_benchmark"] = bench
        write_json_atomically(path, results)
        baselines = ", ".join(f"{k} {v:.4f}" for k, v in bench["held_out_avg_max_load"].items())
        for run in bench["search"]:
            print(f"search benchmark: {bench['experts']} experts on {bench['devices']} devices over "
                  f"{bench['batches']} batches, restarts={run['restarts']}: {run['seconds']:.2f} s after "
                  f"compilation (first call {run['first_call_seconds']:.2f} s; target < 2 s); held-out Avg Max "
                  f"Load {run['held_out_avg_max_load']:.4f} ({baselines})")
    plot(results["cells"], os.path.join(_WORKDIR.value, "plot.png"))
    print(f"Wrote {path} (paper, LM: Max Load and Avg Max Load from > 0.6 to < 0.4)")


if __name__ == "__main__":
    app.run(main)
