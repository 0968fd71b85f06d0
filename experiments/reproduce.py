"""Reproduce both papers on one model: straggler effect, capacity-aware drop, static vs dynamic gating,
expert buffering and expert placement, in one Markdown report with the papers' numbers beside ours.

Each stage runs its experiment script (experiments/<script>.py) in a fresh process, configured by its part of
the reproduce config (config.<stage>, see configs/reproduce.py) and writing into WORKDIR/<stage>/ with its log;
a finished stage leaves WORKDIR/<stage>/stage.json and is skipped on a rerun with the same command (one whose
settings changed runs again; the scripts also resume their own unfinished cells), so an interrupted run picks up
where it stopped. A stage that fails does not stop the others;
the report is rebuilt from whatever stages have finished, and the command then exits non-zero naming the failed.

  ./launch.sh reproduce --quick                       # the README's main job: the trained default model
  ./launch.sh reproduce                               # the full sweeps (see README for the time)
  ./launch.sh reproduce --stages=capacity,placement   # a subset
  ./launch.sh reproduce --config=configs/reproduce.py:mixtral --config.checkpoint=/data/Mixtral-8x7B-v0.1
  ./launch.sh reproduce --quick --config.capacity.sequences=24 --config.capacity.tasks='()'
  ./launch.sh reproduce --quick --dry_run             # each stage's command, nothing run
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

import harness  # experiments/harness.py
from report import write_report  # experiments/report.py
from stages import check_inputs, finished_stage, run_stage, stage_command  # experiments/stages.py

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce.py", "Model preset and each stage's config.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where stages and the report go; default workdir/reproduce[_quick].")
_STAGES = flags.DEFINE_list("stages", [], "Stages to run (default: all, in order).")
_QUICK = flags.DEFINE_boolean("quick", False, "The config's quick variant (as configs/reproduce.py:quick): the "
                              "whole run in about 9 minutes on 2 CPU cores.")
_FORCE = flags.DEFINE_boolean("force", False, "Rerun stages that have finished.")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "Print each stage's command (finished ones marked) and stop.")


def resolve_config():
    """The config of --config, as its quick variant under --quick, with the command line's overrides."""
    config = _CONFIG.value
    if not _QUICK.value or config.quick:
        return config
    path, _, arg = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
    quick = harness.load_config(f"{os.path.abspath(path)}:{','.join(p for p in (arg, 'quick') if p)}")
    quick.update_from_flattened_dict(config_flags.get_override_values(flags.FLAGS["config"]))
    return quick


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = resolve_config()
    workdir = _WORKDIR.value or os.path.join("workdir", "reproduce_quick" if config.quick else "reproduce")
    stages = _STAGES.value or list(config.stages)
    check_inputs(config, stages, workdir)
    if _DRY_RUN.value:
        for name in stages:
            finished = finished_stage(name, config, workdir) is not None and not _FORCE.value
            print(f"{name}{' (finished: skipped)' if finished else ''}: {shlex.join(stage_command(name, config, workdir))}")
        return
    failed = []
    progress = tqdm(stages, desc="reproduce", unit="stage")
    for name in progress:
        progress.set_postfix_str(f"{name} (log: {os.path.join(workdir, name, 'log.txt')})")
        try:
            record = run_stage(name, config, workdir, _FORCE.value)
        except RuntimeError as e:  # the other stages still run, and the report shows what finished
            tqdm.write(str(e))
            failed.append(name)
            continue
        tqdm.write(f"{name}: done in {record['seconds'] / 60:.1f} min")
    path = write_report(workdir, config, command=harness.command())
    print(f"Wrote {path}")
    if failed:
        sys.exit(f"stage(s) {failed} failed (see their log.txt); a rerun runs them again and skips the others")


if __name__ == "__main__":
    app.run(main)
