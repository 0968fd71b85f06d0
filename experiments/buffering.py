"""Expert Buffering (papers.md B): cache size x eviction policy on decode traces, and measured decode latency.

1. Traces: greedy generation from real prompts with every expert resident (buffering.generate with every
   expert in the cache and next-layer prediction on): per MoE layer, per forward call (the prefill, then each
   decode step), the active experts, and the experts the next-layer predictor named for it.
2. Sweep (simulator, exact): for every cache size and policy (with and without prefetch), the decode steps'
   misses with the cache as the prefill left it; miss rate, bytes copied host -> device per token, and the
   device memory the slots hold.
3. Measured, side by side: buffering.generate of a buffering.buffered model (real host -> device copies)
   for a subset of cells, with moejax.generate with every expert resident and a buffered run with every
   expert resident (the same loop, no copies), timed round-robin (a compiling round, then config.repeats
   rounds; medians), so the machine's drift hits every cell alike. A cell's decode time per step is
   (time for new_tokens - time for 1) / decode steps, for the baselines and the buffered runs alike. Each cell's ratio to both baselines is
   stored and printed; the Expert Buffering target is lifo at half the experts <= 1.5x all-resident. A
   measured run's decode misses must equal the simulator's (checked, stored).

Model: the config's checkpoint (any load_pretrained directory; default the trained default model, prompts
from the validation split of the config's corpus), or checkpoint "" for a random model with router weights
scaled up so routing is decisive, and random prompts. Results JSON is written after every cell (a rerun with
the same model and prompts skips finished ones; other ones start over) with a PNG plot beside it. Settings:
configs/buffering.py.

  python experiments/buffering.py --workdir=experiments/results/buffering
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

import jax
import numpy as np
from tqdm import tqdm

import harness
import moejax
from moejax import buffering
from moejax.results import Results

REPORT_PLOT = "miss rate against cache size per policy"
RANDOM_MODEL = dict(harness.RANDOM_MIXTRAL, num_layers=3, num_experts_per_tok=4, moe_intermediate_size=64,
                    moe_layers=(True,) * 3)


def load_model_and_prompts(config, rng: np.random.Generator):
    length, batch = config.prompt_len, config.batch_size
    if not config.checkpoint:
        r = config.random_model
        shape = dict(RANDOM_MODEL, hidden_size=r.hidden_size, moe_intermediate_size=r.moe_intermediate_size,
                     intermediate_size=4 * r.moe_intermediate_size, head_dim=r.hidden_size // RANDOM_MODEL["num_heads"])
        model = harness.random_model(shape, config.seed, r.router_scale, r.dtype)
        prompts = rng.integers(1, RANDOM_MODEL["vocab_size"], size=(batch, length)).astype(np.int32)
        return model, prompts, f"random model {shape}, {r.dtype}, router weights x{r.router_scale}, random prompts"
    model = moejax.load_pretrained(config.checkpoint)
    stream, held_out = harness.held_out_stream(moejax.load_tokenizer(config.checkpoint), config.corpus)
    starts = rng.choice(len(stream) - length, size=batch, replace=False)
    prompts = np.stack([stream[s:s + length] for s in starts]).astype(np.int32)
    return model, prompts, (f"checkpoint {config.checkpoint}; prompts: {batch} windows of {length} tokens at random "
                            f"offsets of the {held_out['corpus']} {held_out['split']} split")


def sweep_cell(trace, predictions, size: int, policy: str, prefetch: bool, expert_bytes: int, decode_steps: int):
    layers = {}
    for layer, steps in trace.items():
        stats = buffering.simulate(steps, size, policy, expert_bytes=expert_bytes, warmup_steps=1,
                                   prefetch=predictions[layer] if prefetch else None)
        layers[layer] = stats
    total = sum(layers.values(), buffering.CacheStats())
    return {"policy": policy, "cache_size": size, "prefetch": prefetch, "miss_rate": total.miss_rate,
            "misses": total.misses, "requests": total.requests, "prefetch_loads": total.prefetch_loads,
            "bytes_moved_per_step": total.bytes_moved / decode_steps,
            "prediction_recall": total.prediction_recall, "prediction_precision": total.prediction_precision,
            "expert_device_bytes": size * expert_bytes * len(trace),
            "layers": {str(k): v.to_dict() for k, v in layers.items()}}


def decode_seconds_per_step(generate, new_tokens: int) -> float:
    """Decode seconds per step of generate(max_new_tokens): (time for new_tokens - time for 1) / decode
    steps, so the prefill is not in it."""
    long = harness.wall_seconds(functools.partial(generate, new_tokens))
    return (long - harness.wall_seconds(functools.partial(generate, 1))) / (new_tokens - 1)


def copy_bandwidth(megabytes: int = 64) -> float:
    """Bytes per second of one device-side copy of a large array (read once, written once): the rate a
    host -> device copy of this backend's store can reach at best (on the CPU backend the store is in the same
    memory, so an expert's copy is such a copy)."""
    x = jax.numpy.zeros((megabytes * 2**20 // 4,), jax.numpy.float32)
    copy = jax.jit(lambda a: a + 1.0)  # one read and one write of every byte, like a slot write from the store
    harness.wall_seconds(lambda: copy(x))
    return x.nbytes / min(harness.wall_seconds(lambda: copy(x)) for _ in range(5))


def measured_cell(run, expert_device_bytes, seconds, size, policy, prefetch, low_precision, trace, results):
    """A cell's record: median decode seconds per step (batch_size tokens) over the timed rounds, its decode
    misses against the simulator's, bytes moved, its tokens against moejax.generate's."""
    decode = sum((run.stats[l] - run.prefill_stats[l] for l in run.stats), buffering.CacheStats())
    simulated = sum((buffering.simulate(trace[l], size, policy, warmup_steps=1,
                                        prefetch=run.predictions[l] if prefetch else None) for l in trace),
                    buffering.CacheStats())
    full, low = results["expert_bytes"], results["expert_bytes"] // 4  # an int8 copy: a quarter of f32
    moved = decode.misses * (low if low_precision else full) + decode.prefetch_loads * full
    return {"policy": policy, "cache_size": size, "prefetch": prefetch, "low_precision": low_precision,
            "seconds_per_step": statistics.median(seconds[1:]), "all_seconds_per_step": seconds,
            "decode_misses": decode.misses, "decode_prefetch_loads": decode.prefetch_loads,
            "decode_bytes_moved_per_step": moved / (results["new_tokens"] - 1),
            "simulator_agrees": (decode.misses, decode.prefetch_loads) == (simulated.misses, simulated.prefetch_loads),
            "same_tokens_as_resident": bool(np.array_equal(run.tokens, results["resident_tokens"])),
            "expert_device_bytes": expert_device_bytes}


def low_precision_quality(model, config, low_precision: str, cache_size: int) -> dict:
    """Perplexity on held-out windows and multiple-choice accuracy (config.low_precision_task), full precision against a
    buffered model whose demand misses are `low_precision` copies (each batch from an empty cache: every
    expert such a copy, the worst case)."""
    from moejax import evaluation

    tokenizer = moejax.load_tokenizer(config.checkpoint)
    stream, _ = harness.held_out_stream(tokenizer, config.corpus)
    windows = [stream[i:i + 256].tolist() for i in range(0, min(len(stream) - 256, 16 * 256), 256)]
    low = buffering.buffered(model, cache_size, "lifo", low_precision=low_precision)
    tasks = evaluation.read_multiple_choice(config.low_precision_task) if config.low_precision_task else []
    out = {"perplexity": {name: evaluation.perplexity(m, windows) for name, m in (("full", model), (low_precision, low))},
           "windows": len(windows)}
    if tasks:
        out["task"] = config.low_precision_task
        out["multiple_choice"] = {name: evaluation.score_multiple_choice(m, tokenizer, tasks)
                                  for name, m in (("full", model), (low_precision, low))}
    return out


def main(config, workdir):
    settings = {k: config[k] for k in ("checkpoint", "batch_size", "prompt_len", "new_tokens", "seed")}
    if config.checkpoint:
        settings["corpus"] = config.corpus.to_dict()
    else:
        settings["random_model"] = config.random_model.to_dict()
    store_results = Results(workdir, settings, on_mismatch="restart")  # a trace of other prompts starts over
    results = store_results.data
    rng = np.random.default_rng(config.seed)
    model, prompts, model_note = load_model_and_prompts(config, rng)
    c = model.config
    moe_layers = [block.layer for block in model.moe_blocks()]
    expert_bytes = buffering.expert_bytes(model)
    new_tokens = config.new_tokens
    decode_steps = new_tokens - 1  # each generates batch_size tokens (no stop token: every step runs)
    results.update(
        **harness.header(), model=model_note,
        host_memory=buffering.host_memory_kind() or "device memory (CPU backend: host and device memory are one)",
        num_experts=c.num_experts, top_k=c.num_experts_per_tok, moe_layers=len(moe_layers),
        expert_bytes=expert_bytes, batch_size=config.batch_size, prompt_len=config.prompt_len,
        new_tokens=new_tokens)
    results.setdefault("sweep", {})
    results.setdefault("measured", {})

    # 1. the trace, with the next-layer predictions (they do not change what is computed)
    if "trace" not in results:
        run = buffering.generate(model, prompts, new_tokens, cache_size=c.num_experts, policy="lru", prefetch=True,
                                 stop_tokens=())
        resident = np.asarray(moejax.generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=()))
        results["trace"] = {str(l): [list(s) for s in run.trace[l]] for l in moe_layers}
        results["predictions"] = {str(l): [None if p is None else list(p) for p in run.predictions[l]]
                                  for l in moe_layers}
        results["resident_tokens"] = resident.tolist()
        results["buffered_resident_same_tokens"] = bool(np.array_equal(run.tokens, resident))
        active = [len(s) for l in moe_layers for s in run.trace[l][1:]]
        results["active_experts_per_decode_step"] = {"mean": float(np.mean(active)), "max": int(max(active))}
        store_results.save()
    trace = {int(l): [tuple(s) for s in steps] for l, steps in results["trace"].items()}
    predictions = {int(l): [None if p is None else tuple(p) for p in steps]
                   for l, steps in results["predictions"].items()}

    # 2. the simulated sweep
    cells = [(int(s), p, f) for s in config.cache_sizes for p in config.policies for f in (False, True)]
    for size, policy, prefetch in tqdm(cells, desc="sweep"):
        key = f"{policy}/{size}/{'prefetch' if prefetch else 'demand'}"
        if key not in results["sweep"]:
            results["sweep"][key] = sweep_cell(trace, predictions, size, policy, prefetch, expert_bytes,
                                               decode_steps)
            store_results.save()

    # 3. measured latency, every cell side by side (measured together, so a rerun measures all or none)
    resident_key = f"lru/{c.num_experts}/demand"
    cells = [(c.num_experts, "lru", False, None)] + [
        (int(s), p, f, None) for s in config.measured_sizes for p in config.policies for f in (False, True)
        if not (f and p != "lifo") and int(s) < c.num_experts]  # prefetch measured with the paper's policy only
    cells += [(int(s), "lifo", False, config.low_precision) for s in config.low_precision_sizes if config.low_precision]
    keys = [f"{policy}/{size}/{'prefetch' if prefetch else 'demand'}" + (f"/{low}" if low else "")
            for size, policy, prefetch, low in cells]
    if set(keys + ["resident_jitted"]) - set(results["measured"]):
        models = {key: buffering.buffered(model, size, policy, future=trace if policy == "belady" else None,
                                          prefetch=prefetch, low_precision=low)
                  for key, (size, policy, prefetch, low) in zip(keys, cells)}

        def timed(m):  # moejax.generate itself runs a buffered model: every call starts from its empty cache
            return lambda: decode_seconds_per_step(
                lambda n: moejax.generate(m, prompts, max_new_tokens=n, stop_tokens=()), new_tokens)

        calls = {"resident_jitted": timed(model)} | {key: timed(m) for key, m in models.items()}
        bandwidth = [copy_bandwidth()]
        seconds = harness.round_robin(calls, config.repeats + 1, desc="measured rounds (the first compiles)")
        bandwidth.append(copy_bandwidth())
        jitted = statistics.median(seconds["resident_jitted"][1:])
        results["copy_bandwidth_bytes_per_s"] = max(bandwidth)
        results["measured"] = {"resident_jitted": {
            "seconds_per_step": jitted, "all_seconds_per_step": seconds["resident_jitted"],
            "note": "moejax.generate (one jitted decode loop): (time for new_tokens - time for 1) / decode steps",
            "expert_device_bytes": c.num_experts * expert_bytes * len(moe_layers)}}
        for key, (size, policy, prefetch, low) in zip(keys, cells):
            run = buffering.generate(models[key], prompts, new_tokens, stop_tokens=())  # its stats and trace
            results["measured"][key] = measured_cell(run, buffering.device_bytes(models[key]), seconds[key], size,
                                                     policy, prefetch, low, trace, results)
        resident = results["measured"][resident_key]["seconds_per_step"]
        for m in results["measured"].values():
            m["over_buffered_resident"] = m["seconds_per_step"] / resident
            m["over_jitted_resident"] = m["seconds_per_step"] / jitted
            # the physical bound: no faster than all-resident decode, nor than moving its bytes at the copy rate
            m["bound_seconds_per_step"] = max(jitted, m.get("decode_bytes_moved_per_step", 0) / max(bandwidth))
            m["over_bound"] = m["seconds_per_step"] / m["bound_seconds_per_step"]
        store_results.save()
    if config.low_precision and config.checkpoint and "low_precision_quality" not in results:
        results["low_precision_quality"] = low_precision_quality(model, config, config.low_precision,
                                                                 int(config.low_precision_sizes[0]))
        store_results.save()
    plot(results, os.path.join(workdir, "plot.png"))
    summary = {k: v for k, v in results.items() if k not in ("trace", "predictions", "resident_tokens")}
    print(json.dumps(summary, indent=1)[:4000])
    print(f"\nms per decode step, side by side (x buffered run with every expert resident, x moejax.generate, "
          f"x the bound max(all-resident, bytes / {results['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s copies)):")
    for key, m in results["measured"].items():
        print(f"  {key:28s} {m['seconds_per_step'] * 1e3:8.2f}  {m['over_buffered_resident']:5.2f}x  "
              f"{m['over_jitted_resident']:5.2f}x  {m['over_bound']:5.2f}x")
    half = results["measured"].get(f"lifo/{c.num_experts // 2}/demand")
    every = results["measured"][resident_key]
    if half:
        print(f"targets (issue 18): lifo at half the experts <= 1.5x moejax.generate: {half['over_jitted_resident']:.2f}x; "
              f"every expert resident <= 1.1x: {every['over_jitted_resident']:.2f}x")
    if "low_precision_quality" in results:
        print("low-precision quality:", json.dumps(results["low_precision_quality"]))


def report_section(r: dict) -> list[str]:
    """The reproduction report's buffering section."""
    sweep = [c for c in r["sweep"].values() if not c["prefetch"]]
    sizes = sorted({c["cache_size"] for c in sweep})
    policies = list(dict.fromkeys(c["policy"] for c in sweep))
    cell = {(c["policy"], c["cache_size"]): c for c in sweep}
    active = r.get("active_experts_per_decode_step")
    lines = ["## Expert buffering (Huang et al., papers.md B)", "",
             f"Decode miss rate per cache size (expert slots per layer, of {r['num_experts']}); host memory: "
             f"{r['host_memory']}. {harness.PAPERS['buffering']}", ""]
    if isinstance(active, dict) and "mean" in active:
        lines.append(f"Active experts per decode step and layer: mean {active['mean']:.1f}, max {active['max']}.\n")
    lines += ["| policy | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for p in policies:
        lines.append(f"| {p} | " + " | ".join(f"{cell[(p, s)]['miss_rate']:.3f}" if (p, s) in cell else "-"
                                              for s in sizes) + " |")
    measured = r.get("measured", {})
    if measured:
        lines += ["", "Measured decode latency with real copies (x: over the buffered loop with every expert "
                  "resident; target at half the experts <= 1.5x):", "",
                  "| cell | ms / step | x moejax.generate | x bound | device MiB held by experts | same tokens as all-resident |",
                  "|---|---|---|---|---|---|"]
        for name, m in measured.items():
            ratio = f"{m['over_jitted_resident']:.2f}" if "over_jitted_resident" in m else "-"
            bound = f"{m['over_bound']:.2f}" if "over_bound" in m else "-"
            lines.append(f"| {name} | {m['seconds_per_step'] * 1e3:.2f} | {ratio} | {bound} | "
                         f"{m['expert_device_bytes'] / 2**20:.2f} | {m.get('same_tokens_as_resident', '-')} |")
    return lines


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(buffering.POLICIES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for policy in buffering.POLICIES:
        for prefetch, style in ((False, "-o"), (True, "--x")):
            cells = sorted((v for v in results["sweep"].values()
                            if v["policy"] == policy and v["prefetch"] == prefetch), key=lambda v: v["cache_size"])
            if cells:
                left.plot([v["cache_size"] for v in cells], [v["miss_rate"] for v in cells], style, ms=3,
                          color=colors[policy], label=policy + (" + prefetch" if prefetch else ""))
    left.set(xlabel="cache size (expert slots per layer)", ylabel="decode miss rate (misses / requests)",
             title=f"Miss rate, {results['num_experts']} experts, top-{results['top_k']}, "
                   f"batch {results['batch_size']}")
    left.legend(fontsize=7, ncol=2)
    left.grid(alpha=0.3)
    mib = 2 ** 20
    for key, v in results["measured"].items():
        if key == "resident_jitted":
            right.axhline(v["seconds_per_step"] * 1e3, color="k", ls=":",
                          label=f"moejax.generate, all resident ({v['expert_device_bytes'] / mib:.2f} MiB)")
    for policy in buffering.POLICIES:
        for prefetch, style in ((False, "-o"), (True, "--x")):
            cells = sorted((v for k, v in results["measured"].items() if k != "resident_jitted"
                            and v["policy"] == policy and v["prefetch"] == prefetch
                            and v["cache_size"] < results["num_experts"]), key=lambda v: v["cache_size"])
            if cells:
                right.plot([v["expert_device_bytes"] / mib for v in cells],
                           [v["seconds_per_step"] * 1e3 for v in cells], style, ms=3, color=colors[policy],
                           label=policy + (" + prefetch" if prefetch else ""))
    full = results["measured"].get(f"lru/{results['num_experts']}/demand")
    if full:
        right.plot([full["expert_device_bytes"] / mib], [full["seconds_per_step"] * 1e3], "k*", ms=10,
                   label="buffered loop, every expert resident")
    right.set(xlabel="device memory held by experts (MiB)",
              ylabel=f"decode latency per step of {results['batch_size']} tokens (ms)",
              title="Measured decode latency (real host->device copies)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    harness.run(main, workdir="workdir/buffering")
