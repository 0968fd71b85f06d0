"""Prefill speed of moejax against transformers on one checkpoint, and the MoE layer's efficiency.

Measured side by side in one run (these machines are noisy, so only the ratios mean much; harness.interleaved_
seconds times the two sides of each ratio round robin):
  * prefill: moejax (jitted) and transformers (torch, eager) on the same checkpoint (Mixtral or OLMoE family,
    configs/bench_forward.py's variants) and tokens;
    ratio = moejax time / transformers time (target <= 1.0);
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


def bench_prefill(c) -> dict:
    import torch

    if c.torch_threads > 0:
        torch.set_num_threads(c.torch_threads)
    with tempfile.TemporaryDirectory() as directory:
        hf = hf_checkpoint(directory, c.family, vocab=c.vocab, hidden=c.hidden, ffn=c.ffn, layers=c.layers,
                           experts=c.experts, top_k=c.top_k, max_positions=4 * c.tokens)
        model = moejax.load_pretrained(directory)
    tokens = np.random.default_rng(0).integers(0, c.vocab, size=(1, c.tokens))

    def run_hf():
        with torch.no_grad():
            return hf(torch.from_numpy(tokens)).logits

    jax_tokens = jnp.asarray(tokens, jnp.int32)
    ours, theirs = np.asarray(model(jax_tokens)), run_hf().numpy()  # model(...) is jitted
    max_diff = float(np.abs(ours - theirs).max())
    results = {**timed({"moejax": lambda: model(jax_tokens), "transformers": run_hf}, c.repeats),
               "max_abs_logit_diff": max_diff, "torch_threads": torch.get_num_threads()}
    results["ratio_moejax_over_transformers"] = results["moejax"]["median_ms"] / results["transformers"]["median_ms"]
    return results


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
    print(f"prefill  moejax {prefill['moejax']['median_ms']:.1f} ms   transformers "
          f"{prefill['transformers']['median_ms']:.1f} ms   ratio moejax/transformers "
          f"{prefill['ratio_moejax_over_transformers']:.2f} (target <= 1.0)   max |logit diff| "
          f"{prefill['max_abs_logit_diff']:.1e}")
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
