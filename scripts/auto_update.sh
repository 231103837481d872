#!/usr/bin/env bash
# Launcher shared by run_miner.sh and run_validator.sh: runs a neuron under pm2 and keeps it updated.
#
#   pm2 start run_miner.sh --name NAME -- [--update.interval SECONDS] [--update.watch SECONDS] <neuron flags>
#
# This script is the pm2 process NAME. It starts the neuron as a second pm2 process, NAME-neuron
# (the checkout's .venv/bin/dt-miner or dt-validator with the given flags), then polls the branch
# this checkout tracks every --update.interval seconds (env UPDATE_INTERVAL; default 1200; 0 turns
# updating off). When the remote's __version__ is newer than the local one it fast-forwards,
# reinstalls with scripts/install.sh, runs post_install.py if there is one, checks that the package
# imports and that the neuron's --help runs, and only then restarts NAME-neuron. It then watches
# the restarted neuron for --update.watch seconds (env UPDATE_WATCH; default 600; 0: no watch): the
# neuron must write a new "start" event to <state dir>/metrics.jsonl (it has joined the swarm) and
# stay up UPDATE_STABLE seconds after it, without restarting more than UPDATE_MAX_RESTARTS times.
# Any failure, before or after the restart, rolls the checkout back to the previous commit,
# reinstalls it (and restarts the neuron on it if it had been restarted) and marks the commit bad in
# <git dir>/dt-auto-update/bad-commits, so that no launcher of this checkout tries it again. Local
# changes to tracked files are never overwritten: the update is skipped and the reason logged.
# Started again by pm2 (pm2 restart NAME, a crash, a reboot), it keeps a NAME-neuron that is online
# with the same flags on the commit the checkout is at, and resumes an unfinished watch.
#
# Environment: DT_PYTHON (interpreter of the environment the package is installed in; default
# <checkout>/.venv/bin/python, the neuron binary is taken from the same bin directory),
# UPDATE_INTERVAL, UPDATE_WATCH, UPDATE_MAX_RESTARTS (default 3), UPDATE_STABLE (default 60),
# UPDATE_WATCH_POLL (seconds between looks at pm2 during the watch; default 5), time limits in
# seconds: UPDATE_FETCH_TIMEOUT (git fetch; default 300), UPDATE_INSTALL_TIMEOUT (scripts/install.sh,
# i.e. pip; default 1800), UPDATE_POST_INSTALL_TIMEOUT (post_install.py; default 600),
# UPDATE_CHECK_TIMEOUT (the import and --help checks; default 300), DT_PM2_TIMEOUT (one pm2 command;
# default DT_KILL_TIMEOUT_MS + 120 s), DT_PM2 (the pm2 command; default pm2 on PATH), DT_PM2_NAME
# (default: the name pm2 gave this process), DT_KILL_TIMEOUT_MS (how long pm2 waits for the neuron
# to stop before killing it; default 20000). Decisions are logged one line each, with a UTC
# timestamp, to stdout (`pm2 logs NAME`). See docs/operating-updates.md.

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
  *) echo "usage: $0 miner|validator [--update.interval SECONDS] [--update.watch SECONDS] [neuron flags...]" >&2; exit 2 ;;
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
WATCH=${UPDATE_WATCH:-600}
NEURON_ARGS=()
while (($#)); do
  case "$1" in
    --update.interval | --update.watch)
      if (($# < 2)); then log "error: $1 needs a value (seconds)"; exit 2; fi
      if [[ $1 == --update.interval ]]; then INTERVAL=$2; else WATCH=$2; fi
      shift 2 ;;
    --update.interval=*) INTERVAL=${1#*=}; shift ;;
    --update.watch=*) WATCH=${1#*=}; shift ;;
    *) NEURON_ARGS+=("$1"); shift ;;
  esac
done
if ! [[ $INTERVAL =~ ^[0-9]+$ ]]; then
  log "error: --update.interval / UPDATE_INTERVAL must be a whole number of seconds (0 turns updating off), not '$INTERVAL'"
  exit 2
fi
if ! [[ $WATCH =~ ^[0-9]+$ ]]; then
  log "error: --update.watch / UPDATE_WATCH must be a whole number of seconds (0 turns the watch off), not '$WATCH'"
  exit 2
fi
INTERVAL=$((10#$INTERVAL)) WATCH=$((10#$WATCH))
# Limits (seconds, except the restart count); every step that can hang runs under one.
FETCH_TIMEOUT=${UPDATE_FETCH_TIMEOUT:-300}               # git fetch
INSTALL_TIMEOUT=${UPDATE_INSTALL_TIMEOUT:-1800}          # scripts/install.sh (pip)
POST_INSTALL_TIMEOUT=${UPDATE_POST_INSTALL_TIMEOUT:-600} # post_install.py (may fetch the corpus)
CHECK_TIMEOUT=${UPDATE_CHECK_TIMEOUT:-300}               # import check, --help, the state-dir query
MAX_RESTARTS=${UPDATE_MAX_RESTARTS:-3}                   # restarts the watched neuron may have
STABLE=${UPDATE_STABLE:-60}                              # up this long after its start event = healthy
WATCH_POLL=${UPDATE_WATCH_POLL:-5}                       # seconds between looks during the watch
KILL_TIMEOUT_MS=${DT_KILL_TIMEOUT_MS:-20000}             # pm2's wait for the neuron to stop
check_whole() { # $1: the setting (for the message), $2: the variable holding it, $3: its minimum
  local value=${!2}
  if ! [[ $value =~ ^[0-9]+$ ]] || ((10#$value < $3)); then
    log "error: $1 must be a whole number$( (($3 > 0)) && echo " of at least $3"), not '$value'"; exit 2
  fi
  printf -v "$2" '%d' "$((10#$value))"
}
check_whole UPDATE_FETCH_TIMEOUT FETCH_TIMEOUT 1
check_whole UPDATE_INSTALL_TIMEOUT INSTALL_TIMEOUT 1
check_whole UPDATE_POST_INSTALL_TIMEOUT POST_INSTALL_TIMEOUT 1
check_whole UPDATE_CHECK_TIMEOUT CHECK_TIMEOUT 1
check_whole UPDATE_MAX_RESTARTS MAX_RESTARTS 0
check_whole UPDATE_STABLE STABLE 0
check_whole UPDATE_WATCH_POLL WATCH_POLL 1
check_whole DT_KILL_TIMEOUT_MS KILL_TIMEOUT_MS 0
PM2_TIMEOUT=${DT_PM2_TIMEOUT:-$((KILL_TIMEOUT_MS / 1000 + 120))} # one pm2 command (a restart waits for the stop)
check_whole DT_PM2_TIMEOUT PM2_TIMEOUT 1

PY=${DT_PYTHON:-$REPO/.venv/bin/python}
NEURON_BIN="$(dirname "$PY")/dt-$ROLE"
PM2=${DT_PM2:-pm2}
if ! command -v "$PM2" >/dev/null 2>&1; then
  log "error: pm2 not found (install it with 'npm install -g pm2', or point DT_PM2 at it)"; exit 1
fi
if [[ ! -x $PY ]]; then
  log "error: no python at $PY (run scripts/install.sh, or set DT_PYTHON)"; exit 1
fi

# What the launcher remembers, in the git directory (never seen by git status, kept by resets):
# bad-commits (one line per commit that failed: sha version UTC-time reason), NAME.neuron (the
# commit NAME-neuron was last started on) and NAME.pending (an update in progress, to finish after
# the launcher itself is restarted).
STATE=$(git rev-parse --absolute-git-dir 2>/dev/null || echo "$REPO/.git")/dt-auto-update
mkdir -p "$STATE" || { log "error: cannot create $STATE"; exit 1; }
BAD_FILE=$STATE/bad-commits
NEURON_RECORD=$STATE/${NAME//[^A-Za-z0-9._-]/_}.neuron
PENDING=$STATE/${NAME//[^A-Za-z0-9._-]/_}.pending
REEXEC=${DT_LAUNCHER_REEXEC:-}
for sha in ${DT_LAUNCHER_FAILED:-}; do # handed over by a launcher from before bad-commits existed
  grep -q "^$sha " "$BAD_FILE" 2>/dev/null ||
    echo "$sha ? $(date -u +%Y-%m-%dT%H:%M:%SZ) install: failed (recorded by the previous launcher)" >>"$BAD_FILE"
done
unset DT_LAUNCHER_REEXEC DT_LAUNCHER_FAILED # not for the neuron's environment

# -- helpers -------------------------------------------------------------------------------------
# Runs "$@" with a time limit of $1 seconds (then SIGTERM to its process group, SIGKILL 30 s later).
if command -v timeout >/dev/null 2>&1; then
  limited() { local limit=$1; shift; timeout -k 30 "$limit" "$@"; }
else
  limited() { shift; "$@"; } # no coreutils timeout: nothing is limited (logged once at start)
  log "warning: 'timeout' (coreutils) not found; git fetch, pip and post_install.py run without a time limit"
fi
pm2_run() { limited "$PM2_TIMEOUT" "$PM2" "$@"; }
pm2_quiet() { # run pm2, keep its output for the log only when it fails
  local out
  if out=$(pm2_run "$@" 2>&1); then return 0; fi
  log_detail "$out" 8
  return 1
}
neuron_pid() { pm2_run pid "$NEURON_NAME" 2>/dev/null | tail -n 1 | tr -dc '0-9'; }

# Reads `pm2 jlist` (stdlib only: python -S, it works whatever the install's state).
#   state NAME METRICS OFFSET -> "status restarts start_ms pid ready_ms": ready_ms is the time of the
#     newest "start" event at or after byte OFFSET of METRICS written since the process started
#   same NAME BIN ARGS...     -> "same" when NAME is online running BIN with exactly ARGS, else why not
PM2_JSON_TOOL='
import json, os, shlex, sys
procs = []
for line in reversed(sys.stdin.read().splitlines()):
    if line.startswith("["):
        try:
            procs = json.loads(line)
            break
        except ValueError:
            pass
proc = next((p for p in procs if p.get("name") == sys.argv[2]), None)
env = (proc or {}).get("pm2_env") or {}
status = env.get("status", "missing") if proc else "missing"
if sys.argv[1] == "state":
    started, ready = int(env.get("pm_uptime") or 0), 0
    try:
        with open(sys.argv[3], "rb") as f:
            size = f.seek(0, 2)
            offset = int(sys.argv[4])
            f.seek(offset if offset <= size else 0)
            for raw in f:
                try:
                    event = json.loads(raw)
                    when = int(float(event.get("time") or 0) * 1000)
                except (ValueError, TypeError, AttributeError):
                    continue
                if event.get("event") == "start" and when >= started:
                    ready = max(ready, when)
    except (OSError, ValueError):
        pass
    print(status, int(env.get("restart_time") or 0), started, int((proc or {}).get("pid") or 0), ready)
else:
    args = env.get("args") or []
    args = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    real = lambda p: os.path.realpath(p) if p else ""
    if status != "online":
        print("status", status)
    elif real(env.get("pm_exec_path")) != real(sys.argv[3]):
        print("runs", env.get("pm_exec_path"), "not", sys.argv[3])
    elif args != sys.argv[4:]:
        print("flags differ:", shlex.join(args))
    else:
        print("same")
'
neuron_state() { pm2_run jlist 2>/dev/null | "$PY" -S -c "$PM2_JSON_TOOL" state "$NEURON_NAME" "${1:-}" "${2:-0}"; }
neuron_same() { pm2_run jlist 2>/dev/null | "$PY" -S -c "$PM2_JSON_TOOL" same "$NEURON_NAME" "$NEURON_BIN" "${NEURON_ARGS[@]}"; }
record_neuron() { git rev-parse HEAD >"$NEURON_RECORD" 2>/dev/null; } # the commit the neuron now runs

start_neuron() {
  if [[ ! -x $NEURON_BIN ]]; then
    log "error: $NEURON_BIN does not exist (run scripts/install.sh, or set DT_PYTHON)"; return 1
  fi
  pm2_quiet start "$NEURON_BIN" --name "$NEURON_NAME" --interpreter none --cwd "$REPO" \
    --kill-timeout "$KILL_TIMEOUT_MS" -- "${NEURON_ARGS[@]}" || return 1
  record_neuron
  log "started: pm2 process $NEURON_NAME (pid $(neuron_pid)): dt-$ROLE ${NEURON_ARGS[*]}"
}

# Runs a step of an update under a time limit; on failure logs which one and the tail of its output.
#   run_step WHAT LIMIT_SECONDS LIMIT_SETTING COMMAND...
STEP_OUTPUT="" FAILED_STEP=""
run_step() {
  local what=$1 limit=$2 setting=$3 rc; shift 3
  STEP_OUTPUT=$(limited "$limit" "$@" 2>&1); rc=$?
  ((rc == 0)) && return 0
  if ((rc == 124 || rc == 137)); then
    FAILED_STEP="$what timed out after ${limit}s ($setting)"
  else
    FAILED_STEP="$what (exit $rc)"
  fi
  log "failed: $FAILED_STEP"
  log_detail "$STEP_OUTPUT"
  return 1
}

# Installs the checked-out release into $PY's environment with the release's own scripts/install.sh,
# then runs its post_install.py; each under its own time limit.
install_release() {
  if [[ -f scripts/install.sh ]] && grep -q DT_POST_INSTALL scripts/install.sh; then
    run_step "reinstall: scripts/install.sh" "$INSTALL_TIMEOUT" UPDATE_INSTALL_TIMEOUT \
      env DT_PYTHON="$PY" DT_POST_INSTALL=0 bash scripts/install.sh || return 1
  else # a release from before install.sh could install into another environment than ./.venv
    run_step "reinstall: $PY -m pip install -e ." "$INSTALL_TIMEOUT" UPDATE_INSTALL_TIMEOUT \
      "$PY" -m pip install --disable-pip-version-check -q -e "$REPO" || return 1
  fi
  if [[ -f post_install.py ]]; then
    run_step "post_install.py" "$POST_INSTALL_TIMEOUT" UPDATE_POST_INSTALL_TIMEOUT "$PY" post_install.py || return 1
    log "ran post_install.py"
  fi
}

verify() { # $1: the version the installed package must report
  local got
  run_step "import check" "$CHECK_TIMEOUT" UPDATE_CHECK_TIMEOUT "$PY" -c "import distributed_training, neurons.$ROLE
print(distributed_training.__version__)" || return 1
  got=$(tail -n 1 <<<"$STEP_OUTPUT")
  if [[ $got != "$1" ]]; then
    FAILED_STEP="the installed package reports version '$got', expected '$1'"
    log "failed: $FAILED_STEP"; return 1
  fi
  run_step "dt-$ROLE --help" "$CHECK_TIMEOUT" UPDATE_CHECK_TIMEOUT "$NEURON_BIN" --help || return 1
  run_step "launcher syntax check" 60 - bash -n "run_$ROLE.sh" || return 1
  run_step "launcher syntax check" 60 - bash -n scripts/auto_update.sh || return 1
}

# The neuron's metrics file, as the installed package computes it from the neuron's flags (and the
# checkout's .env): <state dir>/metrics.jsonl. Empty when it cannot be asked (then the watch checks
# restarts only).
metrics_path() {
  local dir
  dir=$(limited "$CHECK_TIMEOUT" "$PY" -c 'import sys
from distributed_training.config import parse_config, state_dir
print(state_dir(parse_config(sys.argv[1], sys.argv[2:])))' "$ROLE" "${NEURON_ARGS[@]}" 2>/dev/null | tail -n 1)
  [[ -n $dir ]] && echo "$dir/metrics.jsonl"
}

is_bad() { grep -q "^$1 " "$BAD_FILE" 2>/dev/null; }
mark_bad() { # $1 sha, $2 version, $3 reason
  is_bad "$1" || printf '%s %s %s %s\n' "$1" "$2" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$3" >>"$BAD_FILE"
  log "marked bad: ${1:0:12} ($2) in $BAD_FILE; no launcher of this checkout deploys it again"
}
bad_reason() { grep -m 1 "^$1 " "$BAD_FILE" 2>/dev/null | cut -d' ' -f4-; } # "install: ..." or "watch: ..."

# The pending update, one line: phase old_sha new_sha version [started base_restarts offset metrics]
pending_set() { printf '%s\n' "$*" >"$PENDING.tmp" && mv -f "$PENDING.tmp" "$PENDING"; }
pending_clear() { rm -f "$PENDING"; }

rollback() { # $1: the commit to go back to; $2: "restart" when the neuron runs the failed release
  local old=$1 restart=${2:-} installed=1 before after
  if ! run_step "git reset --hard ${old:0:12}" 60 - git reset --hard --quiet "$old"; then
    log "ROLLBACK FAILED: the checkout is not at ${old:0:12}; $NEURON_NAME keeps running the code it loaded; fix by hand"
    return 1
  fi
  install_release || installed=0
  if [[ $restart != restart ]]; then
    if ((installed)); then
      log "rolled back: checkout at ${old:0:12} (version $(version_at HEAD)) and reinstalled; $NEURON_NAME keeps running (pid $(neuron_pid))"
    else
      log "ROLLBACK FAILED: reinstalling ${old:0:12} failed; $NEURON_NAME keeps running the code it loaded; fix by hand"
    fi
    ((installed)); return
  fi
  before=$(neuron_pid)
  if pm2_quiet restart "$NEURON_NAME"; then
    record_neuron
  else
    pm2_quiet delete "$NEURON_NAME"
    start_neuron || { log "ROLLBACK FAILED: could not restart $NEURON_NAME on ${old:0:12}; start it by hand"; return 1; }
  fi
  after=$(neuron_pid)
  if ((installed)); then
    log "rolled back: checkout at ${old:0:12} (version $(version_at HEAD)) and reinstalled; restarted $NEURON_NAME on it (pid $before -> $after)"
  else
    log "ROLLBACK FAILED: reinstalling ${old:0:12} failed; restarted $NEURON_NAME on the checkout anyway (pid $before -> $after); check the install by hand"
    return 1
  fi
}

# Watches the restarted neuron; 0 when it is healthy, 1 when not, 2 when someone stopped it; WATCH_RESULT
# says why.
#   watch_neuron STARTED_EPOCH_S BASE_RESTARTS METRICS_PATH OFFSET
WATCH_RESULT=""
watch_neuron() {
  local started=$1 base=$2 metrics=$3 offset=$4 seen=$2 deadline=$(($1 + WATCH)) now since
  local status restarts up pid ready
  while true; do
    read -r status restarts up pid ready < <(neuron_state "$metrics" "$offset")
    [[ $restarts =~ ^[0-9]+$ && $ready =~ ^[0-9]+$ ]] || { status=unknown restarts=$seen ready=0; }
    now=$(date +%s) since=$((restarts - base))
    case $status in
      missing) WATCH_RESULT="$NEURON_NAME is no longer a pm2 process"; return 1 ;;
      errored) WATCH_RESULT="pm2 stopped restarting it (status errored) after $since restarts in $((now - started))s"; return 1 ;;
      stopped)
        WATCH_RESULT="$NEURON_NAME was stopped (by hand?) $((now - started))s after the restart"
        return 2 ;;
    esac
    if ((restarts > seen)); then
      seen=$restarts
      log "watch: $NEURON_NAME restarted by pm2 (restart $since since the update; more than $MAX_RESTARTS rolls back)"
    fi
    if ((since > MAX_RESTARTS)); then
      WATCH_RESULT="crash loop: $NEURON_NAME restarted $since times within $((now - started))s of the update (UPDATE_MAX_RESTARTS=$MAX_RESTARTS)"
      return 1
    fi
    if [[ -n $metrics ]]; then
      if ((ready > 0)) && [[ $status == online ]] && ((now * 1000 - ready >= STABLE * 1000)); then
        WATCH_RESULT="joined the swarm (start event) $((ready / 1000 - started))s after the restart and stayed up ${STABLE}s; $since restarts"
        return 0
      fi
      if ((ready == 0 && now >= deadline)); then
        WATCH_RESULT="no start event in $metrics within ${WATCH}s (--update.watch); status $status, $since restarts"
        return 1
      fi
    elif ((now >= deadline)); then
      if [[ $status == online ]]; then
        WATCH_RESULT="online with $since restarts after ${WATCH}s (readiness not checked: state dir unknown)"; return 0
      fi
      WATCH_RESULT="not online after ${WATCH}s (status $status)"; return 1
    fi
    sleep "$WATCH_POLL" & wait $!
  done
}

# After NAME-neuron was restarted on a new release: watch it, roll back when it fails.
#   watch_release OLD_SHA NEW_SHA VERSION STARTED_EPOCH_S BASE_RESTARTS OFFSET METRICS_PATH
watch_release() {
  local old=$1 new=$2 version=$3 started=$4 base=$5 offset=$6 metrics=${7:-}
  if ((WATCH == 0)); then
    log "not watching $NEURON_NAME (--update.watch 0)"; pending_clear; return 0
  fi
  if [[ -n $metrics ]]; then
    log "watching $NEURON_NAME on $version for up to ${WATCH}s: it must write a start event to $metrics and stay up ${STABLE}s after it, with at most $MAX_RESTARTS restarts"
  else
    log "watching $NEURON_NAME on $version for ${WATCH}s: cannot ask the package for its state dir, so only for at most $MAX_RESTARTS restarts"
  fi
  watch_neuron "$started" "$base" "$metrics" "$offset"
  case $? in
    0) log "healthy: $version (${new:0:12}): $WATCH_RESULT"; pending_clear; return 0 ;;
    2) log "watch ended: $WATCH_RESULT; keeping $version (${new:0:12})"; pending_clear; return 0 ;;
  esac
  log "update failed: $version (${new:0:12}) after its restart: $WATCH_RESULT; rolling back to ${old:0:12}"
  mark_bad "$new" "$version" "watch: $WATCH_RESULT"
  rollback "$old" restart
  pending_clear
  return 1
}

# One poll: exactly one decision line unless an update is attempted (then one line per step).
poll() {
  local branch upstream remote remote_sha local_sha local_v remote_v dirty out old rc
  branch=$(git symbolic-ref --short -q HEAD) &&
    upstream=$(git rev-parse --abbrev-ref --symbolic-full-name '@{upstream}' 2>/dev/null) &&
    remote=$(git config "branch.$branch.remote") || {
      log "skip: the checkout is not on a branch that tracks a remote branch (detached HEAD?); nothing to poll"; return; }
  out=$(limited "$FETCH_TIMEOUT" git fetch --quiet "$remote" 2>&1); rc=$?
  if ((rc == 124 || rc == 137)); then
    log "skip: git fetch $remote timed out after ${FETCH_TIMEOUT}s (UPDATE_FETCH_TIMEOUT); nothing was changed, $NEURON_NAME keeps running; will retry in ${INTERVAL}s"
    log_detail "$out" 5; return
  elif ((rc != 0)); then
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
  if is_bad "$remote_sha"; then
    local reason what="failed to install before"
    reason=$(bad_reason "$remote_sha")
    [[ $reason == "watch: "* ]] && what="failed after its restart before"
    log "skip: $upstream $remote_v (${remote_sha:0:12}) $what (${reason#*: }); marked bad in $BAD_FILE; waiting for a newer commit"
    return
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
  pending_set installing "$old" "$remote_sha" "$remote_v"
  if ! run_step "git merge --ff-only" 60 - git merge --ff-only --quiet "$remote_sha"; then
    if [[ $(git rev-parse HEAD) == "$old" ]]; then
      pending_clear
      log "skip: could not fast-forward to $remote_v (see above); nothing was changed; retrying at the next poll"
      return
    fi
    log "update failed: $remote_v (${remote_sha:0:12}) not deployed; rolling back to ${old:0:12}"
    mark_bad "$remote_sha" "$remote_v" "install: $FAILED_STEP"
    rollback "$old"
    pending_clear
    return
  fi
  if ! { install_release && verify "$remote_v"; }; then
    log "update failed: $remote_v (${remote_sha:0:12}) not deployed; rolling back to ${old:0:12}"
    mark_bad "$remote_sha" "$remote_v" "install: $FAILED_STEP"
    rollback "$old"
    pending_clear
    return
  fi
  local metrics offset=0 before after base started
  metrics=$(metrics_path)
  [[ -n $metrics && -f $metrics ]] && offset=$(stat -c %s "$metrics" 2>/dev/null || echo 0)
  # pm2's restart count before the restart, plus the restart itself: a crash loop is counted from the
  # first crash even when it begins before the watch's first look.
  read -r _ base _ < <(neuron_state)
  [[ $base =~ ^[0-9]+$ ]] && base=$((base + 1)) || base=0
  before=$(neuron_pid)
  started=$(date +%s)
  if pm2_quiet restart "$NEURON_NAME"; then
    record_neuron
    after=$(neuron_pid)
    log "updated: now at $remote_v (${remote_sha:0:12}); restarted $NEURON_NAME (pid $before -> $after)"
  else
    log "updated: now at $remote_v (${remote_sha:0:12}), but 'pm2 restart $NEURON_NAME' failed; starting it"
    pm2_quiet delete "$NEURON_NAME"
    start_neuron
    base=0 # a new pm2 process counts from 0
  fi
  pending_set watching "$old" "$remote_sha" "$remote_v" "$started" "$base" "$offset" "$metrics"
  watch_release "$old" "$remote_sha" "$remote_v" "$started" "$base" "$offset" "$metrics" || return
  # Continue with the launcher of the new release (same pid, so pm2 sees no restart).
  log "re-executing the launcher of $remote_v"
  unlock
  DT_LAUNCHER_REEXEC=1 exec bash "$REPO/run_$ROLE.sh" "${ORIG_ARGS[@]}"
}

# -- main ----------------------------------------------------------------------------------------
trap 'log "stopping (signal); $NEURON_NAME keeps running under pm2 (pm2 stop $NEURON_NAME to stop it)"; exit 0' INT TERM

# Launchers sharing a checkout (not recommended: see docs/operating-updates.md) never update it at once.
LOCK_FILE="$(git rev-parse --absolute-git-dir 2>/dev/null || echo "$REPO")/dt-auto-update.lock"
if command -v flock >/dev/null 2>&1 && exec 9>>"$LOCK_FILE"; then
  lock() { flock -w 3600 9 || log "warning: could not lock $LOCK_FILE within an hour; going on anyway"; }
  unlock() { flock -u 9; }
else
  lock() { :; }
  unlock() { :; }
fi

# An update this launcher's previous run left unfinished (it was stopped or restarted during it). The
# record stays until it is dealt with, so that a launcher stopped again meanwhile finds it too.
PENDING_LINE=""
[[ $REEXEC != 1 && -f $PENDING ]] && PENDING_LINE=$(head -n 1 "$PENDING")
read -r p_phase p_old p_new p_version p_started p_base p_offset p_metrics <<<"$PENDING_LINE"
if [[ $p_phase == installing && $p_old =~ ^[0-9a-f]{40}$ ]]; then
  lock
  if [[ $(git rev-parse HEAD) != "$p_old" ]]; then
    log "found an update to ${p_version:-?} (${p_new:0:12}) interrupted before $NEURON_NAME was restarted; going back to ${p_old:0:12} (it is tried again at the next poll)"
    rollback "$p_old"
  fi
  pending_clear
  unlock
elif ! [[ $p_phase == watching && $(git rev-parse HEAD) == "${p_new:-}" && $p_old =~ ^[0-9a-f]{40}$ &&
  $p_started =~ ^[0-9]+$ && $p_base =~ ^[0-9]+$ && $p_offset =~ ^[0-9]+$ ]]; then
  p_phase=""
  pending_clear # nothing pending, or a watch of a commit the checkout is no longer at
fi

pid=$(neuron_pid)
if [[ $REEXEC == 1 && -n $pid && $pid != 0 ]]; then
  [[ -f $NEURON_RECORD ]] || record_neuron # re-executed by a launcher from before the record existed
  log "launcher restarted after an update; keeping $NEURON_NAME (pid $pid)"
elif [[ -n $pid && $pid != 0 ]]; then
  head_sha=$(git rev-parse HEAD) running=$(cat "$NEURON_RECORD" 2>/dev/null) same=$(neuron_same)
  if [[ $same == same && $running == "$head_sha" ]]; then
    log "launcher (re)started; keeping $NEURON_NAME (pid $pid): online with the same flags, on $(version_at HEAD) (${head_sha:0:12}) like the checkout"
  else
    if [[ $same != same ]]; then
      why=${same:-cannot read pm2 jlist}
    elif [[ -n $running ]]; then
      why="it was started on ${running:0:12}, the checkout is at ${head_sha:0:12}"
    else
      why="no record of the commit it was started on"
    fi
    log "replacing the existing pm2 process $NEURON_NAME (pid $pid) so it runs with these flags on this checkout: $why"
    pm2_quiet delete "$NEURON_NAME"
    start_neuron || { log "error: could not start $NEURON_NAME"; exit 1; }
  fi
else
  if [[ -n $pid ]]; then
    log "replacing the existing pm2 process $NEURON_NAME (not running) so it runs with these flags"
    pm2_quiet delete "$NEURON_NAME"
  fi
  start_neuron || { log "error: could not start $NEURON_NAME"; exit 1; }
fi

if [[ $p_phase == watching ]]; then
  lock
  log "resuming the watch of $NEURON_NAME on $p_version (${p_new:0:12}), restarted $(($(date +%s) - p_started))s ago"
  watch_release "$p_old" "$p_new" "$p_version" "$p_started" "$p_base" "$p_offset" "${p_metrics:-}"
  unlock
fi

if ((INTERVAL == 0)); then
  log "auto-update off (--update.interval 0); $NEURON_NAME runs under pm2 as it is"
  while true; do sleep 3600 & wait $!; done
fi
log "polling every ${INTERVAL}s: version $(version_at HEAD) at $(git rev-parse --short=12 HEAD)"
while true; do
  sleep "$INTERVAL" & wait $!
  lock
  poll
  unlock
done
