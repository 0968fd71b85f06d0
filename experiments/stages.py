"""The reproduction's stages (experiments/reproduce.py): the input checks made before any work, and running one
stage: its script in a fresh process, configured by the stage's part of the reproduce config (config.<stage>,
passed as --config=configs/<script>.py[:quick] plus a --config.FIELD=VALUE for each field that differs from
that file), skipped once finished. No flags are defined here, so tests and notebooks can import it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import harness
from absl import app
from moejax.results import read_json, write_json_atomically


def check_inputs(config, stages: list[str], workdir: str) -> None:
    """Every check that can fail, before any long work starts."""
    unknown = [s for s in stages if s not in config.stages]
    if unknown:
        raise app.UsageError(f"unknown stage(s) {unknown}; stages: {list(config.stages)}")
    for checkpoint in dict.fromkeys(config[s].checkpoint for s in stages if "checkpoint" in config[s]):
        if not checkpoint:
            raise app.UsageError(f"preset {config.model!r} needs --config.checkpoint=DIR (a Hugging Face "
                                 "checkpoint directory with config.json, safetensors and tokenizer.json)")
        for name in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(checkpoint, name)):
                raise app.UsageError(f"checkpoint {checkpoint!r} has no {name}")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise app.UsageError(f"workdir {workdir!r} is not writable: {e}") from None


def from_root(path: str) -> str:
    """`path` (relative to this process's directory) as the stages see it: relative to the repository root,
    where they run, when it is inside it; else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, harness.ROOT)
    return absolute if relative.startswith("..") else relative


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _flag_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))  # config_flags reads a tuple field as a Python literal
    return str(value)


def stage_arguments(config, stage: str) -> list[str]:
    """The script's flags for one stage: its config file (the quick variant under quick) and an override for
    each field where config.<stage> differs from that file. The checkpoint path is made relative to the
    repository root, where the stage runs (from_root), so the recorded command is one a reader can paste."""
    wanted = config[stage].to_dict()
    script = wanted.pop("script")
    if wanted.get("checkpoint"):
        wanted["checkpoint"] = from_root(wanted["checkpoint"])
    spec = f"configs/{script}.py" + (":quick" if config.quick else "")
    default = _flat(harness.load_config(spec).to_dict())
    return [f"--config={spec}"] + [f"--config.{key}={_flag_value(value)}"
                                   for key, value in _flat(wanted).items() if default.get(key) != value]


def stage_command(name: str, config, workdir: str) -> list[str]:
    """The command line that runs one stage, from the repository root, into workdir/<name>."""
    return ["python", os.path.join("experiments", f"{config[name].script}.py"),
            f"--workdir={from_root(os.path.join(workdir, name))}",
            *stage_arguments(config, name)]


def finished_stage(name: str, config, workdir: str) -> dict | None:
    """The stage.json record of a stage that finished with the command it would run now, else None: a stage
    whose settings changed runs again (its script then resumes, restarts or refuses its own results as their
    settings say), so the report never shows old numbers under a new command."""
    record = read_json(os.path.join(workdir, name, "stage.json"))
    # the same script and flags; the workdir may have moved since (a copied or renamed one is still finished)
    settings = lambda command: [a for a in shlex.split(command) if not a.startswith("--workdir=")]
    if record is None or settings(record.get("command", "")) != settings(
            shlex.join(stage_command(name, config, workdir))):
        return None
    return record


def run_stage(name: str, config, workdir: str, force: bool) -> dict:
    """Run one stage's script unless it has finished with this command; returns its stage.json record."""
    out = os.path.join(workdir, name)
    marker = os.path.join(out, "stage.json")
    finished = None if force else finished_stage(name, config, workdir)
    if finished is not None:
        return finished
    os.makedirs(out, exist_ok=True)
    command = [sys.executable, *stage_command(name, config, workdir)[1:]]
    start = time.perf_counter()
    log_path = os.path.join(out, "log.txt")
    with open(log_path, "w") as log:
        process = subprocess.run(command, cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        tail = "".join(open(log_path).readlines()[-15:])
        raise RuntimeError(f"stage {name} failed (exit {process.returncode}); its log {log_path} ends:\n{tail}")
    record = {"stage": name, "command": shlex.join(["python", *command[1:]]),
              "seconds": time.perf_counter() - start, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomically(marker, record)
    return record
