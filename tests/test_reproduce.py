"""experiments/reproduce.py: its input checks fail before any work, finished stages are skipped, and the
report is built from the stages' results (here: the committed results of the experiments)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import importlib.util  # noqa: E402

import report  # noqa: E402
import stages  # noqa: E402  (the stage logic of experiments/reproduce.py; it defines no absl flags)
from absl import app  # noqa: E402

_spec = importlib.util.spec_from_file_location("reproduce_config", os.path.join(ROOT, "configs", "reproduce.py"))
reproduce_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce_config)


@pytest.fixture
def config():
    c = reproduce_config.get_config()
    c.checkpoint = os.path.join(ROOT, "experiments", "default_model")
    return c


def test_bad_inputs_fail_before_any_work(config, tmp_path):
    with pytest.raises(app.UsageError, match=r"unknown stage\(s\) \['bogus'\]; stages: \['straggler'"):
        stages.check_inputs(config, ["capacity", "bogus"], str(tmp_path))
    config.checkpoint = str(tmp_path)
    with pytest.raises(app.UsageError, match=f"checkpoint '{tmp_path}' has no config.json"):
        stages.check_inputs(config, ["capacity"], str(tmp_path / "w"))
    stages.check_inputs(config, ["gating"], str(tmp_path / "w"))  # gating needs no checkpoint
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(app.UsageError, match="workdir .* is not writable"):
        stages.check_inputs(config, ["gating"], str(blocker / "sub"))
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        reproduce_config.get_config("gpt5")


def test_the_command_line_refuses_a_bad_stage_at_once(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "reproduce.py"), "--stages=nope",
                             f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown stage(s) ['nope']" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing started


def test_finished_stages_are_skipped_unless_their_command_changed(config, tmp_path, monkeypatch):
    import shlex

    (tmp_path / "gating").mkdir()
    command = shlex.join(stages.stage_command("gating", config, str(tmp_path)))
    record = {"stage": "gating", "command": command, "seconds": 1.0, "finished": "then"}
    (tmp_path / "gating" / "stage.json").write_text(json.dumps(record))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a finished stage ran again"))
    assert stages.run_stage("gating", config, str(tmp_path), force=False) == record
    moved = tmp_path / "moved"  # a workdir copied or renamed since: still finished
    shutil.copytree(tmp_path / "gating", moved / "gating")
    assert stages.run_stage("gating", config, str(moved), force=False) == record
    # finished with other settings: it runs again (its results are then its script's to resume or refuse)
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda command, **k: ran.append(command) or subprocess.CompletedProcess(
        command, 0))
    changed = config.copy_and_resolve_references()
    changed.gating.capacity_fraction = 1.0
    assert stages.finished_stage("gating", changed, str(tmp_path)) is None
    rerun = stages.run_stage("gating", changed, str(tmp_path), force=False)
    assert ran and "--config.capacity_fraction=1.0" in rerun["command"] != command


def test_a_failing_stage_reports_its_log(config, tmp_path, monkeypatch):
    def fail(command, cwd, stdout, stderr):
        stdout.write("Traceback: the experiment broke\n")
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(RuntimeError, match="(?s)stage gating failed \\(exit 3\\).*the experiment broke"):
        stages.run_stage("gating", config, str(tmp_path), force=False)
    assert not (tmp_path / "gating" / "stage.json").exists()  # not marked finished


def test_report_from_the_committed_results(config, tmp_path):
    """The report reads each stage's results.json: built from the committed experiment results, every
    section that has results shows its table, the others say they did not run."""
    committed = os.path.join(ROOT, "experiments", "results")
    for stage, folder in (("straggler", "default_model"), ("gating", "gating_throughput"),
                          ("buffering", "buffering"), ("placement", "placement")):
        shutil.copytree(os.path.join(committed, folder), tmp_path / stage)
    text = open(report.write_report(str(tmp_path), config)).read()
    straggler = json.load(open(tmp_path / "straggler" / "results.json"))
    assert f"validation perplexity {straggler['validation']['perplexity']:.2f}" in text
    assert "## capacity: not run" in text
    gating = json.load(open(tmp_path / "gating" / "results.json"))["cells"][0]
    assert f"{gating['dynamic_over_static_throughput']:.2f}x" in text
    assert "| lifo |" in text and "| belady |" in text
    assert "![Avg Max Load per method and device count](placement.png)" in text
    assert (tmp_path / "placement.png").exists()


def test_a_failing_stage_leaves_the_report_of_the_others(config, tmp_path):
    """The gating stage fails (an unknown layer shape); the finished placement stage is skipped, the report
    is still written with it, and the command exits non-zero naming the failed stage."""
    import shlex

    shutil.copytree(os.path.join(ROOT, "experiments", "results", "reproduce", "placement"), tmp_path / "placement")
    # finished with the command it would run now (the committed record's command predates today's flags)
    record = json.loads((tmp_path / "placement" / "stage.json").read_text())
    record["command"] = shlex.join(stages.stage_command("placement", config, str(tmp_path)))
    (tmp_path / "placement" / "stage.json").write_text(json.dumps(record))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "reproduce.py"), f"--workdir={tmp_path}",
                             "--stages=gating,placement", "--config.gating.layers=('nope',)"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "stage(s) ['gating'] failed" in result.stderr and "KeyError: 'nope'" in result.stdout  # its log's tail
    text = (tmp_path / "report.md").read_text()
    assert "## gating: not run" in text and "## Expert placement" in text
