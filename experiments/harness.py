"""What the experiment scripts share: their entry point (--config, --workdir), the machine-and-versions header
of their results, side-by-side timing, the held-out text of a corpus config, and the papers' figures.

The scripts run as `python experiments/NAME.py` from the repository root (launch.sh and experiments/reproduce.py
run them so), and `import harness` finds this file beside them. Nothing here, and nothing in a script, defines
a flag at import: harness.run defines them when a script runs, so the report and the tests import any script.
Results files themselves are moejax.results.Results (atomic, resumable).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shlex
import sys
import time
from typing import Callable, TypeVar

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------------
# The papers' own figures (papers.md), stated once: the report and the scripts print them beside ours.

# He et al. 2025 (papers.md A): MoE-layer speedup under expert parallelism per capacity factor gamma.
CAPACITY_SPEEDUP = {
    "OLMoE, 64 experts on 8 GPUs": {"token drop": {"2.0": 1.21, "1.5": 1.30, "1.0": 1.46},
                                    "expanded drop": {"2.0": 1.16, "1.5": 1.25, "1.0": 1.36}},
    "Mixtral-8x7B, one expert per GPU": {"token drop": {"2.0": 1.44, "1.5": 1.89, "1.0": 2.55},
                                         "expanded drop": {"2.0": 1.43, "1.5": 1.86, "1.0": 2.51}},
}
PAPERS = {
    "straggler": "the paper saw over 7x",
    "gating": "Paper (52B LM, one node): up to 6.21x throughput (LM), 5.75x (MT encoder), 2.58x (MT decoder); "
              "activation memory at batch 8 LM 6.29 -> 1.28 GB.",
    "buffering": "Paper: LIFO close to Belady's MIN with anti-correlated placement; ~75% of experts idle per "
                 "MT-decoder batch; a 10-expert cache saved 2.25 GB at comparable throughput.",
    "placement": "Paper (LM): Max Load and Avg Max Load from > 0.6 to < 0.4 with greedy / anti-correlation; "
                 "throughput +10.1%.",
}

# ---------------------------------------------------------------------------------------------------------
# Entry point and configs


def load_config(spec: str):
    """The ConfigDict of a config file named as on a command line: "configs/x.py" or "configs/x.py:ARG"
    (get_config(ARG)); relative paths are from the repository root."""
    path, _, arg = spec.partition(":")
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    module_spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def run(main: Callable, workdir: str, config: str = "") -> None:
    """Run `main(config, workdir)` as the script's entry point: --config (default `config`, else
    configs/<script>.py; any field overridden with --config.FIELD=VALUE, a variant picked with FILE:ARG) and
    --workdir (default `workdir`). A config with a cpu_devices field > 0 gets that many host devices, set
    before any device is touched (the CPU mesh of the expert-parallel experiments; harmless where devices
    are real)."""
    from absl import app, flags
    from ml_collections import config_flags

    script = os.path.splitext(os.path.basename(sys.modules[main.__module__].__file__))[0]
    default = os.path.relpath(os.path.join(ROOT, config or os.path.join("configs", f"{script}.py")))
    flag = config_flags.DEFINE_config_file("config", default, f"The experiment's config (default {default}).")
    work = flags.DEFINE_string("workdir", workdir, "Where results.json and the plot go.")

    def entry(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]} (settings are --config.FIELD=VALUE)")
        if flag.value.get("cpu_devices"):
            import jax

            jax.config.update("jax_num_cpu_devices", flag.value.cpu_devices)
        main(flag.value, work.value)

    app.run(entry)


def command() -> str:
    """This process's command line, pasteable into a shell."""
    return shlex.join(["python", *sys.argv])


# ---------------------------------------------------------------------------------------------------------
# The machine and versions that produced a result


def machine() -> dict:
    import flax
    import jax

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    out = {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
           "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
           "numpy": np.__version__}
    for name in ("torch", "transformers"):  # the comparison benchmarks' other side, when it is loaded
        if name in sys.modules:
            out[name] = sys.modules[name].__version__
    return out


def checkpoint_identity(path: str) -> dict:
    """{file: [bytes, modification time in ns]} of a checkpoint directory's files: part of the settings of an
    experiment on it, so that a checkpoint retrained or re-exported to the same path is not reported with the
    old one's numbers (hashing every weight would read gigabytes)."""
    found = {}
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file) and name.endswith((".json", ".safetensors")):
            stat = os.stat(file)
            found[name] = [stat.st_size, stat.st_mtime_ns]
    return found


def header() -> dict:
    """The fields every results.json starts with: the command that made it and the machine it ran on."""
    return {"command": command(), "machine": machine()}


def describe(m: dict) -> str:
    """A machine record as one sentence."""
    versions = ", ".join(f"{k} {m[k]}" for k in ("jax", "flax", "numpy", "torch", "transformers") if k in m)
    return (f"{m.get('platform', '?')}; {m.get('cpus', '?')} CPUs ({m.get('cpu', '?')}); JAX backend "
            f"{m.get('backend', '?')} ({m.get('device', '?')}); Python {m.get('python', '?')}, {versions}")


def sweep(results, keys: list[dict], compute: Callable[[dict], dict], describe: Callable[[dict], str],
          desc: str, progress: bool = True) -> None:
    """Compute the cell of every key (a dict of the cell's identifying fields) that `results`
    (moejax.results.Results) has not finished, in order, saving after each, under a progress bar; each
    finished cell is printed as describe(cell)."""
    from tqdm import tqdm

    for key in tqdm(results.todo(keys), desc=desc, disable=not progress):
        cell = compute(key)
        results.add(cell)
        if progress:
            tqdm.write(describe(cell))


# ---------------------------------------------------------------------------------------------------------
# Models without a checkpoint

# A small Mixtral-style model: with random weights it stands in for a checkpoint (experiments' --config.checkpoint=)
RANDOM_MIXTRAL = dict(architecture="mixtral", vocab_size=2048, hidden_size=128, num_heads=4, num_kv_heads=2,
                      head_dim=32, intermediate_size=256, num_experts=32, norm_topk_prob=True,
                      max_position_embeddings=1024)


def random_model(shape: dict, seed: int = 0, router_scale: float = 1.0, dtype: str = "float32"):
    """moejax.random_model of `shape` (moejax.ModelConfig fields), its router weights times router_scale:
    a random router routes almost uniformly, a scaled-up one decisively, as a trained one does."""
    import jax.numpy as jnp

    import moejax

    model = moejax.random_model(moejax.ModelConfig(**shape), seed=seed, dtype=jnp.dtype(dtype))
    if router_scale != 1.0:
        for block in model.moe_blocks():
            block.router[...] = block.router[...] * router_scale
    return model


# ---------------------------------------------------------------------------------------------------------
# Side-by-side timing


def round_robin(calls: dict[str, Callable[[], T]], rounds: int, desc: str | None = None) -> dict[str, list[T]]:
    """Every call once per round, in turn, for `rounds` rounds, so that a slow spell of a shared machine hits
    every call alike instead of biasing their ratios; each call's results, round by round."""
    from tqdm import tqdm

    out = {name: [] for name in calls}
    for _ in tqdm(range(rounds), desc=desc, disable=desc is None):
        for name, call in calls.items():
            out[name].append(call())
    return out


def wall_seconds(call: Callable[[], object]) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each call, its result waited for, over `repeats` round-robin rounds after `warmup`
    untimed ones (compilation)."""
    times = round_robin({name: functools.partial(wall_seconds, call) for name, call in calls.items()},
                        warmup + repeats)
    return {name: t[warmup:] for name, t in times.items()}


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    return {name: float(np.median(t)) for name, t in interleaved_seconds(calls, repeats, warmup).items()}


# ---------------------------------------------------------------------------------------------------------
# Held-out text


def corpus_splits(corpus) -> dict:
    """{"train", "validation", "test"} -> documents of a corpus config (fields source, validation_fraction,
    test_fraction), split by document as moejax.data splits the training corpus."""
    from moejax import data

    return data.split_documents(data.load_documents(corpus.source), corpus.validation_fraction,
                                corpus.test_fraction)


def held_out_stream(tokenizer, corpus, split: str = "validation") -> tuple[np.ndarray, dict]:
    """The token stream of one split of a corpus config, documents separated by END_OF_DOCUMENT, and a
    record of what it is (corpus, split, documents, split_tokens)."""
    from moejax import data

    documents = corpus_splits(corpus)[split]
    stream = data.document_stream(tokenizer, documents)
    return stream, {"corpus": corpus.source, "split": split, "documents": len(documents),
                    "split_tokens": int(len(stream))}


def full_windows(stream: np.ndarray, length: int) -> list[np.ndarray]:
    """The consecutive non-overlapping windows of exactly `length` tokens."""
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
