#!/usr/bin/env bash
# Cloud TPU VMs / pod slices for multians_jax: create, set up, launch on all
# workers at once, collect logs, stop, delete. Run `./run_tpu.sh --help`.
set -euo pipefail

readonly PROG="${0##*/}"
if [[ "${BASH_SOURCE[0]}" == */* ]]; then
  REPO_ROOT="$(cd "${BASH_SOURCE[0]%/*}" && pwd)"
else
  REPO_ROOT="$PWD"
fi
readonly REPO_ROOT
GCLOUD="${GCLOUD:-gcloud}"  # the gcloud binary (overridable for tests)

# Defaults; every one can be set by a flag or the environment variable.
NAME="${TPU_NAME:-multians}"
ZONE="${TPU_ZONE:-us-east5-a}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v5p-8}"
VERSION="${TPU_VERSION:-v2-alpha-tpuv5}"
REMOTE_DIR="${TPU_REMOTE_DIR:-multians_jax}"  # relative to the remote $HOME
VENV="${TPU_VENV:-multians_venv}"             # relative to the remote $HOME
REPO_URL="${TPU_REPO_URL:-}"
BRANCH="${TPU_BRANCH:-main}"
PYTHON="${PYTHON:-python3}"  # local Python for the compile check
ACCEL_SET=0
[[ -n "${TPU_ACCELERATOR_TYPE:-}" ]] && ACCEL_SET=1
CHECK=1
SPOT=0
QUEUED=0
DRY_RUN=0
FOLLOW=0
CONFIG=""
WORKDIR=""
LOG_OUT=""
ENVS=()
OVERRIDES=()

usage() {
  cat <<EOF
Usage: $PROG [--dry-run] COMMAND [OPTIONS] [-- --config.KEY=VALUE ...]

Manage a Cloud TPU VM or pod slice and run multians_jax on it. Commands that
touch the workers use --worker=all, so a pod slice (e.g. v5p-32 = 4 hosts)
runs one JAX process per host; jax.distributed discovers its peers by itself.

Commands:
  create   Create the TPU VM / pod slice (tpu-vm create, or queued-resources
           create with --queued). Options: --accelerator-type --version
           --spot --queued; with --config (and overrides), first the
           compile check below.
  setup    On every worker: copy this working tree (git-tracked and untracked
           non-ignored files, as one tarball) or clone --repo-url, create a
           virtualenv and 'pip install -e ".[tpu]"'. Idempotent: safe to
           re-run after code changes.
  launch   Start 'python -m multians_jax.main --config=CONFIG --workdir=DIR
           [--config.KEY=VALUE ...]' on all workers at once, detached (nohup),
           one log per worker in REMOTE_DIR/logs/train-<hostname>.log.
           Options: --config (required) --workdir (required, may be gs://...)
           --env KEY=VALUE (repeatable). Overrides: any --config.KEY=VALUE
           argument, or everything after '--'.
           First, the compile check: tools/aot.py compiles every stage of
           one RL step for the slice's topology on this machine and stops
           the launch when one fails to compile or does not fit the chips'
           HBM (needs pip install -e ".[aot]" here; --no-check skips it).
  logs     Copy every worker's logs to --out (default ./tpu_logs/NAME);
           with --follow, stream them (tail -f on all workers) instead.
  stop     Stop the training process on every worker (TERM, then KILL
           after 30 s).
  delete   Delete the TPU VM (with --queued: the queued resource and its node).
  status   Describe the TPU (or queued resource) and list the training
           processes on each worker.

Common options (any position; environment variable in brackets):
  --name NAME               TPU / node name [TPU_NAME] (default: $NAME)
  --zone ZONE               zone [TPU_ZONE] (default: $ZONE)
  --project PROJECT         project [TPU_PROJECT] (default: gcloud's)
  --queued                  use the queued-resources API (create, delete,
                            status); the node id equals --name
  --remote-dir DIR          code directory on the workers, relative to
                            \$HOME [TPU_REMOTE_DIR] (default: $REMOTE_DIR)
  --venv DIR                virtualenv on the workers, relative to \$HOME
                            [TPU_VENV] (default: $VENV)
  --dry-run                 print every command, one per line, exactly as it
                            would run, and run none (no gcloud needed)
  --no-check                skip the local compile check of create / launch
  -h, --help                this help; '$PROG COMMAND --help' for one command

create options:
  --accelerator-type TYPE   e.g. v5p-8, v5p-32, v4-32, v6e-16
                            [TPU_ACCELERATOR_TYPE] (default: $ACCELERATOR_TYPE)
  --version VERSION         TPU runtime, e.g. v2-alpha-tpuv5 (v5p),
                            v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)
                            [TPU_VERSION] (default: $VERSION)
  --spot                    Spot VMs (cheaper, preemptible)

setup options:
  --repo-url URL            git clone URL instead of copying this tree
                            [TPU_REPO_URL]
  --branch BRANCH           branch or tag to check out with --repo-url
                            [TPU_BRANCH] (default: $BRANCH)

launch options:
  --config NAME|PATH        configs/NAME.py, or a path to a config file
  --accelerator-type TYPE   the slice to check against (default: asked of
                            gcloud for --name; with --dry-run, $ACCELERATOR_TYPE)
  --workdir DIR             checkpoints and logs (local path or gs://bucket/..)
  --env KEY=VALUE           environment variable for the training processes

logs options:
  --follow                  stream (tail -f) instead of copying
  --out DIR                 local directory for copied logs

Examples:
  $PROG create --name rl --zone us-east5-a --accelerator-type v5p-32 --spot
  $PROG setup --name rl --zone us-east5-a
  $PROG launch --name rl --zone us-east5-a --config qwen3_8b_multi_rlcr \\
      --workdir gs://my-bucket/runs/rlcr1 --config.rl.num_generations=32
  $PROG logs --name rl --zone us-east5-a --follow
  $PROG --dry-run launch --config tiny --workdir gs://b/run
EOF
}

command_help() {
  # Prints the general help's lines for one command and its options.
  local cmd="$1"
  usage | awk -v c="$cmd" '
    /^Commands:/ {sec="cmds"; next}
    /^[a-z]+ options:/ {sec=$1; if (sec==c) print; next}
    /^Common options/ {sec="common"; print ""; print; next}
    /^Examples:/ {sec="ex"; next}
    sec=="cmds" && $1==c {on=1; print; next}
    sec=="cmds" && /^  [a-z]/ {on=0}
    sec=="cmds" && on {print}
    sec==c || sec=="common" {print}
  '
}

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

# Shell-quotes one word only when needed, so printed commands stay readable
# and can be pasted into a shell as they are.
quote() {
  local s="$1"
  if [[ "$s" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

# Prints the command; runs it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

check_gcloud() {
  ((DRY_RUN)) && return 0
  command -v "$GCLOUD" >/dev/null 2>&1 \
    || die "gcloud (the Google Cloud CLI) was not found on PATH. Install it" \
      "(https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'."
  local account
  account="$("$GCLOUD" auth list --filter=status:ACTIVE \
    --format='value(account)' 2>/dev/null || true)"
  [[ -n "$account" ]] \
    || die "gcloud is not authenticated (no active account in" \
      "'gcloud auth list'). Run 'gcloud auth login'."
}

location_flags() {
  LOC=("--zone=$ZONE")
  [[ -n "$PROJECT" ]] && LOC+=("--project=$PROJECT")
  return 0
}

# The topology name tools/aot.py compiles for, from an accelerator type:
# v4 / v5p count TensorCores (2 per chip, 3-D tori), v5e / v6e count chips.
topology_of() {
  local t="$1" gen n chips shape
  gen="${t%-*}"
  n="${t##*-}"
  [[ "$t" == *-* && "$n" =~ ^[0-9]+$ ]] || return 1
  case "$gen" in
    v4 | v5p)
      chips=$((n / 2))
      case "$chips" in
        4) shape=2x2x1 ;; 8) shape=2x2x2 ;; 16) shape=2x2x4 ;;
        32) shape=2x4x4 ;; 64) shape=4x4x4 ;; 128) shape=4x4x8 ;;
        256) shape=4x8x8 ;; 512) shape=8x8x8 ;; *) return 1 ;;
      esac
      ;;
    v5litepod | v5e | v6e)
      [[ "$gen" == v6e ]] || gen=v5e
      case "$n" in
        1) shape=1x1 ;; 4) shape=2x2 ;; 8) shape=2x4 ;; 16) shape=4x4 ;;
        32) shape=4x8 ;; 64) shape=8x8 ;; 128) shape=8x16 ;;
        256) shape=16x16 ;; *) return 1 ;;
      esac
      ;;
    *) return 1 ;;
  esac
  printf '%s:%s' "$gen" "$shape"
}

# Compiles the run for the slice here (tools/aot.py) before paying for it.
compile_check() {
  ((CHECK)) || return 0
  [[ -n "$CONFIG" ]] || return 0
  local accel="$ACCELERATOR_TYPE" topo
  if [[ "$1" == launch ]] && ((!ACCEL_SET && !DRY_RUN)); then
    accel="$("$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOC[@]}" \
      '--format=value(acceleratorType)')" || accel=""
    [[ -n "$accel" ]] || die "could not read the accelerator type of" \
      "'$NAME' from gcloud for the compile check: pass --accelerator-type" \
      "TYPE, or --no-check"
  fi
  topo="$(topology_of "$accel")" \
    || die "no compile check for accelerator type '$accel' (known: v4-N," \
      "v5p-N, v5litepod-N, v6e-N): pass --no-check to go on without one"
  (cd "$REPO_ROOT" && run "$PYTHON" tools/aot.py \
    "--config=$(config_path "$CONFIG")" "--topology=$topo" \
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}") \
    || die "compile check: the run does not compile or does not fit on" \
      "$accel ($topo); see tools/aot.py's report above (--no-check skips" \
      "the check)"
}

tpu_ssh() {
  # Runs a shell command on every worker at once.
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all \
    "--command=$1"
}

# ---------------------------------------------------------------------------
# Commands

cmd_create() {
  compile_check create
  if ((QUEUED)); then
    local args=(compute tpus queued-resources create "$NAME" "--node-id=$NAME"
      "${LOC[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
      "--runtime-version=$VERSION")
  else
    local args=(compute tpus tpu-vm create "$NAME" "${LOC[@]}"
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION")
  fi
  ((SPOT)) && args+=(--spot)
  run "$GCLOUD" "${args[@]}"
}

setup_remote_script() {
  # Idempotent worker set-up: (re)fetch the code, reuse the virtualenv.
  local dir venv fetch
  dir="$(quote "$REMOTE_DIR")"
  venv="$(quote "$VENV")"
  if [[ -n "$REPO_URL" ]]; then
    local url branch
    url="$(quote "$REPO_URL")"
    branch="$(quote "$BRANCH")"
    fetch="if [ -d $dir/.git ]; then git -C $dir fetch --depth=1 origin"
    fetch+=" $branch && git -C $dir checkout -f FETCH_HEAD;"
    fetch+=" else git clone --depth=1 --branch $branch $url $dir; fi"
  else
    fetch="mkdir -p $dir && tar -xzf multians_src.tgz -C $dir"
    fetch+=" && rm -f multians_src.tgz"
  fi
  printf '%s' "set -e; $fetch; [ -x ~/$venv/bin/python ] ||" \
    " python3 -m venv ~/$venv; ~/$venv/bin/python -m pip install -q -U pip;" \
    " cd $dir && ~/$venv/bin/python -m pip install -q -e '.[tpu]'"
}

cmd_setup() {
  if [[ -z "$REPO_URL" ]]; then
    local tarball="${TMPDIR:-/tmp}/multians_src_${NAME}.tgz"
    run bash -c "cd $(quote "$REPO_ROOT") && git ls-files -z --cached \
--others --exclude-standard | tar --null -T - -czf $(quote "$tarball")"
    run "$GCLOUD" compute tpus tpu-vm scp "$tarball" \
      "$NAME:multians_src.tgz" "${LOC[@]}" --worker=all
  fi
  tpu_ssh "$(setup_remote_script)"
}

config_path() {
  local c="$1"
  if [[ "$c" == */* || "$c" == *.py ]]; then
    printf '%s' "$c"
  else
    printf 'configs/%s.py' "$c"
  fi
}

launch_remote_script() {
  local dir venv train
  dir="$(quote "$REMOTE_DIR")"
  venv="$(quote "$VENV")"
  train="$(quote_all "${ENVS[@]+"${ENVS[@]}"}")"
  train+="${train:+ }~/$venv/bin/python -m multians_jax.main"
  train+=" $(quote "--config=$(config_path "$CONFIG")")"
  train+=" $(quote "--workdir=$WORKDIR")"
  if ((${#OVERRIDES[@]})); then
    train+=" $(quote_all "${OVERRIDES[@]}")"
  fi
  # shellcheck disable=SC2016  # $(hostname) and $! expand on the worker.
  printf '%s' "cd $dir && mkdir -p logs && if [ -f logs/train.pid ] &&" \
    ' kill -0 "$(cat logs/train.pid)" 2>/dev/null; then echo' \
    ' "$(hostname): training already running; use stop first" >&2; exit 1;' \
    " fi; nohup env $train" \
    ' > "logs/train-$(hostname).log" 2>&1 < /dev/null & echo $! >' \
    ' logs/train.pid; echo "$(hostname): started pid $(cat logs/train.pid)"'
}

validate_launch() {
  [[ -n "$CONFIG" ]] || die "launch needs --config NAME|PATH"
  [[ -n "$WORKDIR" ]] || die "launch needs --workdir DIR (may be gs://...)"
  local o
  for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    [[ "$o" == --config.* ]] \
      || die "override '$o' is not of the form --config.KEY=VALUE"
  done
}

cmd_launch() {
  compile_check launch
  tpu_ssh "$(launch_remote_script)"
}

cmd_logs() {
  local dir
  dir="$(quote "$REMOTE_DIR")"
  if ((FOLLOW)); then
    tpu_ssh "tail -n 50 -F $dir/logs/train-*.log"
  else
    local out="${LOG_OUT:-tpu_logs/$NAME}"
    run mkdir -p "$out"
    run "$GCLOUD" compute tpus tpu-vm scp \
      "$NAME:$REMOTE_DIR/logs/train-*.log" "$out/" "${LOC[@]}" --worker=all
  fi
}

cmd_stop() {
  local dir
  dir="$(quote "$REMOTE_DIR")"
  # shellcheck disable=SC2016  # expanded on the worker.
  tpu_ssh "$(printf '%s' "f=$dir/logs/train.pid; if [ -f \$f ]; then" \
    ' p=$(cat $f); kill -TERM $p 2>/dev/null || true; for i in $(seq 30);' \
    ' do kill -0 $p 2>/dev/null || break; sleep 1; done;' \
    ' kill -KILL $p 2>/dev/null || true; rm -f $f;' \
    ' echo "$(hostname): stopped $p"; else echo "$(hostname): not running";' \
    ' fi')"
}

cmd_delete() {
  if ((QUEUED)); then
    run "$GCLOUD" compute tpus queued-resources delete "$NAME" "${LOC[@]}" \
      --force --quiet
  else
    run "$GCLOUD" compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

cmd_status() {
  if ((QUEUED)); then
    run "$GCLOUD" compute tpus queued-resources describe "$NAME" "${LOC[@]}"
  fi
  run "$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOC[@]}" \
    '--format=value(state,acceleratorType,runtimeVersion)'
  tpu_ssh "echo \"\$(hostname): \$(pgrep -af '[m]ultians_jax.main' \
|| echo not running)\""
}

# ---------------------------------------------------------------------------
# Argument parsing

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"
}

main() {
  local cmd="" help=0
  while (($#)); do
    case "$1" in
      -h | --help) help=1 ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --follow) FOLLOW=1 ;;
      --no-check) CHECK=0 ;;
      --name | --zone | --project | --accelerator-type | --version | \
        --repo-url | --branch | --config | --workdir | --out | --env | \
        --remote-dir | --venv)
        need_value "$@"
        set_option "$1" "$2"
        shift
        ;;
      --name=* | --zone=* | --project=* | --accelerator-type=* | \
        --version=* | --repo-url=* | --branch=* | --config=* | --workdir=* | \
        --out=* | --env=* | --remote-dir=* | --venv=*)
        [[ -n "${1#*=}" ]] || die "option ${1%%=*} needs a value"
        set_option "${1%%=*}" "${1#*=}"
        ;;
      --config.*) OVERRIDES+=("$1") ;;
      --)
        shift
        OVERRIDES+=("$@")
        break
        ;;
      create | setup | launch | logs | stop | delete | status)
        [[ -z "$cmd" ]] || die "two commands given: $cmd and $1"
        cmd="$1"
        ;;
      *) die "unknown argument '$1' (see $PROG --help)" ;;
    esac
    shift
  done
  if ((help)); then
    if [[ -n "$cmd" ]]; then command_help "$cmd"; else usage; fi
    return 0
  fi
  [[ -n "$cmd" ]] || {
    usage >&2
    die "no command given"
  }
  if declare -F "validate_$cmd" >/dev/null; then "validate_$cmd"; fi
  check_gcloud
  location_flags
  "cmd_$cmd"
}

set_option() {
  case "$1" in
    --name) NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
    --accelerator-type)
      ACCELERATOR_TYPE="$2"
      ACCEL_SET=1
      ;;
    --version) VERSION="$2" ;;
    --repo-url) REPO_URL="$2" ;;
    --branch) BRANCH="$2" ;;
    --config) CONFIG="$2" ;;
    --workdir) WORKDIR="$2" ;;
    --out) LOG_OUT="$2" ;;
    --remote-dir) REMOTE_DIR="$2" ;;
    --venv) VENV="$2" ;;
    --env)
      [[ "$2" == *=* ]] || die "--env needs KEY=VALUE, got '$2'"
      ENVS+=("$2")
      ;;
  esac
}

main "$@"
