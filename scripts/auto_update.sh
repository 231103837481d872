#!/usr/bin/env bash
# Launcher shared by run_miner.sh and run_validator.sh: runs a neuron under pm2 and keeps it updated.
#
#   pm2 start run_miner.sh --name NAME -- [--update.interval SECONDS] <neuron flags>
#
# This script is the pm2 process NAME. It starts the neuron as a second pm2 process, NAME-neuron
# (the checkout's .venv/bin/dt-miner or dt-validator with the given flags), then polls the branch
# this checkout tracks every --update.interval seconds (env UPDATE_INTERVAL; default 1200; 0 turns
# updating off). When the remote's __version__ is newer than the local one it fast-forwards,
# reinstalls, runs post_install.py if there is one, checks that the package imports and that the
# neuron's --help runs, and only then restarts NAME-neuron. Any failure rolls the checkout back to
# the previous commit and reinstalls it; the running neuron is left alone. Local changes to tracked
# files are never overwritten: the update is skipped and the reason logged.
#
# Environment: DT_PYTHON (interpreter of the environment the package is installed in; default
# <checkout>/.venv/bin/python, the neuron binary is taken from the same bin directory),
# UPDATE_INTERVAL, DT_PM2 (the pm2 command; default pm2 on PATH), DT_PM2_NAME (default: the
# name pm2 gave this process), DT_KILL_TIMEOUT_MS (how long pm2 waits for the neuron to stop
# before killing it; default 20000). Decisions are logged one line each, with a UTC timestamp,
# to stdout (`pm2 logs NAME`).

set -uo pipefail

# -- versions -------------------------------------------------------------------------------------
version_in() { sed -n "s/^__version__ = [\"']\\([^\"']*\\)[\"'].*/\\1/p" | head -n 1; }
version_at() { git show "$1:distributed_training/__init__.py" 2>/dev/null | version_in; }

# Semantic version precedence (MAJOR.MINOR.PATCH[-prerelease][+build]); exit 0 when $1 > $2,
# 1 when not, 2 when either does not parse.
_cmp_ids() { # compare two dot-separated prerelease lists; prints -1, 0 or 1
  local IFS=. i x y; local -a a b
  read -r -a a <<<"$1"; read -r -a b <<<"$2"
  for ((i = 0; i < ${#a[@]} || i < ${#b[@]}; i++)); do
    if ((i >= ${#a[@]})); then echo -1; return; fi
    if ((i >= ${#b[@]})); then echo 1; return; fi
    x=${a[i]} y=${b[i]}
    if [[ $x =~ ^[0-9]+$ && $y =~ ^[0-9]+$ ]]; then
      if ((10#$x > 10#$y)); then echo 1; return; elif ((10#$x < 10#$y)); then echo -1; return; fi
    elif [[ $x =~ ^[0-9]+$ ]]; then echo -1; return
    elif [[ $y =~ ^[0-9]+$ ]]; then echo 1; return
    elif [[ $x > $y ]]; then echo 1; return
    elif [[ $x < $y ]]; then echo -1; return
    fi
  done
  echo 0
}
semver_gt() {
  local re='^v?([0-9]+(\.[0-9]+)*)(-([0-9A-Za-z.-]+))?(\+[0-9A-Za-z.-]+)?$' a_core a_pre b_core b_pre c
  [[ $1 =~ $re ]] || return 2; a_core=${BASH_REMATCH[1]} a_pre=${BASH_REMATCH[4]}
  [[ $2 =~ $re ]] || return 2; b_core=${BASH_REMATCH[1]} b_pre=${BASH_REMATCH[4]}
  # Missing trailing parts count as 0 (1.2 == 1.2.0): pad before comparing numerically.
  local IFS=. i; local -a a b
  read -r -a a <<<"$a_core"; read -r -a b <<<"$b_core"
  c=0
  for ((i = 0; i < ${#a[@]} || i < ${#b[@]}; i++)); do
    local x=$((10#${a[i]:-0})) y=$((10#${b[i]:-0}))
    if ((x > y)); then c=1; break; elif ((x < y)); then c=-1; break; fi
  done
  if ((c == 0)); then
    if [[ -z $a_pre && -n $b_pre ]]; then c=1
    elif [[ -n $a_pre && -z $b_pre ]]; then c=-1
    elif [[ -n $a_pre ]]; then c=$(_cmp_ids "$a_pre" "$b_pre")
    fi
  fi
  ((c > 0))
}

ROLE=${1:-}
case "$ROLE" in
  miner | validator) shift ;;
  version-gt) semver_gt "${2:-}" "${3:-}"; exit ;; # exit 0 when $2 > $3, 1 when not, 2 when unparsable
  *) echo "usage: $0 miner|validator [--update.interval SECONDS] [neuron flags...]" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
ORIG_ARGS=("$@")
export GIT_TERMINAL_PROMPT=0

# pm2 exports the process name as $name (with $pm_id) to the processes it runs.
if [[ -n ${DT_PM2_NAME:-} ]]; then
  NAME=$DT_PM2_NAME
elif [[ -n ${pm_id:-} && -n ${name:-} ]]; then
  NAME=$name
else
  NAME="dt-$ROLE"
fi
NEURON_NAME="$NAME-neuron"

log() { printf '%s [auto-update %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$NAME" "$*"; }
# The last lines of a failed command's output, indented under the decision line they explain.
log_detail() { [[ -n $1 ]] && tail -n "${2:-15}" <<<"$1" | sed 's/^/    | /'; return 0; }

INTERVAL=${UPDATE_INTERVAL:-1200}
NEURON_ARGS=()
while (($#)); do
  case "$1" in
    --update.interval)
      if (($# < 2)); then log "error: --update.interval needs a value (seconds)"; exit 2; fi
      INTERVAL=$2; shift 2 ;;
    --update.interval=*) INTERVAL=${1#*=}; shift ;;
    *) NEURON_ARGS+=("$1"); shift ;;
  esac
done
if ! [[ $INTERVAL =~ ^[0-9]+$ ]]; then
  log "error: --update.interval / UPDATE_INTERVAL must be a whole number of seconds (0 turns updating off), not '$INTERVAL'"
  exit 2
fi
INTERVAL=$((10#$INTERVAL))

PY=${DT_PYTHON:-$REPO/.venv/bin/python}
NEURON_BIN="$(dirname "$PY")/dt-$ROLE"
PM2=${DT_PM2:-pm2}
KILL_TIMEOUT_MS=${DT_KILL_TIMEOUT_MS:-20000}
if ! command -v "$PM2" >/dev/null 2>&1; then
  log "error: pm2 not found (install it with 'npm install -g pm2', or point DT_PM2 at it)"; exit 1
fi
if [[ ! -x $PY ]]; then
  log "error: no python at $PY (run scripts/install.sh, or set DT_PYTHON)"; exit 1
fi

# Commits whose update failed: not retried until the remote moves on (survives the re-exec below).
FAILED=" ${DT_LAUNCHER_FAILED:-} "
REEXEC=${DT_LAUNCHER_REEXEC:-}
unset DT_LAUNCHER_REEXEC DT_LAUNCHER_FAILED # not for the neuron's environment

# -- helpers -------------------------------------------------------------------------------------
pm2_quiet() { # run pm2, keep its output for the log only when it fails
  local out
  if out=$("$PM2" "$@" 2>&1); then return 0; fi
  log_detail "$out" 8
  return 1
}
neuron_pid() { "$PM2" pid "$NEURON_NAME" 2>/dev/null | tail -n 1 | tr -dc '0-9'; }

start_neuron() {
  if [[ ! -x $NEURON_BIN ]]; then
    log "error: $NEURON_BIN does not exist (run scripts/install.sh, or set DT_PYTHON)"; return 1
  fi
  pm2_quiet start "$NEURON_BIN" --name "$NEURON_NAME" --interpreter none --cwd "$REPO" \
    --kill-timeout "$KILL_TIMEOUT_MS" -- "${NEURON_ARGS[@]}" || return 1
  log "started: pm2 process $NEURON_NAME (pid $(neuron_pid)): dt-$ROLE ${NEURON_ARGS[*]}"
}

# Runs a step of an update; on failure logs which one and the tail of its output.
STEP_OUTPUT=""
run_step() {
  local what=$1 rc; shift
  STEP_OUTPUT=$("$@" 2>&1); rc=$?
  ((rc == 0)) && return 0
  log "failed: $what (exit $rc)"
  log_detail "$STEP_OUTPUT"
  return 1
}
reinstall() {
  run_step "reinstall: $PY -m pip install -e ." \
    "$PY" -m pip install --disable-pip-version-check -q -e "$REPO"
}

verify() { # $1: the version the installed package must report
  local got
  if [[ -f post_install.py ]]; then
    run_step "post_install.py" "$PY" post_install.py || return 1
    log "ran post_install.py"
  fi
  run_step "import check" "$PY" -c "import distributed_training, neurons.$ROLE
print(distributed_training.__version__)" || return 1
  got=$(tail -n 1 <<<"$STEP_OUTPUT")
  if [[ $got != "$1" ]]; then
    log "failed: the installed package reports version '$got', expected '$1'"; return 1
  fi
  run_step "dt-$ROLE --help" timeout 120 "$NEURON_BIN" --help || return 1
  run_step "launcher syntax check" bash -n "run_$ROLE.sh" || return 1
  run_step "launcher syntax check" bash -n scripts/auto_update.sh || return 1
}

rollback() { # $1: the commit to go back to
  local old=$1
  if ! run_step "git reset --hard ${old:0:12}" git reset --hard --quiet "$old"; then
    log "ROLLBACK FAILED: the checkout is not at ${old:0:12}; the neuron keeps running the code it loaded; fix by hand"
    return 1
  fi
  if ! reinstall; then
    log "ROLLBACK FAILED: reinstalling ${old:0:12} failed; the neuron keeps running the code it loaded; fix by hand"
    return 1
  fi
  log "rolled back: checkout at ${old:0:12} (version $(version_at HEAD)) and reinstalled; $NEURON_NAME keeps running (pid $(neuron_pid))"
}

# One poll: exactly one decision line unless an update is attempted (then one line per step).
poll() {
  local branch upstream remote remote_sha local_sha local_v remote_v dirty out old
  branch=$(git symbolic-ref --short -q HEAD) &&
    upstream=$(git rev-parse --abbrev-ref --symbolic-full-name '@{upstream}' 2>/dev/null) &&
    remote=$(git config "branch.$branch.remote") || {
      log "skip: the checkout is not on a branch that tracks a remote branch (detached HEAD?); nothing to poll"; return; }
  if ! out=$(timeout 300 git fetch --quiet "$remote" 2>&1); then
    log "skip: git fetch $remote failed; will retry in ${INTERVAL}s"; log_detail "$out" 5; return
  fi
  remote_sha=$(git rev-parse "$upstream") local_sha=$(git rev-parse HEAD)
  local_v=$(version_at HEAD) remote_v=$(version_at "$remote_sha")
  if [[ -z $local_v || -z $remote_v ]]; then
    log "skip: cannot read __version__ (local '${local_v}', $upstream '${remote_v}')"; return
  fi
  semver_gt "$remote_v" "$local_v"
  case $? in
    1)
      if [[ $local_v == "$remote_v" ]]; then
        log "up to date: local $local_v (${local_sha:0:12}), $upstream $remote_v (${remote_sha:0:12})"
      else
        log "no update: $upstream has an older version, $remote_v (${remote_sha:0:12}), than local $local_v (${local_sha:0:12})"
      fi
      return ;;
    2) log "skip: cannot compare versions '$remote_v' and '$local_v' (not semantic versions)"; return ;;
  esac
  if [[ $FAILED == *" $remote_sha "* ]]; then
    log "skip: $upstream $remote_v (${remote_sha:0:12}) failed to install before; waiting for a newer commit"; return
  fi
  dirty=$(git status --porcelain --untracked-files=no)
  if [[ -n $dirty ]]; then
    log "skip: update $local_v -> $remote_v available but the checkout has local changes to tracked files ($(awk '{print $NF}' <<<"$dirty" | paste -sd, -)); commit or revert them to resume updates; nothing was changed"
    return
  fi
  if ! git merge-base --is-ancestor HEAD "$remote_sha"; then
    log "skip: update $local_v -> $remote_v available but local commits diverge from $upstream; cannot fast-forward; nothing was changed"
    return
  fi

  old=$local_sha
  log "updating: $local_v (${old:0:12}) -> $remote_v (${remote_sha:0:12}) from $upstream"
  if ! run_step "git merge --ff-only" git merge --ff-only --quiet "$remote_sha"; then
    if [[ $(git rev-parse HEAD) == "$old" ]]; then
      log "skip: could not fast-forward to $remote_v (see above); nothing was changed; retrying at the next poll"
      return
    fi
    FAILED+="$remote_sha "
    log "update failed: $remote_v (${remote_sha:0:12}) not deployed; rolling back to ${old:0:12}"
    rollback "$old"
    return
  fi
  if reinstall && verify "$remote_v"; then
    local before after
    before=$(neuron_pid)
    if pm2_quiet restart "$NEURON_NAME"; then
      after=$(neuron_pid)
      log "updated: now at $remote_v (${remote_sha:0:12}); restarted $NEURON_NAME (pid $before -> $after)"
    else
      log "updated: now at $remote_v (${remote_sha:0:12}), but 'pm2 restart $NEURON_NAME' failed; starting it"
      start_neuron
    fi
    # Continue with the launcher of the new release (same pid, so pm2 sees no restart).
    log "re-executing the launcher of $remote_v"
    DT_LAUNCHER_REEXEC=1 DT_LAUNCHER_FAILED="${FAILED# }" exec bash "$REPO/run_$ROLE.sh" "${ORIG_ARGS[@]}"
  fi
  FAILED+="$remote_sha "
  log "update failed: $remote_v (${remote_sha:0:12}) not deployed; rolling back to ${old:0:12}"
  rollback "$old"
}

# -- main ----------------------------------------------------------------------------------------
trap 'log "stopping (signal); $NEURON_NAME keeps running under pm2 (pm2 stop $NEURON_NAME to stop it)"; exit 0' INT TERM

pid=$(neuron_pid)
if [[ $REEXEC == 1 && -n $pid && $pid != 0 ]]; then
  log "launcher restarted after an update; keeping $NEURON_NAME (pid $pid)"
else
  if [[ -n $pid ]]; then
    log "replacing the existing pm2 process $NEURON_NAME (pid $pid) so it runs with these flags"
    pm2_quiet delete "$NEURON_NAME"
  fi
  start_neuron || { log "error: could not start $NEURON_NAME"; exit 1; }
fi

if ((INTERVAL == 0)); then
  log "auto-update off (--update.interval 0); $NEURON_NAME runs under pm2 as it is"
  while true; do sleep 3600 & wait $!; done
fi
log "polling every ${INTERVAL}s: version $(version_at HEAD) at $(git rev-parse --short=12 HEAD)"
# Launchers sharing a checkout (not recommended: see docs/operating-updates.md) never update it at once.
LOCK_FILE="$(git rev-parse --absolute-git-dir 2>/dev/null || echo "$REPO")/dt-auto-update.lock"
if command -v flock >/dev/null 2>&1 && exec 9>>"$LOCK_FILE"; then
  lock() { flock -w 3600 9 || log "warning: could not lock $LOCK_FILE within an hour; polling anyway"; }
  unlock() { flock -u 9; }
else
  lock() { :; }
  unlock() { :; }
fi
while true; do
  sleep "$INTERVAL" & wait $!
  lock
  poll
  unlock
done
