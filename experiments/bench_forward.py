"""Prefill speed of moejax against transformers on one checkpoint, and the MoE layer's efficiency.

Measured side by side in one run (these machines are noisy, so only the ratios mean much; harness.interleaved_
seconds times the two sides of each ratio round robin):
  * prefill: moejax (jitted) and transformers (torch, eager, in helper processes: TransformersSide) on the
    same checkpoint (Mixtral or OLMoE family, configs/bench_forward.py's variants) and tokens, transformers
    once per torch thread count of the config (1 and torch's default, one per core);
    ratio = moejax time / the fastest transformers time (target <= 0.8); and the compute roofline: the
    forward's useful matmul FLOPs (prefill_flops) against the rate of one FFN-shaped matmul ([tokens,
    hidden] x [hidden, 4 hidden], the best-sized of the forward's matmuls on this CPU) timed alone in the
    same rounds, by XLA and by torch at each thread count. flops / XLA's rate is the least time any XLA:CPU program doing those FLOPs can take at that
    rate, so its ratio to transformers' time bounds the prefill ratio from below;
  * MoE-layer efficiency: time of a dense SwiGLU FFN doing the same useful FLOPs (T*k rows through one
    expert-sized FFN) / time of moejax's whole MoE block (route, dispatch, experts, combine), for balanced
    routing and for skewed routing where one expert gets 3x its share (target >= 0.75).

Needs the test extras (torch, transformers); `./launch.sh bench_forward` installs them. Settings:
configs/bench_forward.py; writes WORKDIR/results.json.

  ./launch.sh bench_forward --workdir=workdir/bench_forward
"""

from __future__ import annotations

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import harness
import moejax
from moejax.results import Results


def timed(calls: dict, repeats: int) -> dict[str, dict]:
    """{name: median and best ms} of calls timed side by side after one warm-up round."""
    times = harness.interleaved_seconds(calls, repeats)
    return {name: {"median_ms": float(np.median(t) * 1e3), "min_ms": float(np.min(t) * 1e3)}
            for name, t in times.items()}


def hf_checkpoint(directory: str, family: str, *, vocab: int, hidden: int, ffn: int, layers: int, experts: int,
                  top_k: int, max_positions: int, heads: int = 8, kv_heads: int = 4, router_scale: float = 1.0,
                  **config):
    """A random transformers model of `family` ("mixtral", "olmoe") and shape, its routers' weights times
    router_scale (a scaled-up router chooses by wide margins, which float rounding cannot flip), saved to
    `directory`. `config`: further fields of the transformers config."""
    import torch
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts_per_tok=top_k,
                  max_position_embeddings=max_positions, **config)
    if family == "mixtral":
        config, model_class = transformers.MixtralConfig(num_local_experts=experts, **common), "MixtralForCausalLM"
    elif family == "olmoe":
        config, model_class = transformers.OlmoeConfig(num_experts=experts, **common), "OlmoeForCausalLM"
    else:
        raise ValueError(f"unknown model family {family!r} (mixtral, olmoe)")
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    if router_scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                    p.mul_(router_scale)
    model.save_pretrained(directory)
    return model


def require_test_extras(script: str) -> None:
    """A UsageError naming what to install where torch or transformers (the comparisons' other side) is missing."""
    from absl import app

    try:
        import torch  # noqa: F401  (harness.machine records its version)
        import transformers  # noqa: F401
    except ImportError as e:
        raise app.UsageError(f"{script} compares against transformers and needs the test extras ({e}): "
                             "pip install -e '.[test]' (./launch.sh test and ./launch.sh bench_forward install "
                             "them)") from None


class TransformersSide:
    """transformers (torch, eager) on a checkpoint in a helper process with `threads` torch threads (0: torch's
    default, one per core), driven over a pipe. Why a process of its own: in one process, XLA:CPU's and
    torch's thread pools spin while the other works and slow both several-fold on a 2-core machine. Each
    call blocks until the helper is done, so round-robin timing works as in-process."""

    def __init__(self, directory: str, threads: int = 0):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_transformers_helper, args=(directory, threads, child),
                                       daemon=True)
        self.process.start()
        self.info = self.connection.recv()  # loaded: torch threads, experts implementation

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy generate, exactly new_tokens new tokens per row -> int [B, new_tokens]."""
        self.connection.send(("generate", prompt, new_tokens))
        return self.connection.recv()

    def matmul(self, shape: tuple[int, int, int], times: int) -> None:
        """torch's float32 [m, k] x [k, n] product (shape (m, k, n)) `times` times over, its operands made once
        per shape (several per call: the helper's wake-up costs a short product more than it takes)."""
        self.connection.send(("matmul", shape, times))
        return self.connection.recv()

    def forward(self, tokens: np.ndarray, logits: bool = False) -> np.ndarray | None:
        """The model's forward (a prefill); its logits only where asked (the pipe would time them)."""
        self.connection.send(("forward", tokens, logits))
        return self.connection.recv()

    def close(self):
        self.connection.send(None)
        self.process.join()


def _transformers_helper(directory: str, threads: int, connection) -> None:
    import torch
    import transformers

    if threads > 0:
        torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    connection.send({"torch_threads": torch.get_num_threads(),
                     "hf_experts_implementation": getattr(model.config, "_experts_implementation", None)})
    operands = {}
    while (request := connection.recv()) is not None:
        kind, tokens, option = request
        if kind == "matmul":
            m, k, n = tokens
            a, b = operands.setdefault(tokens, (torch.randn(m, k), torch.randn(k, n)))
            for _ in range(option):
                torch.mm(a, b)
            connection.send(None)
            continue
        tokens = torch.from_numpy(tokens.astype(np.int64))
        with torch.no_grad():
            if kind == "forward":
                out = model(tokens).logits
                connection.send(out.numpy() if option else None)
            else:
                out = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                     max_new_tokens=option, min_new_tokens=option, pad_token_id=0)
                connection.send(out[:, tokens.shape[1]:].numpy())


def transformers_sides(directory: str, thread_counts) -> dict[str, TransformersSide]:
    """{"transformers_t{threads}": a TransformersSide} for each torch thread count (0: torch's default)."""
    return {f"transformers_t{t}": TransformersSide(directory, t) for t in thread_counts}


def fastest(times: dict[str, float], prefix: str = "transformers_t") -> str:
    """The name of the fastest of the calls whose names start with prefix: transformers at its best thread
    count on this machine, the baseline every ratio is taken against."""
    return min((name for name in times if name.startswith(prefix)), key=times.__getitem__)


def prefill_flops(config: moejax.ModelConfig, tokens: int) -> dict[str, float]:
    """Useful matmul FLOPs (2 per multiply-add) of one causal forward over `tokens` tokens, by part: the
    attention projections, the scores and values of the causal triangle (each query against itself and
    the keys before it), routers, routed experts (top-k of each token), shared experts, dense FFNs, the
    LM head of every position. Elementwise work, norms and softmaxes are not counted."""
    c = config
    if c.is_mla or c.sliding_window or c.attention_chunk_size:
        raise ValueError(f"prefill_flops counts full causal attention of standard heads; {c.architecture} uses "
                         "latent attention, sliding windows or chunks")
    d, t = c.hidden_size, tokens
    gated = 3 if c.moe_gated else 2  # gate, up and down projections; ungated: up and down
    moe = sum(c.moe_layers) if c.moe_layers else 0
    dense = c.num_layers - moe
    projections = 2 * t * d * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    parts = {
        "attention_projections": c.num_layers * projections,
        "attention_scores_values": c.num_layers * 2 * 2 * c.num_heads * c.head_dim * t * (t + 1) / 2,
        "routers": moe * 2 * t * d * c.num_experts,
        "routed_experts": moe * c.num_experts_per_tok * t * gated * 2 * d * c.moe_intermediate_size,
        "shared_experts": moe * t * 3 * 2 * d * c.shared_expert_intermediate_size,
        "dense_ffns": dense * t * 3 * 2 * d * c.intermediate_size,
        "lm_head": 2 * t * d * c.vocab_size,
    }
    return {**{k: float(v) for k, v in parts.items()}, "total": float(sum(parts.values()))}


PROBE_TIMES = 8  # products per timed probe call


def bench_prefill(c) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        hf_checkpoint(directory, c.family, vocab=c.vocab, hidden=c.hidden, ffn=c.ffn, layers=c.layers,
                      experts=c.experts, top_k=c.top_k, max_positions=4 * c.tokens)
        model = moejax.load_pretrained(directory)
        sides = transformers_sides(directory, c.torch_threads)
    try:
        tokens = np.random.default_rng(0).integers(0, c.vocab, size=(1, c.tokens))
        jax_tokens = jnp.asarray(tokens, jnp.int32)
        ours = np.asarray(model(jax_tokens))  # model(...) is jitted
        max_diff = max(float(np.abs(ours - side.forward(tokens, logits=True)).max()) for side in sides.values())
        # the compute roofline's probes: one FFN-shaped matmul alone, each side (the LM head's wider output
        # runs slower per FLOP here, on both sides)
        shape = (c.tokens, c.hidden, 4 * c.hidden)
        a, b = (jnp.asarray(np.random.default_rng(1).normal(size=s), jnp.float32) for s in (shape[:2], shape[1:]))
        xla_matmul = jax.jit(jnp.matmul)
        calls = {"moejax": lambda: model(jax_tokens),
                 **{name: functools.partial(side.forward, tokens) for name, side in sides.items()}}
        results = {**timed(calls, c.repeats), "max_abs_logit_diff": max_diff,
                   "torch_threads": {name: side.info["torch_threads"] for name, side in sides.items()}}
        # each probe in rounds of its own: interleaved with the other library, a short matmul pays for the
        # other's thread pool still spinning after its call (both probes read 1.5-2.5x slower that way)
        probes = {"matmul_xla": lambda: [xla_matmul(a, b) for _ in range(PROBE_TIMES)][-1],
                  **{f"matmul_{name}": functools.partial(side.matmul, shape, PROBE_TIMES)
                     for name, side in sides.items()}}
        for name, call in probes.items():
            results.update(timed({name: call}, c.repeats))
    finally:
        for side in sides.values():
            side.close()
    best = results["baseline"] = fastest({name: results[name]["median_ms"] for name in sides})
    results["ratio_moejax_over_transformers"] = results["moejax"]["median_ms"] / results[best]["median_ms"]
    results["roofline"] = compute_roofline(results, prefill_flops(model.config, c.tokens),
                                           2 * float(np.prod(shape)) * PROBE_TIMES, list(sides))
    return results


def compute_roofline(results: dict, flops: dict, probe_flops: float, sides: list[str]) -> dict:
    """GFLOP/s of each side's prefill and matmul probe (medians), each prefill's fraction of its library's
    probe rate, and the bound: the least time moejax's useful FLOPs take at XLA's probe rate, over the
    fastest transformers' prefill time (the prefill ratio cannot go below it at that rate)."""
    rate = lambda f, name: f / (results[name]["median_ms"] * 1e-3) / 1e9
    out = {"flops": flops, "probe_flops": float(probe_flops), "matmul_xla_gflops": rate(probe_flops, "matmul_xla"),
           "moejax_gflops": rate(flops["total"], "moejax")}
    out["moejax_fraction_of_xla_matmul"] = out["moejax_gflops"] / out["matmul_xla_gflops"]
    for name in sides:
        out[f"{name}_gflops"] = rate(flops["total"], name)
        out[f"matmul_{name}_gflops"] = rate(probe_flops, f"matmul_{name}")
        out[f"{name}_fraction_of_torch_matmul"] = out[f"{name}_gflops"] / out[f"matmul_{name}_gflops"]
    least_ms = flops["total"] / (out["matmul_xla_gflops"] * 1e9) * 1e3
    out["least_moejax_ms_at_xla_matmul_rate"] = least_ms
    out["ratio_bound"] = least_ms / results[results["baseline"]]["median_ms"]
    return out


def routed_inputs(rng, tokens: int, hidden: int, experts: int, top_k: int, loads: np.ndarray) -> np.ndarray:
    """Inputs whose first `experts` features are the router logits (the router is set to the identity
    there), with expert e chosen by exactly loads[e] (token, expert) pairs."""
    # Deal the pairs, sorted by expert, round-robin over tokens: no expert has more than `tokens` pairs,
    # so no token gets the same expert twice. Then shuffle which token is which.
    pairs = np.repeat(np.arange(experts), loads)
    choice = pairs.reshape(top_k, tokens).T[rng.permutation(tokens)]
    x = rng.normal(size=(tokens, hidden)).astype(np.float32) * 0.1
    x[:, :experts] = 0.0
    for j in range(top_k):
        x[np.arange(tokens), choice[:, j]] = 10.0 - j  # wide margins: the intended experts win
    return x


def bench_moe_layer(c) -> dict:
    tokens, d, f, e, k = c.tokens, c.hidden, c.ffn, c.experts, c.top_k
    config = moejax.ModelConfig(architecture="mixtral", vocab_size=128, hidden_size=d, num_layers=1, num_heads=8,
                                num_kv_heads=4, head_dim=d // 8, moe_layers=(True,), num_experts=e,
                                num_experts_per_tok=k, moe_intermediate_size=f, norm_topk_prob=True)
    block = moejax.random_model(config, seed=0).moe_blocks()[0]
    router = np.zeros((d, e), np.float32)
    router[:e, :e] = np.eye(e)
    block.router[...] = jnp.asarray(router)
    rng = np.random.default_rng(0)
    mean = tokens * k // e
    hot = int(c.hot_share * mean)
    skewed = np.full(e, (tokens * k - hot) // (e - 1))
    skewed[0] = hot
    skewed[-1] += tokens * k - skewed.sum()
    cases = {"balanced": np.full(e, mean), f"hot{c.hot_share:g}x": skewed}

    # The dense baseline: T*k rows through one SwiGLU FFN of the expert's size (the same useful FLOPs).
    wg, wu, wd = (jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02) for s in ((d, f), (d, f), (f, d)))
    dense_x = jnp.asarray(rng.normal(size=(tokens * k, d)).astype(np.float32))
    dense = jax.jit(lambda x: (jax.nn.silu(x @ wg) * (x @ wu)) @ wd)
    graphdef, state = nnx.split(block)
    moe = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m)[0])  # jax.jit: no per-call graph bookkeeping
    mask = jnp.ones((tokens,), bool)
    calls, loads_of = {"dense_swiglu": lambda: dense(dense_x)}, {}
    for name, loads in cases.items():
        x = jnp.asarray(routed_inputs(rng, tokens, d, e, k, loads))
        counts = np.bincount(np.asarray(block(x, mask)[1].experts).ravel(), minlength=e)  # dropless: the routed pairs
        assert (counts == loads).all(), (counts, loads)
        calls[name], loads_of[name] = functools.partial(moe, state, x, mask), loads.tolist()
    results = timed(calls, c.repeats)
    for name, loads in loads_of.items():
        results[name].update(loads=loads, efficiency=results["dense_swiglu"]["median_ms"] / results[name]["median_ms"])
    return results


def main(config, workdir):
    require_test_extras("bench_forward")
    results = Results(workdir)
    results.data.update(harness.header(), config=config.to_dict())
    print(f"machine: {harness.describe(results.data['machine'])}")
    print(f"shape: {config.family} family, {config.tokens} tokens, hidden {config.hidden}, ffn {config.ffn}, {config.experts} experts, "
          f"top-{config.top_k}, {config.layers} layers, vocab {config.vocab}")
    prefill = results.data["prefill"] = bench_prefill(config)
    results.save()
    theirs = ", ".join(f"{prefill[name]['median_ms']:.1f} ms with {threads} torch threads"
                       for name, threads in prefill["torch_threads"].items())
    print(f"prefill  moejax {prefill['moejax']['median_ms']:.1f} ms   transformers {theirs}   ratio moejax / "
          f"fastest transformers {prefill['ratio_moejax_over_transformers']:.2f} (target <= 0.8)   max |logit diff| "
          f"{prefill['max_abs_logit_diff']:.1e}")
    roof = prefill["roofline"]
    print(f"compute  {roof['flops']['total'] / 1e9:.1f} GFLOP useful; an FFN-shaped matmul alone: XLA "
          f"{roof['matmul_xla_gflops']:.0f} GFLOP/s, torch "
          + ", ".join(f"{roof[f'matmul_{name}_gflops']:.0f}" for name in prefill["torch_threads"])
          + f" GFLOP/s; prefill moejax {roof['moejax_gflops']:.0f} GFLOP/s "
          f"({roof['moejax_fraction_of_xla_matmul']:.2f} of XLA's), transformers "
          + ", ".join(f"{roof[f'{name}_gflops']:.0f} ({roof[f'{name}_fraction_of_torch_matmul']:.2f})"
                      for name in prefill["torch_threads"])
          + f"; at XLA's matmul rate moejax needs >= {roof['least_moejax_ms_at_xla_matmul_rate']:.1f} ms: "
          f"ratio >= {roof['ratio_bound']:.2f}")
    layer = results.data["moe_layer"] = bench_moe_layer(config)
    results.save()
    print(f"dense SwiGLU FFN with equal useful FLOPs: {layer['dense_swiglu']['median_ms']:.2f} ms")
    for name, r in layer.items():
        if name != "dense_swiglu":
            print(f"MoE layer, {name:>9} routing {r['median_ms']:.2f} ms   efficiency {r['efficiency']:.2f} "
                  f"(target >= 0.75)   loads {r['loads']}")
    print(f"Wrote {results.path}")


if __name__ == "__main__":
    harness.run(main, workdir="workdir/bench_forward")
