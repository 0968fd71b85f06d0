"""The reproduction's stages (experiments/reproduce.py): which script each runs with which flags, the input
checks made before any work, and running one stage (skipped once finished). No absl flags are defined
here, so tests and notebooks can import it."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable

from absl import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --quick: the same experiments over fewer cells, sequences and repeats
QUICK = dict(capacity_factors="none,1.0,1.5,2.0", capacity_strategies="score,first,last,random,expanded_local",
             capacity_sequences=12, gating_tokens="1024,4096", buffering_cache_sizes="2,4,8,16,24,32",
             buffering_measured_sizes="16", placement_devices="8", placement_batches=32)


@dataclasses.dataclass(frozen=True)
class Stage:
    script: str
    args: Callable[[object, bool], list[str]]  # (config, quick) -> the script's flags
    uses_checkpoint: bool = True


def _straggler_args(c, quick):
    return ["--max_sequences=64", "--examples=200", "--decode_prompts=8", "--decode_steps=16"] if quick else []


STAGES = {
    "straggler": Stage("evaluate", _straggler_args),
    "capacity": Stage("capacity_sweep", lambda c, quick: [
        f"--factors={c.capacity_factors}", f"--strategies={c.capacity_strategies}",
        f"--sequences={c.capacity_sequences}", f"--num_devices={c.num_devices}"]
        + (["--task_examples=100", "--repeats=3"] if quick else [])),
    "gating": Stage("gating_throughput", lambda c, quick: [f"--tokens={c.gating_tokens}"]
                    + (["--repeats=3"] if quick else []), uses_checkpoint=False),
    "buffering": Stage("buffering", lambda c, quick: [
        f"--cache_sizes={c.buffering_cache_sizes}", f"--measured_sizes={c.buffering_measured_sizes}"]
        + (["--new_tokens=32", "--repeats=3"] if quick else [])),
    "placement": Stage("placement", lambda c, quick: [
        f"--devices={c.placement_devices}", f"--batches={c.placement_batches}"]
        + (["--search_restarts=8", "--repeats=1"] if quick else [])),
}


def check_inputs(config, stages: list[str], workdir: str) -> None:
    """Every check that can fail, before any long work starts."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise app.UsageError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    if any(STAGES[s].uses_checkpoint for s in stages):
        if not config.checkpoint:
            raise app.UsageError(f"preset {config.model!r} needs --config.checkpoint=DIR (a Hugging Face "
                                 "checkpoint directory with config.json, safetensors and tokenizer.json)")
        for name in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(config.checkpoint, name)):
                raise app.UsageError(f"checkpoint {config.checkpoint!r} has no {name}")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise app.UsageError(f"workdir {workdir!r} is not writable: {e}") from None


def run_stage(name: str, config, quick: bool, workdir: str, force: bool) -> dict:
    """Run one stage's script unless it has finished; returns its stage.json record."""
    stage, out = STAGES[name], os.path.join(workdir, name)
    marker = os.path.join(out, "stage.json")
    if os.path.exists(marker) and not force:
        return json.load(open(marker))
    os.makedirs(out, exist_ok=True)
    # The stage runs in ROOT: paths relative to it (as given, when the caller's cwd is ROOT), so the scripts
    # record commands a reader can paste
    rel = lambda path: os.path.relpath(os.path.abspath(path), ROOT)  # noqa: E731
    args = [f"--workdir={rel(out)}"] + ([f"--checkpoint={rel(config.checkpoint)}"] if stage.uses_checkpoint else [])
    command = [sys.executable, os.path.join("experiments", f"{stage.script}.py"), *args,
               *stage.args(config, quick)]
    start = time.perf_counter()
    log_path = os.path.join(out, "log.txt")
    with open(log_path, "w") as log:
        process = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        tail = "".join(open(log_path).readlines()[-15:])
        raise RuntimeError(f"stage {name} failed (exit {process.returncode}); its log {log_path} ends:\n{tail}")
    record = {"stage": name, "command": shlex.join(["python", *command[1:]]),
              "seconds": time.perf_counter() - start, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(marker, "w") as f:
        json.dump(record, f, indent=2)
    return record
