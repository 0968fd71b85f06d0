"""The reproduction report: one Markdown file from the stages' results.json, the papers' numbers beside ours.

Used by experiments/reproduce.py; `python experiments/report.py WORKDIR` rebuilds a report from finished stages.
Each stage's script owns how its section renders: `report_section(results) -> lines`, and REPORT_PLOT, the
caption of its plot.png (copied beside the report), when it draws one. A stage that has not run gets a line
saying so; a section that cannot render says why, and the rest of the report still renders.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time

import harness
from moejax.results import read_json


def _section(workdir: str, stage: str, script: str) -> list[str]:
    results = read_json(os.path.join(workdir, stage, "results.json"))
    if results is None:
        return [f"## {stage}: not run"]
    try:
        module = importlib.import_module(script)
        lines = list(module.report_section(results))
    except Exception as e:  # results written by an older version of the script, or a script that fails to load
        return [f"## {stage}: experiments/{script}.py could not render its results.json ({type(e).__name__}: {e}); "
                "rerun the stage with --force"]
    source = os.path.join(workdir, stage, "plot.png")
    caption = getattr(module, "REPORT_PLOT", None)
    if caption and os.path.exists(source):
        shutil.copyfile(source, os.path.join(workdir, f"{stage}.png"))
        lines.append(f"\n![{caption}]({stage}.png)\n")
    return lines


def write_report(workdir: str, config=None, command: str = "") -> str:
    """workdir/report.md from the stages of `config` (a reproduce config; default configs/reproduce.py)."""
    stages = config if config is not None else harness.load_config("configs/reproduce.py")
    lines = ["# moejax reproduction report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')}"
             + (f" by `{command}`" if command else "")
             + (f"; model preset {config.model!r}, checkpoint `{config.checkpoint}`" if config is not None else "")
             + ("; quick settings" if config is not None and config.quick else "") + ".", "",
             f"Machine: {harness.describe(harness.machine())}.", "",
             "| stage | minutes | command |", "|---|---|---|"]
    for stage in stages.stages:
        record = read_json(os.path.join(workdir, stage, "stage.json"))
        if record is not None:
            lines.append(f"| {stage} | {record['seconds'] / 60:.1f} | `{record['command']}` |")
    for stage in stages.stages:
        lines += [""] + _section(workdir, stage, stages[stage].script)
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/report.py WORKDIR")
    print(write_report(sys.argv[1]))
