#!/usr/bin/env bash
# launch.sh: set up moejax and run an experiment or the tests. Every command does its own set-up: it
# creates .venv (Python 3.11+) and installs moejax into it the first time, and again when pyproject.toml
# changes. Experiments get the package alone; `test` (and the experiments that compare against transformers,
# TEST_EXTRA_EXPERIMENTS) also get the test extras (torch, transformers, nbclient, ...).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage:
  ./launch.sh reproduce --quick [flags]   both papers on the default model, one report (the main job);
                                          --stages=a,b, --force, --dry_run, --config=configs/reproduce.py:PRESET
  ./launch.sh [WHERE] quickstart [flags]  run experiments/quickstart.py with configs/quickstart.py (a first look)
  ./launch.sh [WHERE] EXPERIMENT [flags]  run experiments/EXPERIMENT.py; configs/EXPERIMENT.py is its default
                                          --config when that file exists (configs/EXPERIMENT.py:quick: its quick
                                          variant); --config.FIELD=VALUE overrides a field, --workdir=DIR
  ./launch.sh test [pytest args]          run the test suite on the JAX CPU backend (8 host devices);
                                          e.g. ./launch.sh test -m "not slow" for the quick subset
  ./launch.sh setup [test]                only create/update .venv (test: with the test extras)
  ./launch.sh --help                      this text

WHERE (default: one local process):
  --local_devices M           give each process M host (CPU) devices
  --processes N               N processes on this machine joined by jax.distributed.initialize on
                              localhost (the CPU backend uses gloo collectives); process i's output goes
                              to workdir/launch/process_i.log and process 0's also to the terminal
  --port P                    the coordinator's port for --processes (default 12355)
  --tpu NAME --zone ZONE      every worker of the Cloud TPU VM slice NAME runs the experiment from the same
                              directory (this checkout must be there: --tpu_dir, default ~/moejax);
                              jax.distributed finds its peers by itself. Optional --project PROJECT.
  --slurm                     run as one task of a SLURM job step: use inside an sbatch script as
                              `srun ./launch.sh --slurm EXPERIMENT ...` (one task per GPU node or per GPU);
                              jax.distributed reads the SLURM environment.

Environment: PYTHON (default python3) makes the venv; MOEJAX_VENV (default ./.venv) is where it lives;
MOEJAX_SKIP_SETUP=1 uses that venv as it is.
USAGE
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${MOEJAX_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
# experiments that import torch / transformers (a comparison against the reference implementation)
TEST_EXTRA_EXPERIMENTS=(bench_forward bench_decode)

# setup [EXTRA]: install moejax (with pyproject.toml's optional dependencies EXTRA, e.g. "test") into $VENV
# unless the stamp says this pyproject.toml is installed there with at least that extra. The stamp is one line,
# "<sha256 of pyproject.toml> <installed extras, comma-separated>"; a reinstall keeps the extras already there.
setup() {
  local extra=${1:-}
  if [[ "${MOEJAX_SKIP_SETUP:-}" == 1 ]]; then
    return
  fi
  local stamp="$VENV/.moejax-installed" want have="" installed=""
  want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
  if [[ -f "$stamp" ]]; then
    read -r have installed < "$stamp" || true
  fi
  if [[ "$have" == "$want" && ( -z "$extra" || ",$installed," == *",$extra,"* ) ]]; then
    return
  fi
  local extras=$installed
  if [[ -n "$extra" && ",$extras," != *",$extra,"* ]]; then
    extras=${extras:+$extras,}$extra
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "launch.sh: creating $VENV with $("$PYTHON" --version 2>&1)" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  echo "launch.sh: installing moejax${extras:+[$extras]} and its dependencies into $VENV (first run takes a few" \
    "minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT${extras:+[$extras]}"
  echo "$want $extras" > "$stamp"
}

# quote: the arguments as one shell-quoted string (printf %q), for a command line run by a remote shell
quote() {
  local out="" arg
  for arg in "$@"; do
    out+=" $(printf '%q' "$arg")"
  done
  echo "${out# }"
}

die() {
  echo "launch.sh: $*" >&2
  exit 2
}

processes=1 port=12355 local_devices="" tpu="" zone="" project="" tpu_dir="~/moejax" slurm=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --processes) processes=${2:?--processes needs a number}; shift 2 ;;
    --port) port=${2:?--port needs a number}; shift 2 ;;
    --local_devices) local_devices=${2:?--local_devices needs a number}; shift 2 ;;
    --tpu) tpu=${2:?--tpu needs the TPU VM name}; shift 2 ;;
    --zone) zone=${2:?--zone needs a zone}; shift 2 ;;
    --project) project=${2:?--project needs a project}; shift 2 ;;
    --tpu_dir) tpu_dir=${2:?--tpu_dir needs a directory}; shift 2 ;;
    --slurm) slurm=1; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer; got '$processes'"
[[ -z "$local_devices" || "$local_devices" =~ ^[1-9][0-9]*$ ]] || die "--local_devices must be a positive integer; got '$local_devices'"
if [[ -n "$tpu" && -z "$zone" ]]; then die "--tpu $tpu needs --zone"; fi
if [[ -n "$zone" && -z "$tpu" ]]; then die "--zone needs --tpu NAME"; fi
if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
command=$1
shift
cd "$ROOT"

run_experiment() {
  local script="experiments/$command.py"
  if [[ ! -f "$script" ]]; then
    die "unknown experiment '$command' (no $script); available: $(cd experiments && ls *.py | sed 's/\.py$//' | tr '\n' ' ')"
  fi
  local args=()
  if [[ -f "configs/$command.py" && " $* " != *" --config="* && " $* " != *" --config "* ]]; then
    args+=("--config=configs/$command.py")
  fi
  if [[ -n "$local_devices" ]]; then
    export JAX_NUM_CPU_DEVICES=$local_devices
  fi
  if [[ -n "$tpu" ]]; then
    command -v gcloud >/dev/null || die "--tpu needs the gcloud CLI on this machine"
    # every argument quoted for the worker's shell; a leading ~/ of --tpu_dir stays unquoted so it expands there
    local dir
    if [[ "$tpu_dir" == "~/"* ]]; then
      dir="~/$(quote "${tpu_dir#"~/"}")"
    else
      dir=$(quote "$tpu_dir")
    fi
    local remote="cd $dir && MOEJAX_DISTRIBUTED=auto ./launch.sh $(quote "$command" ${args[@]+"${args[@]}"} "$@")"
    exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${project:+--project "$project"} --worker=all \
      --command "$remote"
  fi
  local extra="" name
  for name in "${TEST_EXTRA_EXPERIMENTS[@]}"; do
    if [[ "$command" == "$name" ]]; then
      extra=test
    fi
  done
  setup "$extra"
  if [[ "$slurm" == 1 ]]; then
    [[ -n "${SLURM_JOB_ID:-}" ]] || die "--slurm runs inside a SLURM job (srun ./launch.sh --slurm ...); SLURM_JOB_ID is not set"
    MOEJAX_DISTRIBUTED=auto exec "$VENV/bin/python" "$script" "${args[@]}" "$@"
  fi
  if [[ "$processes" == 1 ]]; then
    exec "$VENV/bin/python" "$script" "${args[@]}" "$@"
  fi
  mkdir -p workdir/launch
  local pids=() i
  for ((i = 0; i < processes; i++)); do
    local log="workdir/launch/process_$i.log"
    MOEJAX_DISTRIBUTED=local MOEJAX_COORDINATOR="localhost:$port" MOEJAX_NUM_PROCESSES=$processes \
      MOEJAX_PROCESS_ID=$i "$VENV/bin/python" "$script" "${args[@]}" "$@" >"$log" 2>&1 &
    pids+=($!)
  done
  local status=0
  for ((i = 0; i < processes; i++)); do
    if ! wait "${pids[$i]}"; then
      echo "launch.sh: process $i failed; its log: workdir/launch/process_$i.log" >&2
      tail -5 "workdir/launch/process_$i.log" >&2
      status=1
    fi
  done
  cat workdir/launch/process_0.log
  exit $status
}

case "$command" in
  help)
    usage ;;
  setup)
    [[ $# -le 1 && "${1:-test}" == test ]] || die "setup takes no argument or 'test'; got '$*'"
    setup "${1:-}" ;;
  test)
    setup test
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    run_experiment "$@" ;;
esac
