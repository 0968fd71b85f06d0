"""Expert Buffering (papers.md B): cache size x eviction policy on decode traces, and measured decode latency.

1. Traces: greedy generation from real prompts with every expert resident (buffering.record_trace with
   next-layer prediction on): per MoE layer, per forward call (the prefill, then each decode step), the
   active experts, and the experts the next-layer predictor named for it.
2. Sweep (simulator, exact): for every cache size and policy (with and without prefetch), the decode steps'
   misses with the cache as the prefill left it; miss rate, bytes copied host -> device per token, and the
   device memory the slots hold.
3. Measured, side by side: buffering.generate with real host -> device copies for a subset of cells, with
   moejax.generate with every expert resident (one jitted loop) and a buffered run with every expert
   resident (the same layer loop without copies), timed round-robin (a compiling round, then --repeats
   rounds; medians), so the machine's drift hits every cell alike. Each cell's ratio to both baselines is
   stored and printed; the Expert Buffering target is lifo at half the experts <= 1.5x all-resident. A
   measured run's decode misses must equal the simulator's (checked, stored).

Model: --checkpoint (any load_pretrained directory; default the trained default model, prompts from the
validation split of its corpus), or --checkpoint= (empty) for a random model with router weights scaled up
so routing is decisive, and random prompts. Results JSON is written after every cell (a rerun skips
finished ones) with a PNG plot beside it.

  python experiments/buffering.py --workdir=experiments/results/buffering
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

import moejax
from moejax.results import write_json_atomically
from moejax import buffering

_WORKDIR = flags.DEFINE_string("workdir", "workdir/buffering", "Where results.json and plot.png go.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "experiments/default_model",
                                  "A load_pretrained directory; empty: a random model.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Sequences decoded together.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence (decode steps + 1).")
_SIZES = flags.DEFINE_list("cache_sizes", ["1", "2", "4", "6", "8", "12", "16", "20", "24", "28", "32"],
                           "Expert slots per MoE layer for the simulated sweep.")
_MEASURED_SIZES = flags.DEFINE_list("measured_sizes", ["4", "8", "16", "24"],
                                    "Cache sizes whose latency is measured with real copies.")
_POLICIES = flags.DEFINE_list("policies", list(buffering.POLICIES), "Eviction policies.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measured cell (median reported).")
_ROUTER_SCALE = flags.DEFINE_float("router_scale", 8.0, "Random model only: router weights times this.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random model and prompt choice.")
_HIDDEN = flags.DEFINE_integer("hidden_size", 128, "Random model only: model width.")
_EXPERT_WIDTH = flags.DEFINE_integer("moe_intermediate_size", 64, "Random model only: expert FFN width.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Random model only: weight dtype.")

RANDOM_MODEL = dict(architecture="mixtral", vocab_size=2048, hidden_size=128, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=32, intermediate_size=256, num_experts=32, num_experts_per_tok=4,
                    moe_intermediate_size=64, norm_topk_prob=True, max_position_embeddings=1024,
                    moe_layers=(True,) * 3)


def load_model_and_prompts(rng: np.random.Generator):
    length, batch = _PROMPT_LEN.value, _BATCH.value
    if not _CHECKPOINT.value:
        config = dict(RANDOM_MODEL, hidden_size=_HIDDEN.value, moe_intermediate_size=_EXPERT_WIDTH.value,
                      intermediate_size=4 * _EXPERT_WIDTH.value, head_dim=_HIDDEN.value // RANDOM_MODEL["num_heads"])
        model = moejax.random_model(moejax.ModelConfig(**config), seed=_SEED.value, dtype=jnp.dtype(_DTYPE.value))
        for block in model.moe_blocks():
            block.router[...] = block.router[...] * _ROUTER_SCALE.value
        prompts = rng.integers(1, RANDOM_MODEL["vocab_size"], size=(batch, length)).astype(np.int32)
        return model, prompts, f"random model {config}, {_DTYPE.value}, router weights x{_ROUTER_SCALE.value}, random prompts"
    from moejax import data  # the corpus only matters for a trained checkpoint

    model = moejax.load_pretrained(_CHECKPOINT.value)
    tokenizer = moejax.load_tokenizer(_CHECKPOINT.value)
    documents = data.split_documents(data.load_documents("stdlib"))["validation"]
    stream = data.token_stream(data.encode_documents(tokenizer, documents), tokenizer.token_to_id(data.END_OF_DOCUMENT))
    starts = rng.choice(len(stream) - length, size=batch, replace=False)
    prompts = np.stack([stream[s:s + length] for s in starts]).astype(np.int32)
    return model, prompts, (f"checkpoint {_CHECKPOINT.value}; prompts: {batch} windows of {length} tokens at random "
                            "offsets of the stdlib validation split")


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


def buffered_run(model, store, prompts, size, policy, prefetch, trace):
    """One generation with a fresh buffered model (cold cache; the prefill is not timed) -> (run, model)."""
    buffered = buffering.BufferedModel(model, size, policy, future=trace if policy == "belady" else None,
                                       prefetch=prefetch, store=store)
    return buffering.generate(buffered, prompts, _NEW_TOKENS.value), buffered


def jitted_seconds_per_step(model, prompts) -> float:
    """moejax.generate (one jitted decode loop), decode only: (time for new_tokens - time for 1) / steps."""
    times = []
    for new_tokens in (_NEW_TOKENS.value, 1):
        start = time.perf_counter()
        jax.block_until_ready(moejax.generate(model, prompts, max_new_tokens=new_tokens))
        times.append(time.perf_counter() - start)
    return (times[0] - times[1]) / (_NEW_TOKENS.value - 1)


def measured_cell(run, expert_device_bytes, seconds, size, policy, prefetch, trace, results):
    """A cell's record: median decode seconds per step (batch_size tokens) over the timed rounds, where the
    last round's time went (BufferedGeneration.decode_breakdown), its decode misses against the simulator's,
    its tokens against moejax.generate's."""
    decode = sum((run.stats[l] - run.prefill_stats[l] for l in run.stats), buffering.CacheStats())
    simulated = sum((buffering.simulate(trace[l], size, policy, warmup_steps=1,
                                        prefetch=run.predictions[l] if prefetch else None) for l in trace),
                    buffering.CacheStats())
    return {"policy": policy, "cache_size": size, "prefetch": prefetch,
            "seconds_per_step": statistics.median(seconds[1:]), "all_seconds_per_step": seconds,
            "decode_misses": decode.misses, "decode_prefetch_loads": decode.prefetch_loads,
            "decode_bytes_moved_per_step": decode.bytes_moved / (_NEW_TOKENS.value - 1),
            "simulator_agrees": (decode.misses, decode.prefetch_loads) == (simulated.misses, simulated.prefetch_loads),
            "same_tokens_as_resident": bool(np.array_equal(run.tokens, results["resident_tokens"])),
            "expert_device_bytes": expert_device_bytes,
            "last_round_ms_per_step": {k: v * 1e3 / (_NEW_TOKENS.value - 1) for k, v in run.decode_breakdown.items()}}


def main(argv):
    del argv
    os.makedirs(_WORKDIR.value, exist_ok=True)
    path = os.path.join(_WORKDIR.value, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    rng = np.random.default_rng(_SEED.value)
    model, prompts, model_note = load_model_and_prompts(rng)
    c = model.config
    store = buffering.HostExpertStore(model)
    moe_layers = list(store.experts)
    decode_steps = _NEW_TOKENS.value - 1  # each generates batch_size tokens
    results.update(
        command=" ".join(["python"] + sys.argv), model=model_note,
        machine=f"{platform.platform()}, {os.cpu_count()} CPUs, backend {jax.default_backend()}, "
                f"device {jax.devices()[0].device_kind}",
        versions={"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
                  "flax": __import__("flax").__version__},
        host_memory=buffering.host_memory_kind() or "numpy (CPU backend)",
        num_experts=c.num_experts, top_k=c.num_experts_per_tok, moe_layers=len(moe_layers),
        expert_bytes=store.expert_bytes, batch_size=_BATCH.value, prompt_len=_PROMPT_LEN.value,
        new_tokens=_NEW_TOKENS.value)
    results.setdefault("sweep", {})
    results.setdefault("measured", {})

    # 1. the trace, with the next-layer predictions (they do not change what is computed)
    if "trace" not in results:
        run = buffering.generate(buffering.BufferedModel(model, c.num_experts, "lru", prefetch=True, store=store),
                                 prompts, _NEW_TOKENS.value)
        resident = np.asarray(moejax.generate(model, prompts, max_new_tokens=_NEW_TOKENS.value))
        results["trace"] = {str(l): [list(s) for s in run.trace[l]] for l in moe_layers}
        results["predictions"] = {str(l): [None if p is None else list(p) for p in run.predictions[l]]
                                  for l in moe_layers}
        results["resident_tokens"] = resident.tolist()
        results["buffered_resident_same_tokens"] = bool(np.array_equal(run.tokens, resident))
        active = [len(s) for l in moe_layers for s in run.trace[l][1:]]
        results["active_experts_per_decode_step"] = {"mean": float(np.mean(active)), "max": int(max(active))}
        write_json_atomically(path, results)
    trace = {int(l): [tuple(s) for s in steps] for l, steps in results["trace"].items()}
    predictions = {int(l): [None if p is None else tuple(p) for p in steps]
                   for l, steps in results["predictions"].items()}

    # 2. the simulated sweep
    cells = [(int(s), p, f) for s in _SIZES.value for p in _POLICIES.value for f in (False, True)]
    for size, policy, prefetch in tqdm(cells, desc="sweep"):
        key = f"{policy}/{size}/{'prefetch' if prefetch else 'demand'}"
        if key not in results["sweep"]:
            results["sweep"][key] = sweep_cell(trace, predictions, size, policy, prefetch, store.expert_bytes,
                                               decode_steps)
            write_json_atomically(path, results)

    # 3. measured latency, every cell side by side (measured together, so a rerun measures all or none)
    resident_key = f"lru/{c.num_experts}/demand"
    cells = [(c.num_experts, "lru", False)] + [
        (int(s), p, f) for s in _MEASURED_SIZES.value for p in _POLICIES.value for f in (False, True)
        if not (f and p != "lifo") and int(s) < c.num_experts]  # prefetch measured with the paper's policy only
    keys = [f"{policy}/{size}/{'prefetch' if prefetch else 'demand'}" for size, policy, prefetch in cells]
    if set(keys + ["resident_jitted"]) - set(results["measured"]):
        seconds = {key: [] for key in keys + ["resident_jitted"]}
        runs = {}
        for _ in tqdm(range(_REPEATS.value + 1), desc="measured rounds (the first compiles)"):
            seconds["resident_jitted"].append(jitted_seconds_per_step(model, prompts))
            for key, (size, policy, prefetch) in zip(keys, cells):
                run, buffered = buffered_run(model, store, prompts, size, policy, prefetch, trace)
                runs[key] = (run, buffered.expert_device_bytes())  # the model goes: its slots free device memory
                seconds[key].append(run.decode_seconds / decode_steps)
        jitted = statistics.median(seconds["resident_jitted"][1:])
        results["measured"] = {"resident_jitted": {
            "seconds_per_step": jitted, "all_seconds_per_step": seconds["resident_jitted"],
            "note": "moejax.generate (one jitted decode loop): (time for new_tokens - time for 1) / decode steps",
            "expert_device_bytes": c.num_experts * store.expert_bytes * len(moe_layers)}}
        for key, (size, policy, prefetch) in zip(keys, cells):
            results["measured"][key] = measured_cell(*runs[key], seconds[key], size, policy, prefetch, trace,
                                                     results)
        resident = results["measured"][resident_key]["seconds_per_step"]
        for m in results["measured"].values():
            m["over_buffered_resident"] = m["seconds_per_step"] / resident
            m["over_jitted_resident"] = m["seconds_per_step"] / jitted
        write_json_atomically(path, results)
    plot(results, os.path.join(_WORKDIR.value, "plot.png"))
    print(json.dumps({k: v for k, v in results.items() if k not in ("trace", "predictions", "resident_tokens")},
                     indent=1)[:4000])
    print("\nms per decode step, side by side (x buffered loop with every expert resident, x moejax.generate;"
          " last round: waiting for routing / policy and copies / dispatch and other):")
    for key, m in results["measured"].items():
        split = " / ".join(f"{v:.2f}" for v in m["last_round_ms_per_step"].values()) if "last_round_ms_per_step" in m else ""
        print(f"  {key:24s} {m['seconds_per_step'] * 1e3:8.2f}  {m['over_buffered_resident']:5.2f}x  "
              f"{m['over_jitted_resident']:5.2f}x  {split}")
    half = results["measured"].get(f"lifo/{c.num_experts // 2}/demand")
    if half:
        print(f"target (Expert Buffering issue): lifo at half the experts <= 1.5x all-resident: "
              f"{half['over_buffered_resident']:.2f}x the buffered loop, {half['over_jitted_resident']:.2f}x "
              f"moejax.generate")


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
    app.run(main)
