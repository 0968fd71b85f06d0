"""The machine-translation workload of Huang et al. (papers.md B) on an encoder-decoder MoE model, and
capacity-aware drop (He et al., papers.md A) judged by a translation metric.

  python experiments/translation.py --workdir=experiments/results/translation
  python experiments/translation.py --config.checkpoint=/data/nllb-moe-54b   # any nllb-moe / switch checkpoint

Model: config.checkpoint (a directory with config.json, safetensors and tokenizer.json; default the trained
default MT model, experiments/mt_model/). Pairs: the held-out split of config.corpus's function -> docstring
pairs (moejax.data.function_pairs), split by file as the default MT model was trained.

1. quality: chrF and BLEU (sacrebleu) of greedy translations, target perplexity, next to copying the source.
2. routing: decode traces (moejax.generate.decode(record_loads=True)) at each decode batch size: per decoder
   MoE layer and decode step, the fraction of experts no token chose (the paper: about 75% idle per MT-decoder
   batch), and temporal locality (how often an expert active in a step is active in the next, against how
   often any expert is active).
3. buffering: per decoder MoE layer, moejax.buffering.simulate of the decode steps (the prefill fills the
   cache) for each policy and cache size: miss rates (the paper: LIFO close to Belady).
4. placement: per stack, per MoE layer, each method fitted on the first half of the per-batch expert loads
   (encoder: per source batch; decoder: per decode step), Avg Max Load on the second half.
5. capacity: MoEPolicy(capacity_factor, drop, in_decode) in every MoE layer, encoder and decoder: chrF, the
   kept fraction of routed pairs (teacher-forced), and the modelled MoE-layer speedup on config.devices
   devices; in_decode False leaves the one-token-per-row decode steps dropless (their capacity is tiny).

Results JSON is written after every cell (a rerun skips finished ones). Settings: configs/translation.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import harness
import moejax
from moejax import buffering, data, stats, translation
from moejax.generate import decode
from moejax.results import Results


def load(config):
    from moejax import seq2seq

    model = seq2seq.load_pretrained(config.checkpoint)
    tokenizer = moejax.load_tokenizer(config.checkpoint)
    c = config.corpus
    pairs = data.split_pairs(data.function_pairs(data.load_documents(c.source)), c.validation_fraction,
                             c.test_fraction)[config.split]
    if config.pairs:
        pairs = pairs[:config.pairs]
    encoded = translation.encode_pairs(tokenizer, pairs, model.config, config.max_source_tokens,
                                       config.max_target_tokens)
    return model, tokenizer, pairs, encoded


def moe_stacks(model) -> list[str]:
    """'encoder' or 'decoder' per MoE block, in model.moe_blocks() order (the order of recorded loads)."""
    return [layer.stack for layer in model.layers if layer.is_moe]


def quality_cell(model, tokenizer, pairs, encoded, config, name: str = "dropless") -> dict:
    hypotheses = translation.translate(model, tokenizer, encoded, config.max_target_tokens, config.batch_size)
    # the targets scored against other pairs' sources: how much the model reads its source at all
    shuffled = np.random.default_rng(0).permutation(len(pairs))
    mismatched = encoded._replace(source=encoded.source[shuffled], source_mask=encoded.source_mask[shuffled])
    return {"cell": "quality", "model": name, **translation.quality(hypotheses, [p.target for p in pairs]),
            "perplexity": translation.target_perplexity(model, encoded, config.batch_size),
            "perplexity_other_sources": translation.target_perplexity(model, mismatched, config.batch_size),
            "examples": [{"source": p.source, "reference": p.target, "moejax": h}
                         for p, h in list(zip(pairs, hypotheses))[:config.examples]]}


def decode_traces(model, encoded, batch_size: int, steps: int) -> list[tuple[np.ndarray, int]]:
    """Per source batch: (routed loads int [calls, MoE blocks, E] (call 0 the prefill), decode steps run)."""
    out = []
    for i in range(0, len(encoded.source), batch_size):
        source, source_mask, _, _ = translation.trimmed(encoded.rows(slice(i, i + batch_size)))
        decoded = decode(model, [r[m].tolist() for r, m in zip(source, source_mask)], steps,
                                         record_loads=True)
        out.append((np.asarray(decoded.loads), int(decoded.steps)))
    return out


def routing_cell(model, traces, batch_size: int) -> dict:
    decoder = [i for i, s in enumerate(moe_stacks(model)) if s == "decoder"]
    idle, follow, active = [], [], []
    for loads, steps in traces:
        on = loads[1:steps + 1][:, decoder] > 0  # [decode steps, decoder MoE layers, E]
        if not len(on):
            continue
        idle.append(1 - on.mean(axis=(0, 2)))
        active.append(on.mean(axis=(0, 2)))
        if len(on) > 1:  # P(active at t+1 | active at t), per layer
            both, before = (on[1:] & on[:-1]).sum(axis=(0, 2)), on[:-1].sum(axis=(0, 2))
            follow.append(both / np.maximum(before, 1))
    return {"cell": "routing", "batch_size": batch_size, "decoder_moe_layers": len(decoder),
            "idle_fraction": np.mean(idle, 0).tolist(), "active_fraction": np.mean(active, 0).tolist(),
            "active_next_step_given_active": np.mean(follow, 0).tolist() if follow else None}


def buffering_cell(model, traces, policy: str, cache_fraction: float) -> dict:
    num_experts = model.config.num_experts
    size = max(1, round(cache_fraction * num_experts))
    decoder = [i for i, s in enumerate(moe_stacks(model)) if s == "decoder"]
    hits = misses = 0
    for loads, steps in traces:
        for layer in decoder:  # one cache per layer; each batch's generation starts it empty, the prefill fills it
            requests = [np.flatnonzero(loads[t, layer]).tolist() for t in range(steps + 1)]
            s = buffering.simulate(requests, size, policy, warmup_steps=1)
            hits, misses = hits + s.hits, misses + s.misses
    return {"cell": "buffering", "policy": policy, "cache_fraction": cache_fraction, "cache_size": size,
            "miss_rate": misses / max(hits + misses, 1), "misses": misses, "requests": hits + misses}


def placement_cell(model, traces, stack: str, method: str, devices: int, config) -> dict:
    import placement as placement_stage  # experiments/placement.py: the LM workload's fitting, reused

    blocks = [i for i, s in enumerate(moe_stacks(model)) if s == stack]
    if stack == "encoder":  # one batch of the trace per source batch: the encoder's prefill
        trace = np.stack([loads[0][blocks] for loads, _ in traces])
        tokens = int(trace[0, 0].sum() // model.config.num_experts_per_tok)
    else:  # one per decode step
        trace = np.concatenate([loads[1:steps + 1][:, blocks] for loads, steps in traces])
        tokens = config.batch_size
    if trace.shape[0] < 2:
        raise ValueError(f"placement fits on half of the {stack}'s batches and tests on the other: it needs at least "
                         f"2, and {len(traces)} source batch(es) of batch_size={config.batch_size} give {trace.shape[0]}")
    cell, _ = placement_stage.balance_cell(method, devices, trace, max(tokens, 1), config.placement)
    cell.pop("placements")
    return {"cell": "placement", "stack": stack, "batches": int(trace.shape[0]), **cell}


def capacity_cell(model, tokenizer, pairs, encoded, factor: float, drop: str, in_decode: bool, config) -> dict:
    from moejax import capacity

    policy = capacity.MoEPolicy(capacity_factor=factor, drop=drop, in_decode=in_decode)
    dropping = moejax.with_policy(model, policy)
    name = f"{drop} drop at {factor}" + ("" if in_decode else ", not in decode steps")
    cell = quality_cell(dropping, tokenizer, pairs, encoded, config, name=name)
    routed, kept = _routed_and_kept(dropping, encoded, config.batch_size)
    device_of_expert = np.arange(model.config.num_experts) * config.devices // model.config.num_experts
    cell.update(cell="capacity", capacity_factor=factor, drop=drop, in_decode=in_decode, kept_fraction=float(kept.sum() / routed.sum()),
                modelled_speedup=stats.modelled_speedup(routed, kept, device_of_expert, config.devices))
    cell.pop("examples")
    return cell


def _routed_and_kept(model, encoded, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed over teacher-forced batches: routed and kept pairs per MoE block and expert [blocks, E]."""
    graphdef, state = nnx.split(model)
    routed = kept = 0
    for i in range(0, len(encoded.source), batch_size):
        r, k = _counts(graphdef, state, *(jnp.asarray(a) for a in translation.trimmed(
            encoded.rows(slice(i, i + batch_size)))))
        routed, kept = routed + np.asarray(r), kept + np.asarray(k)
    return routed, kept


@functools.partial(jax.jit, static_argnums=0)
def _counts(graphdef, state, source, source_mask, target, target_mask):
    model = nnx.merge(graphdef, state)
    out = model.forward(source, target[:, :-1], source_mask=source_mask, decoder_mask=target_mask[:, :-1])
    moe = [(r, source_mask.reshape(-1)) for r in out.encoder_routings if r is not None]
    moe += [(r, target_mask[:, :-1].reshape(-1)) for r in out.decoder_routings if r is not None]
    k = model.config.num_experts_per_tok
    routed = jnp.stack([stats.expert_counts(r, kept=False, token_mask=m, top_k=k) for r, m in moe])
    return routed, jnp.stack([stats.expert_counts(r) for r, _ in moe])


def describe(cell: dict) -> str:
    kind = cell["cell"]
    if kind in ("quality", "capacity"):
        return f"{cell['model']}: chrF {cell['chrf']:.1f}, BLEU {cell['bleu']:.1f}, perplexity {cell['perplexity']:.2f}"
    if kind == "routing":
        return (f"decode batch {cell['batch_size']}: idle experts per step {np.mean(cell['idle_fraction']):.2f}, "
                f"active next step | active {np.mean(cell['active_next_step_given_active'] or [np.nan]):.2f} "
                f"(any expert {np.mean(cell['active_fraction']):.2f})")
    if kind == "buffering":
        return f"{cell['policy']} at {cell['cache_size']} experts: miss rate {cell['miss_rate']:.3f}"
    return f"{cell['stack']} {cell['method']} on {cell['devices']} devices: avg max load {cell['avg_max_load']:.3f}"


def main(config, workdir):
    model, tokenizer, pairs, encoded = load(config)
    settings = {k: config[k] for k in ("checkpoint", "split", "pairs", "max_source_tokens", "max_target_tokens",
                                       "batch_size")} | {"corpus": config.corpus.to_dict()}
    results = Results(workdir, settings)
    results.data.update(harness.header())
    if results.find({"cell": "baseline"}) is None:
        results.add({"cell": "baseline", "model": "copy the source", **translation.copy_baseline(pairs),
                     "pairs": len(pairs), "moe_layers": {s: moe_stacks(model).count(s) for s in ("encoder", "decoder")},
                     "num_experts": model.config.num_experts, "top_k": model.config.num_experts_per_tok})
    harness.sweep(results, [{"cell": "quality", "model": "dropless"}],
                  lambda key: quality_cell(model, tokenizer, pairs, encoded, config), describe, "quality")
    traces = {b: decode_traces(model, encoded, b, config.max_target_tokens) for b in config.decode_batch_sizes}
    harness.sweep(results, [{"cell": "routing", "batch_size": b} for b in config.decode_batch_sizes],
                  lambda key: routing_cell(model, traces[key["batch_size"]], key["batch_size"]), describe, "routing")
    trace = traces[config.batch_size] if config.batch_size in traces else decode_traces(
        model, encoded, config.batch_size, config.max_target_tokens)
    harness.sweep(results, [{"cell": "buffering", "policy": p, "cache_fraction": f}
                            for f in config.cache_fractions for p in config.policies],
                  lambda key: buffering_cell(model, trace, key["policy"], key["cache_fraction"]), describe, "buffering")
    harness.sweep(results, [{"cell": "placement", "stack": s, "method": m, "devices": d}
                            for s in ("encoder", "decoder") for d in config.placement.devices
                            for m in config.placement.methods],
                  lambda key: placement_cell(model, trace, key["stack"], key["method"], key["devices"], config),
                  describe, "placement")
    harness.sweep(results, [{"cell": "capacity", "capacity_factor": f, "drop": d, "in_decode": i}
                            for f in config.capacity_factors for d in config.drops for i in config.in_decode],
                  lambda key: capacity_cell(model, tokenizer, pairs, encoded, key["capacity_factor"], key["drop"],
                                            key["in_decode"], config), describe, "capacity")


def report_section(r: dict) -> list[str]:
    cells = r["cells"]
    find = lambda kind: [c for c in cells if c["cell"] == kind]
    base, = find("baseline")
    lines = ["## Machine translation (Huang et al. B; capacity-aware drop of He et al. A on MT)", "",
             f"{base['pairs']} held-out pairs; {base['num_experts']} experts, top-{base['top_k']}; MoE layers "
             f"{base['moe_layers']}. " + harness.PAPERS["buffering"], "",
             "| model | chrF | BLEU | target perplexity | ... given other pairs' sources |", "|---|---|---|---|---|",
             f"| copy the source | {base['chrf']:.1f} | {base['bleu']:.1f} | - | - |"]
    lines += [f"| {c['model']} | {c['chrf']:.1f} | {c['bleu']:.1f} | {c['perplexity']:.2f} | "
              f"{c.get('perplexity_other_sources', float('nan')):.2f} |" for c in find("quality") + find("capacity")]
    lines += ["", "| decode batch | experts idle per decode step (paper ~0.75) | active next step, given active | "
              "any expert active |", "|---|---|---|---|"]
    for c in find("routing"):
        follow = c["active_next_step_given_active"]
        lines.append(f"| {c['batch_size']} | {np.mean(c['idle_fraction']):.2f} | "
                     f"{'-' if follow is None else f'{np.mean(follow):.2f}'} | {np.mean(c['active_fraction']):.2f} |")
    sizes = sorted({c["cache_size"] for c in find("buffering")})
    policies = list(dict.fromkeys(c["policy"] for c in find("buffering")))
    lines += ["", "Decoder expert buffering, miss rate per cache size (experts per layer):", "",
              "| policy | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for p in policies:
        rates = {c["cache_size"]: c["miss_rate"] for c in find("buffering") if c["policy"] == p}
        lines.append(f"| {p} | " + " | ".join(f"{rates[s]:.3f}" for s in sizes) + " |")
    lines += ["", "Placement, held-out Avg Max Load (1/D is perfect balance):", "",
              "| stack | devices | method | avg max load |", "|---|---|---|---|"]
    lines += [f"| {c['stack']} | {c['devices']} | {c['method']} | {c['avg_max_load']:.3f} |" for c in find("placement")]
    lines += ["", "Capacity-aware drop in every MoE layer: kept pairs and modelled MoE-layer speedup:", "",
              "| capacity factor | drop | in decode steps | kept (teacher-forced) | modelled speedup | chrF |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c['capacity_factor']} | {c['drop']} | {'yes' if c.get('in_decode', True) else 'no'} | "
              f"{c['kept_fraction']:.3f} | {c['modelled_speedup']:.2f}x | {c['chrf']:.1f} |" for c in find("capacity")]
    return lines


if __name__ == "__main__":
    harness.run(main, workdir="workdir/translation", config="configs/translation.py")
