"""Reproduce both papers on one model: straggler effect, capacity-aware drop, static vs dynamic gating,
expert buffering and expert placement, in one Markdown report with the papers' numbers beside ours.

Each stage runs its experiment script (experiments/<script>.py) in a fresh process, writing into
WORKDIR/<stage>/ with its log; a finished stage leaves WORKDIR/<stage>/stage.json and is skipped on a rerun
(the scripts also resume their own unfinished cells), so an interrupted run picks up where it stopped.
The report is rebuilt from whatever stages have finished.

  ./launch.sh reproduce --quick                       # the README's main job: the trained default model
  ./launch.sh reproduce                               # the full sweeps (see README for the time)
  ./launch.sh reproduce --stages=capacity,placement   # a subset
  ./launch.sh reproduce --config=configs/reproduce.py:mixtral --config.checkpoint=/data/Mixtral-8x7B-v0.1
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce.py", "Model preset and sweep settings.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where stages and the report go; default workdir/reproduce[_quick].")
_STAGES = flags.DEFINE_list("stages", [], "Stages to run (default: all, in order).")
_QUICK = flags.DEFINE_boolean("quick", False, "Smaller sweeps: the whole run in about 20 minutes on 2 CPU cores.")
_FORCE = flags.DEFINE_boolean("force", False, "Rerun stages that have finished.")

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
        + (["--new_tokens=32", "--repeats=1"] if quick else [])),
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
    args = [f"--workdir={out}"] + ([f"--checkpoint={config.checkpoint}"] if stage.uses_checkpoint else [])
    command = [sys.executable, os.path.join(ROOT, "experiments", f"{stage.script}.py"), *args,
               *stage.args(config, quick)]
    start = time.perf_counter()
    log_path = os.path.join(out, "log.txt")
    with open(log_path, "w") as log:
        process = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        tail = "".join(open(log_path).readlines()[-15:])
        raise RuntimeError(f"stage {name} failed (exit {process.returncode}); its log {log_path} ends:\n{tail}")
    record = {"stage": name, "command": shlex.join(["python", *command[1:]]).replace(ROOT + "/", ""),
              "seconds": time.perf_counter() - start, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(marker, "w") as f:
        json.dump(record, f, indent=2)
    return record


def main(argv):
    del argv
    config, quick = _CONFIG.value, _QUICK.value
    if quick:
        config.update(QUICK)
    workdir = _WORKDIR.value or os.path.join("workdir", "reproduce_quick" if quick else "reproduce")
    stages = _STAGES.value or list(STAGES)
    check_inputs(config, stages, workdir)
    records = {}
    progress = tqdm(stages, desc="reproduce", unit="stage")
    for name in progress:
        progress.set_postfix_str(f"{name} (log: {os.path.join(workdir, name, 'log.txt')})")
        records[name] = run_stage(name, config, quick, workdir, _FORCE.value)
        tqdm.write(f"{name}: done in {records[name]['seconds'] / 60:.1f} min")
    from report import write_report  # experiments/report.py: tables from the stages' results

    path = write_report(workdir, config, quick, command=shlex.join(["python", *sys.argv]))
    print(f"Wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
