"""Prefill speed of moejax against transformers on one checkpoint, and the MoE layer's efficiency.

Measured side by side in one run (these machines are noisy, so only the ratios mean much):
  * prefill: moejax (jitted) and transformers (torch, eager) on the same Mixtral-family checkpoint and tokens;
    ratio = moejax time / transformers time (target <= 1.0);
  * MoE-layer efficiency: time of a dense SwiGLU FFN doing the same useful FLOPs (T*k rows through one
    expert-sized FFN) / time of moejax's whole MoE block (route, dispatch, experts, combine), for balanced
    routing and for skewed routing where one expert gets 3x its share (target >= 0.75).

  python experiments/bench_forward.py --json_out=experiments/results/bench_forward_cpu.json
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import moejax

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens in the prefill (batch 1).")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "hidden_size.")
_FFN = flags.DEFINE_integer("ffn", 1024, "intermediate_size of each expert.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Number of experts.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Decoder layers.")
_VOCAB = flags.DEFINE_integer("vocab", 4096, "Vocabulary size.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repeats after warm-up; the median is reported.")
_HOT_SHARE = flags.DEFINE_float("hot_share", 3.0, "Skewed routing: the hot expert's load over the mean.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the results here.")


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": float(np.median(times) * 1e3), "min_ms": float(np.min(times) * 1e3)}


def mixtral_checkpoint(directory: str):
    import torch
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=_FFN.value,
        num_hidden_layers=_LAYERS.value, num_attention_heads=8, num_key_value_heads=4,
        num_local_experts=_EXPERTS.value, num_experts_per_tok=_TOP_K.value, max_position_embeddings=4 * _TOKENS.value)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def bench_prefill(repeats: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as directory:
        hf = mixtral_checkpoint(directory)
        model = moejax.load_pretrained(directory)
    tokens = np.random.default_rng(0).integers(0, _VOCAB.value, size=(1, _TOKENS.value))

    def run_hf():
        with torch.no_grad():
            return hf(torch.from_numpy(tokens)).logits

    jax_tokens = jnp.asarray(tokens, jnp.int32)
    ours, theirs = np.asarray(model(jax_tokens)), run_hf().numpy()  # model(...) is jitted
    max_diff = float(np.abs(ours - theirs).max())
    results = {"moejax": timed(lambda: jax.block_until_ready(model(jax_tokens)), repeats),
               "transformers": timed(run_hf, repeats), "max_abs_logit_diff": max_diff,
               "torch_threads": torch.get_num_threads()}
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


def bench_moe_layer(repeats: int) -> dict:
    tokens, d, f, e, k = _TOKENS.value, _HIDDEN.value, _FFN.value, _EXPERTS.value, _TOP_K.value
    config = moejax.ModelConfig(architecture="mixtral", vocab_size=128, hidden_size=d, num_layers=1, num_heads=8,
                                num_kv_heads=4, head_dim=d // 8, moe_layers=(True,), num_experts=e,
                                num_experts_per_tok=k, moe_intermediate_size=f, norm_topk_prob=True)
    block = moejax.random_model(config, seed=0).moe_blocks()[0]
    router = np.zeros((d, e), np.float32)
    router[:e, :e] = np.eye(e)
    block.router[...] = jnp.asarray(router)
    rng = np.random.default_rng(0)
    mean = tokens * k // e
    hot = int(_HOT_SHARE.value * mean)
    skewed = np.full(e, (tokens * k - hot) // (e - 1))
    skewed[0] = hot
    skewed[-1] += tokens * k - skewed.sum()
    cases = {"balanced": np.full(e, mean), f"hot{_HOT_SHARE.value:g}x": skewed}

    # The dense baseline: T*k rows through one SwiGLU FFN of the expert's size (the same useful FLOPs).
    wg, wu, wd = (jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02) for s in ((d, f), (d, f), (f, d)))
    dense_x = jnp.asarray(rng.normal(size=(tokens * k, d)).astype(np.float32))
    dense = jax.jit(lambda x: (jax.nn.silu(x @ wg) * (x @ wu)) @ wd)
    dense_time = timed(lambda: jax.block_until_ready(dense(dense_x)), repeats)
    graphdef, state = nnx.split(block)
    moe_jit = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m)[0])
    moe = lambda b, x, m: moe_jit(state, x, m)  # noqa: E731  (jax.jit: no per-call graph bookkeeping)
    mask = jnp.ones((tokens,), bool)
    results = {"dense_swiglu": dense_time}
    for name, loads in cases.items():
        x = jnp.asarray(routed_inputs(rng, tokens, d, e, k, loads))
        counts = np.bincount(np.asarray(block.route(x, mask, False).experts).ravel(), minlength=e)
        assert (counts == loads).all(), (counts, loads)
        t = timed(lambda: jax.block_until_ready(moe(block, x, mask)), repeats)
        results[name] = {**t, "loads": loads.tolist(),
                         "efficiency": dense_time["median_ms"] / t["median_ms"]}
    return results


def main(argv):
    del argv
    machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version()}
    try:
        import torch
        import transformers
        machine.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    print(f"machine: {machine}")
    print(f"shape: {_TOKENS.value} tokens, hidden {_HIDDEN.value}, ffn {_FFN.value}, {_EXPERTS.value} experts, "
          f"top-{_TOP_K.value}, {_LAYERS.value} layers, vocab {_VOCAB.value}")
    prefill = bench_prefill(_REPEATS.value)
    print(f"prefill  moejax {prefill['moejax']['median_ms']:.1f} ms   transformers "
          f"{prefill['transformers']['median_ms']:.1f} ms   ratio moejax/transformers "
          f"{prefill['ratio_moejax_over_transformers']:.2f} (target <= 1.0)   max |logit diff| "
          f"{prefill['max_abs_logit_diff']:.1e}")
    layer = bench_moe_layer(_REPEATS.value)
    print(f"dense SwiGLU FFN with equal useful FLOPs: {layer['dense_swiglu']['median_ms']:.2f} ms")
    for name, r in layer.items():
        if name != "dense_swiglu":
            print(f"MoE layer, {name:>9} routing {r['median_ms']:.2f} ms   efficiency {r['efficiency']:.2f} "
                  f"(target >= 0.75)   loads {r['loads']}")
    if _JSON_OUT.value:
        with open(_JSON_OUT.value + ".tmp", "w") as f:
            json.dump({"machine": machine, "prefill": prefill, "moe_layer": layer}, f, indent=2)
        os.replace(_JSON_OUT.value + ".tmp", _JSON_OUT.value)


if __name__ == "__main__":
    app.run(main)
