"""launch.sh: experiments get the plain package, `test` (and bench_forward) the test extras, and the stamp
notices which extras a venv has; a TPU command reaches the workers with every argument intact. A stand-in
python (and gcloud) records what launch.sh runs, so nothing is installed."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.sh")


def _stand_in(path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def venv(tmp_path):
    """A venv whose python appends each command line it is given to calls.log."""
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    _stand_in(tmp_path / "venv" / "bin" / "python", f'echo "$*" >> {tmp_path / "calls.log"}\n')
    return tmp_path


def _launch(venv, *args) -> list[str]:
    """Run launch.sh with the stand-in venv; the command lines its python got this time."""
    log = venv / "calls.log"
    before = log.read_text().splitlines() if log.exists() else []
    env = dict(os.environ, MOEJAX_VENV=str(venv / "venv"))
    env.pop("MOEJAX_SKIP_SETUP", None)
    subprocess.run([LAUNCH, *args], env=env, check=True, capture_output=True, timeout=60)
    return log.read_text().splitlines()[len(before):]


def _installs(calls):
    return [c for c in calls if c.startswith("-m pip install --quiet -e")]


def test_experiments_get_the_plain_package_and_tests_the_test_extras(venv):
    calls = _launch(venv, "quickstart", "--config.max_new_tokens=4")
    assert _installs(calls) == [f"-m pip install --quiet -e {ROOT}"]
    assert calls[-1] == "experiments/quickstart.py --config=configs/quickstart.py --config.max_new_tokens=4"
    assert _installs(_launch(venv, "quickstart")) == []  # installed: the stamp says so
    # a venv made for experiments gets the test extras for the tests
    calls = _launch(venv, "test", "-x")
    assert _installs(calls) == [f"-m pip install --quiet -e {ROOT}[test]"]
    assert calls[-1] == "-m pytest -x"
    assert _installs(_launch(venv, "test")) == []
    assert _installs(_launch(venv, "placement")) == []  # the test extras are a superset
    stamp = venv / "venv" / ".moejax-installed"
    digest = stamp.read_text().split()[0]
    stamp.write_text(f"{'0' * len(digest)} test\n")  # pyproject.toml changed: reinstall, keeping the extras
    assert _installs(_launch(venv, "placement")) == [f"-m pip install --quiet -e {ROOT}[test]"]
    assert stamp.read_text() == f"{digest} test\n"


def test_a_transformers_comparison_installs_the_test_extras(venv):
    assert _installs(_launch(venv, "bench_forward")) == [f"-m pip install --quiet -e {ROOT}[test]"]
    assert _installs(_launch(venv, "setup")) == []
    assert _installs(_launch(venv, "setup", "test")) == []


def test_a_venv_from_before_the_extras_were_stamped_gets_them_for_the_tests(venv):
    digest = subprocess.run(["sha256sum", os.path.join(ROOT, "pyproject.toml")], capture_output=True, text=True,
                            check=True).stdout.split()[0]
    (venv / "venv" / ".moejax-installed").write_text(digest + "\n")  # the old stamp: the hash alone
    assert _installs(_launch(venv, "quickstart")) == []
    assert _installs(_launch(venv, "test")) == [f"-m pip install --quiet -e {ROOT}[test]"]


def test_tpu_workers_get_every_argument_as_given(tmp_path):
    """The remote command is built with shell quoting: run by a shell on the worker (here: bash in a stand-in
    home with a stand-in launch.sh), it passes the arguments exactly, spaces and quotes included."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    (home / "moejax").mkdir(parents=True)
    # gcloud: run the --command argument as the worker's shell would
    _stand_in(bin_dir / "gcloud", 'while [[ $# -gt 0 && "$1" != --command ]]; do shift; done\nexec bash -c "$2"\n')
    _stand_in(home / "moejax" / "launch.sh",
              f'{{ echo "$PWD $MOEJAX_DISTRIBUTED"; printf "%s\\n" "$@"; }} > {tmp_path / "remote.txt"}\n')
    args = ["--config.capacity.tasks=()", "--config.checkpoint=/data/my model", "--note=it's \"quoted\" $HOME;`x`"]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home))
    subprocess.run([LAUNCH, "--tpu", "vm", "--zone", "us-central2-b", "reproduce", *args], env=env, check=True,
                   timeout=60, capture_output=True)
    lines = (tmp_path / "remote.txt").read_text().splitlines()
    assert lines[0] == f"{home / 'moejax'} auto"
    assert lines[1:] == ["reproduce", "--config=configs/reproduce.py", *args]


def test_tpu_dir_with_a_space(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir / "gcloud", f'printf "%s\\n" "$@" > {tmp_path / "gcloud.txt"}\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    subprocess.run([LAUNCH, "--tpu", "vm", "--zone", "z", "--tpu_dir", "/srv/my checkout", "ep_forward"], env=env,
                   check=True, timeout=60, capture_output=True)
    remote = (tmp_path / "gcloud.txt").read_text().splitlines()[-1]
    assert shlex.split(remote) == ["cd", "/srv/my checkout", "&&", "MOEJAX_DISTRIBUTED=auto", "./launch.sh",
                                   "ep_forward"]
