"""Quick start: load (or build) a MoE model, run one forward pass and a short greedy generation.

Prints what it does, the expert loads the router produced, and timings; writes results.json to --workdir.
Settings: configs/quickstart.py.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import harness
import moejax
from moejax.config import ModelConfig
from moejax.results import Results


def build_model(config) -> moejax.CausalLM:
    policy = moejax.MoEPolicy(capacity_factor=config.capacity_factor or None)
    if config.checkpoint:
        print(f"Loading {config.checkpoint} ...")
        return moejax.load_pretrained(config.checkpoint, dtype=config.dtype, policy=policy)
    m = config.model.to_dict()
    model_config = ModelConfig(moe_layers=(True,) * m["num_layers"], **m)
    print(f"Building the built-in {model_config.architecture}-style model with random weights: "
          f"{model_config.num_layers} layers, {model_config.num_experts} experts, top-{model_config.num_experts_per_tok}")
    return moejax.random_model(model_config, seed=config.seed, dtype=config.dtype, policy=policy)


def main(config, workdir):
    model = build_model(config)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(config.seed)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(config.batch_size, config.prompt_length)), jnp.int32)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(t))
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, tokens))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, tokens))
    forward_s = time.perf_counter() - start
    print(f"Forward pass: {tokens.shape[0]}x{tokens.shape[1]} tokens -> logits {out.logits.shape} in "
          f"{forward_s * 1e3:.1f} ms (first call with compilation {compile_s:.1f} s)")

    loads = []
    for i, r in enumerate(out.routings):
        if r is None:
            continue
        counts = np.bincount(np.asarray(r.experts)[np.asarray(r.keep)], minlength=model.config.num_experts)
        loads.append({"layer": i, "tokens_per_expert": counts.tolist(),
                      "max_over_mean": float(counts.max() / counts.mean())})
        print(f"  layer {i}: tokens per expert {counts.tolist()}  max/mean {counts.max() / counts.mean():.2f}")

    prompts = [np.asarray(tokens[i, : config.prompt_length - 3 * i]).tolist() for i in range(config.batch_size)]
    moejax.generate(model, prompts, max_new_tokens=config.max_new_tokens)  # compile
    start = time.perf_counter()
    new = np.asarray(moejax.generate(model, prompts, max_new_tokens=config.max_new_tokens))
    generate_s = time.perf_counter() - start
    print(f"Greedy generation: {config.batch_size} prompts of different lengths, {config.max_new_tokens} new "
          f"tokens each in {generate_s * 1e3:.1f} ms ({new.size / generate_s:.0f} tokens/s)")
    tokenizer = moejax.load_tokenizer(config.checkpoint) if config.checkpoint else None
    for row in new[:2]:
        print("  new tokens:", row.tolist())
    if tokenizer is not None:
        prompt = "class Config:\n    def __init__(self"
        ids = tokenizer.encode(prompt).ids
        text = tokenizer.decode(np.asarray(moejax.generate(model, [ids], max_new_tokens=48))[0].tolist())
        print(f"Greedy continuation of {prompt!r}:\n{prompt}{text}")

    results = Results(workdir)
    results.data = {**harness.header(), "config": config.to_dict(), "forward_ms": forward_s * 1e3,
                    "compile_s": compile_s, "expert_loads": loads, "generate_ms": generate_s * 1e3,
                    "new_tokens": new.tolist()}
    results.save()
    print(f"Wrote {results.path}")


if __name__ == "__main__":
    harness.run(main, workdir="workdir/quickstart")
