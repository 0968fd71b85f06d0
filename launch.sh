#!/usr/bin/env bash
# launch.sh: set up moejax and run an experiment or the tests. Every command does its own set-up: it
# creates .venv (Python 3.11+) and installs moejax into it the first time, and again when pyproject.toml
# changes.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage:
  ./launch.sh quickstart [flags]     run experiments/quickstart.py with configs/quickstart.py (the main job)
  ./launch.sh EXPERIMENT [flags]     run experiments/EXPERIMENT.py; configs/EXPERIMENT.py is its default
                                     --config when that file exists; flags go to the script (absl flags)
  ./launch.sh test [pytest args]     run the test suite on the JAX CPU backend (8 host devices);
                                     e.g. ./launch.sh test -m "not slow" for the quick subset
  ./launch.sh setup                  only create/update .venv
  ./launch.sh --help                 this text

Environment: PYTHON (default python3) makes the venv; MOEJAX_VENV (default ./.venv) is where it lives.
USAGE
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${MOEJAX_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

setup() {
  # The test extras (torch, transformers) are installed too: parity tests and benchmarks need them.
  local stamp="$VENV/.moejax-installed"
  local want
  want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "launch.sh: creating $VENV with $("$PYTHON" --version 2>&1)" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  echo "launch.sh: installing moejax and its dependencies into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  echo "$want" > "$stamp"
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
command=$1
shift
cd "$ROOT"
case "$command" in
  -h|--help|help)
    usage ;;
  setup)
    setup ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    script="experiments/$command.py"
    if [[ ! -f "$script" ]]; then
      echo "launch.sh: unknown experiment '$command' (no $script); available:" \
        "$(cd experiments && ls *.py | sed 's/\.py$//' | tr '\n' ' ')" >&2
      exit 2
    fi
    setup
    args=()
    if [[ -f "configs/$command.py" && " $* " != *" --config="* && " $* " != *" --config "* ]]; then
      args+=("--config=configs/$command.py")
    fi
    exec "$VENV/bin/python" "$script" "${args[@]}" "$@" ;;
esac
