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

import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

_CONFIG = config_flags.DEFINE_config_file("config", "configs/reproduce.py", "Model preset and sweep settings.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where stages and the report go; default workdir/reproduce[_quick].")
_STAGES = flags.DEFINE_list("stages", [], "Stages to run (default: all, in order).")
_QUICK = flags.DEFINE_boolean("quick", False, "Smaller sweeps: the whole run in about 9 minutes on 2 CPU cores.")
_FORCE = flags.DEFINE_boolean("force", False, "Rerun stages that have finished.")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_report  # noqa: E402  (experiments/report.py)
from stages import QUICK, STAGES, check_inputs, run_stage  # noqa: E402  (experiments/stages.py)


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
    path = write_report(workdir, config, quick, command=shlex.join(["python", *sys.argv]))
    print(f"Wrote {path}")


if __name__ == "__main__":
    app.run(main)
