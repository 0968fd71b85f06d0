"""Greedy decode speed of moejax against transformers, and batch-1 decode against the memory roofline.

Per model family and batch, measured side by side in one run (harness.interleaved_seconds times every call
round robin, so a slow spell of this shared machine hits every side alike):
  * moejax.generate, once per expert storage of the config's `expert_storages` (load_pretrained's
    expert_storage: "split" experts read in place, the default "stacked" ones copied per active expert on the
    CPU) and, with cpu_devices > 1, split experts expert-parallel over that many host devices
    ("split_ep2": load_pretrained(..., expert_storage="split", mesh=make_mesh(expert=2))), and transformers'
    generate (torch, eager, its default KV cache; in a helper process, see
    bench_forward.TransformersSide), once per torch thread count of the config, on the same checkpoint and
    prompts, greedy, exactly `new_tokens` new tokens each
    (min_new_tokens on the transformers side, no stop tokens on ours), and each again with one new token (the
    prefill and its token alone). A decode step's time is the difference over new_tokens - 1 steps, so decode
    tokens/s = batch / step time; ratio = moejax step time / the fastest transformers step time (target <= 0.8).
    End-to-end tokens/s (prefill included) and each storage's first call (compiling the prefill and the decode
    loop) are recorded too;
  * the tokens-equal check: per storage, the fraction of new tokens on which moejax and transformers agree
    (1.0 expected);
  * the memory roofline at batch 1: the bytes one decode step must read (every weight but the embedding
    table and the experts not chosen: top_k experts per MoE layer; one embedding row; the KV cache's filled
    slots, on average over the steps), over the memory bandwidth measured in the same rounds (the faster of a
    jitted copy, counting bytes read and written as STREAM does, and a jitted sum, counting bytes read, each of
    an array of one token's bytes and of a larger one; this machine's L3 may hold a small model whole):
    roofline tokens/s = bandwidth / bytes; fraction = decode tokens/s / roofline tokens/s (target >= 0.5), from
    the medians of the rounds and, stricter on a shared machine, from the fastest round of each call.

Needs the test extras (torch, transformers). Settings: configs/bench_decode.py; writes WORKDIR/results.json
(one cell per model and batch; an interrupted run resumes).

  python experiments/bench_decode.py --workdir=workdir/bench_decode
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import harness
import moejax
from bench_forward import fastest, hf_checkpoint, require_test_extras, transformers_sides
from moejax.models.attention import init_cache
from moejax.results import Results


def step_bytes(model, prompt_tokens: int, new_tokens: int) -> dict:
    """The bytes one batch-1 decode step must read: {"weights", "kv_cache", "total"}."""
    c = model.config
    params = nnx.state(model, nnx.Param)
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    for block in model.moe_blocks():  # only the chosen experts' weights
        expert = sum(w.size * w.dtype.itemsize for w in jax.tree.leaves(block.expert_weights()))
        weights -= expert * (1 - c.num_experts_per_tok / c.num_experts)
    table = model.embed_tokens[...]
    if model.lm_head is not None:  # the table is read as the head when tied; else one row of it
        weights -= table.size * table.dtype.itemsize * (1 - 1 / table.shape[0])
    # a step after the prompt and s earlier new tokens attends to prompt + s + 1 slots; mean over the steps
    mean_slots = prompt_tokens + new_tokens / 2
    cache = init_cache(c, 1, 1, model.dtype)
    per_slot = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache.layers))
    kv = per_slot * mean_slots
    return {"weights": int(weights), "kv_cache": int(kv), "total": int(weights + kv)}


def bandwidth_calls(sizes: dict[str, int]) -> tuple[dict, dict]:
    """({name: call}, {name: bytes moved per call}) of the bandwidth probes: a copy and a sum of a float32
    array of each size in bytes."""
    copy, total = jax.jit(lambda a: a + 1.0), jax.jit(jnp.sum)
    calls, moved = {}, {}
    for label, size in sizes.items():
        x = jnp.arange(size // 4, dtype=jnp.float32)
        calls[f"copy_{label}"], moved[f"copy_{label}"] = (lambda x=x: copy(x)), 2 * x.nbytes
        calls[f"sum_{label}"], moved[f"sum_{label}"] = (lambda x=x: total(x)), x.nbytes
    return calls, moved


def bench_cell(config, name: str, batch: int) -> dict:
    shape = config.models[name]
    prompt = np.random.default_rng(batch).integers(1, shape.vocab, size=(batch, config.prompt_tokens)).astype(np.int32)
    with tempfile.TemporaryDirectory() as directory:
        hf_checkpoint(directory, shape.family, vocab=shape.vocab, hidden=shape.hidden, ffn=shape.ffn,
                      layers=shape.layers, experts=shape.experts, top_k=shape.top_k, heads=shape.heads,
                      kv_heads=shape.kv_heads, max_positions=1024, router_scale=config.router_scale,
                      eos_token_id=None, pad_token_id=0)
        models = {storage: moejax.load_pretrained(directory, expert_storage=storage)
                  for storage in config.expert_storages}
        if config.cpu_devices > 1:  # every core at work: split experts expert-parallel over the host devices
            mesh = moejax.parallel.make_mesh(expert=config.cpu_devices)
            models[f"split_ep{config.cpu_devices}"] = moejax.load_pretrained(directory, expert_storage="split",
                                                                            mesh=mesh)
        hf = transformers_sides(directory, config.torch_threads)
    try:
        return timed_cell(config, name, batch, models, hf, prompt)
    finally:
        for side in hf.values():
            side.close()


def timed_cell(config, name: str, batch: int, models: dict, hf: dict, prompt: np.ndarray) -> dict:
    """models: expert storage -> the moejax model loaded with it; hf: transformers_sides (one per thread count)."""
    shape = config.models[name]
    p, n = config.prompt_tokens, config.new_tokens

    def ours(storage, new):
        return lambda: np.asarray(moejax.generate(models[storage], prompt, new, stop_tokens=(), cache_size=p + n))

    def theirs(side, new):
        return lambda: hf[side].generate(prompt, new)

    expected = theirs(next(iter(hf)), n)()
    equal, first_call = {}, {}
    for storage in models:  # each storage's first call compiles its prefill and decode loop
        start = time.perf_counter()
        tokens = ours(storage, n)()
        first_call[storage] = time.perf_counter() - start
        equal[storage] = float(np.mean(tokens == expected))
    need = step_bytes(next(iter(models.values())), p, n)  # the probes read an array of a token's bytes
    probes, moved = bandwidth_calls({"token": need["total"], "large": config.copy_mib * 2**20})
    sides = [f"moejax_{storage}" for storage in models] + list(hf)
    calls = {**{f"moejax_{s}": ours(s, n) for s in models}, **{f"moejax_{s}_prefill": ours(s, 1) for s in models},
             **{side: theirs(side, n) for side in hf}, **{f"{side}_prefill": theirs(side, 1) for side in hf},
             **probes}
    rounds = harness.interleaved_seconds(calls, config.repeats)
    times = {k: float(np.median(t)) for k, t in rounds.items()}
    cell = {"model": name, "batch": batch, "shape": shape.to_dict(), "tokens_equal": equal,
            "first_call_seconds": first_call, "transformers_sides": {side: hf[side].info for side in hf},
            "transformers_in": "helper processes (bench_forward.TransformersSide)",
            "seconds": times, "min_seconds": {k: float(np.min(t)) for k, t in rounds.items()}}
    best = cell["min_seconds"]
    step = {(side, of): max(t[side] - t[f"{side}_prefill"], 1e-9) / (n - 1)
            for side in sides for of, t in (("median", times), ("best", best))}
    for side in sides:
        cell[side] = {"step_ms": step[side, "median"] * 1e3, "decode_tokens_per_s": batch / step[side, "median"],
                      "end_to_end_tokens_per_s": batch * n / times[side],
                      "best_step_ms": step[side, "best"] * 1e3}
    baseline = cell["baseline"] = fastest({side: cell[side]["step_ms"] for side in hf})
    cell["ratio_moejax_over_transformers"] = {s: cell[f"moejax_{s}"]["step_ms"] / cell[baseline]["step_ms"]
                                              for s in models}
    cell["bandwidth_gb_s"] = {k: moved[k] / times[k] / 1e9 for k in probes}
    cell["best_bandwidth_gb_s"] = {k: moved[k] / best[k] / 1e9 for k in probes}
    if batch == 1:
        # "fraction": medians of the decode and the probes; "best_fraction": the fastest round of each, the
        # machine at its least loaded (the stricter roofline on a shared machine)
        roofline = max(cell["bandwidth_gb_s"].values()) * 1e9 / need["total"]
        best_roofline = max(cell["best_bandwidth_gb_s"].values()) * 1e9 / need["total"]
        cell["roofline"] = {"bytes_per_token": need, "tokens_per_s": roofline, "best_tokens_per_s": best_roofline,
                            "fraction": {s: cell[f"moejax_{s}"]["decode_tokens_per_s"] / roofline for s in models},
                            "best_fraction": {s: 1e3 / cell[f"moejax_{s}"]["best_step_ms"] / best_roofline
                                              for s in models}}
    return cell


def describe(cell: dict) -> str:
    theirs = ", ".join(f"{cell[side]['decode_tokens_per_s']:.1f} tok/s ({cell[side]['step_ms']:.2f} ms/step) with "
                       f"{info['torch_threads']} torch threads" for side, info in cell["transformers_sides"].items())
    lines = [f"{cell['model']:>8} batch {cell['batch']:>2}: transformers {theirs}"]
    for storage, ratio in cell["ratio_moejax_over_transformers"].items():
        ours = cell[f"moejax_{storage}"]
        what = f"{storage} experts" if storage in ("split", "stacked") else \
            f"split experts, expert-parallel on {storage.removeprefix('split_ep')} host devices"
        lines.append(f"{'':>8}  moejax, {what}: {ours['decode_tokens_per_s']:7.1f} tok/s "
                     f"({ours['step_ms']:.2f} ms/step)  ratio to the fastest transformers {ratio:.2f} "
                     f"(target <= 0.8)  tokens equal "
                     f"{cell['tokens_equal'][storage]:.3f}  first call {cell['first_call_seconds'][storage]:.1f} s")
    if "roofline" in cell:
        r = cell["roofline"]
        fractions = ", ".join(f"{s} {f:.2f} (best rounds {r['best_fraction'][s]:.2f})" for s, f in r["fraction"].items())
        lines.append(f"{'':>8}  roofline: {r['bytes_per_token']['total'] / 1e6:.1f} MB/token at "
                     f"{max(cell['bandwidth_gb_s'].values()):.1f} GB/s -> {r['tokens_per_s']:.0f} tok/s (best rounds "
                     f"{r['best_tokens_per_s']:.0f}); moejax at {fractions} of it (target >= 0.5)")
    return "\n".join(lines)


def main(config, workdir):
    require_test_extras("bench_decode")
    results = Results(workdir, settings=config.to_dict())
    results.data.update(harness.header())
    print(f"machine: {harness.describe(results.data['machine'])}")
    print(f"{config.prompt_tokens} prompt tokens, {config.new_tokens} new tokens, greedy")
    keys = [{"model": name, "batch": b} for name in config.models for b in config.batches]
    harness.sweep(results, keys, lambda key: bench_cell(config, key["model"], key["batch"]), describe, "decode cells")
    for cell in results.cells:
        print(describe(cell))
    print(f"Wrote {results.path}")


if __name__ == "__main__":
    harness.run(main, workdir="workdir/bench_decode")
