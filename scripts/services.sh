#!/usr/bin/env bash
# Bring up (and tear down) the real services the hfbench test suite talks to, all on this
# one machine and all private to one state directory:
#
#   munged      own key, own socket            (SLURM authentication)
#   mariadbd    own datadir, port and socket   (storage behind slurmdbd)
#   slurmdbd    accounting daemon              (so `sacct` works; submitit needs it)
#   slurmctld   controller
#   slurmd      compute node <hostname>: 8 CPUs, 16000 MB, partitions `debug` (default) + `urgent`
#   slurmd2     a second compute node, <hostname>2, on its own port (SLURM runs one slurmd per
#               node name on one machine); only in partition `multi` (both nodes), so jobs
#               of `debug`/`urgent` never land on it. Multi-node jobs (engine.nodes 2) use it.
#   mlflow      tracking server on sqlite, artifacts on local disk
#
# Usage:
#   scripts/services.sh start  [STATE_DIR]   start everything, wait until usable, print env.sh path
#   scripts/services.sh stop   [STATE_DIR]   stop everything (safe when nothing runs)
#   scripts/services.sh status [STATE_DIR]   show what runs; exit 0 only if all of it answers
#   scripts/services.sh env    [STATE_DIR]   print the env.sh path (exit 1 if it does not exist)
#   scripts/services.sh crash-node   [STATE_DIR]  fault injection: slurmd and every job process on
#                                                 the node are SIGKILLed at once (no clean-up), and
#                                                 the controller is told the node is DOWN
#   scripts/services.sh restart-node [STATE_DIR]  bring the node back (slurmd, state RESUME)
#   scripts/services.sh stop-controller  [STATE_DIR]  fault injection: slurmctld goes away (jobs keep
#                                                      running; sbatch/squeue/scontrol fail meanwhile)
#   scripts/services.sh start-controller [STATE_DIR]  bring it back (it recovers its state)
#
# STATE_DIR defaults to $HFBENCH_SERVICES_DIR, else /tmp/hfbench-services. Clients do
#   source "$STATE_DIR/env.sh"
# to get SLURM_CONF, HFBENCH_MLFLOW_URI, etc. Nothing here reads or writes the system-wide
# munge/slurm/mysql configuration: every daemon gets explicit paths into STATE_DIR, and every
# network listener binds 127.0.0.1 (MLflow: HFBENCH_MLFLOW_HOST, below) on a port picked free at start time (so two state dirs can
# run side by side). Each `start` wipes the previous state (databases, job history).
#
# Environment knobs: HFBENCH_VENV (venv holding mlflow; default <repo>/.venv),
# HFBENCH_SERVICES_TIMEOUT (seconds to wait for each service; default 120),
# HFBENCH_MLFLOW_WORKERS (mlflow server worker processes; default 1),
# HFBENCH_MLFLOW_AUTH=1 (MLflow's basic-auth app: clients need the user and password env.sh exports),
# HFBENCH_SERVICES_NO_MLFLOW=1 (SLURM only; HFBENCH_MLFLOW_URI is then not exported),
# HFBENCH_MLFLOW_HOST (address the MLflow server binds; default 127.0.0.1, i.e. only this
# machine can reach it. The server has no authentication: 0.0.0.0 exposes it, read and write,
# to every host that can reach this one. The address is printed at start).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"   # the daemons live in sbin
VENV="${HFBENCH_VENV:-$ROOT/.venv}"
MLFLOW_BIN="$VENV/bin/mlflow"
MLFLOW_WORKERS="${HFBENCH_MLFLOW_WORKERS:-1}"
MLFLOW_HOST="${HFBENCH_MLFLOW_HOST:-127.0.0.1}"
[[ "$MLFLOW_HOST" =~ ^[A-Za-z0-9.:_-]+$ ]] || { echo "services.sh: bad HFBENCH_MLFLOW_HOST=$MLFLOW_HOST" >&2; exit 2; }
# where clients reach it: a wildcard bind is reached on loopback
case "$MLFLOW_HOST" in
  0.0.0.0) MLFLOW_CLIENT_HOST=127.0.0.1 ;;
  ::) MLFLOW_CLIENT_HOST='[::1]' ;;
  *:*) MLFLOW_CLIENT_HOST="[$MLFLOW_HOST]" ;;
  *) MLFLOW_CLIENT_HOST="$MLFLOW_HOST" ;;
esac
TIMEOUT="${HFBENCH_SERVICES_TIMEOUT:-120}"
CLUSTER=hfbench
# Start order (stop_all stops them in reverse, in waves).
SERVICES=(munged mariadbd slurmdbd slurmctld slurmd slurmd2 mlflow)
WANT_MLFLOW=1
[[ "${HFBENCH_SERVICES_NO_MLFLOW:-0}" == 1 ]] && WANT_MLFLOW=0

cmd="${1:-}"
STATE="${2:-${HFBENCH_SERVICES_DIR:-/tmp/hfbench-services}}"
case "$cmd" in start|stop|status|env|crash-node|restart-node|stop-controller|start-controller) ;; *)
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
[[ $(id -u) -eq 0 ]] || { echo "services.sh: must run as root (SlurmUser=root)" >&2; exit 1; }
if [[ ! -d "$STATE" && $cmd != start ]]; then   # never started here: nothing runs
  [[ $cmd == stop ]] && exit 0
  echo "services.sh: $STATE does not exist (not started)" >&2; exit 1
fi
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd -P)"
case "$STATE" in /|/tmp|/root|/home|/work|/usr*|/etc*|/var) echo "services.sh: refusing STATE_DIR=$STATE" >&2; exit 1 ;; esac

ETC="$STATE/etc"; RUN="$STATE/run"; LOG="$STATE/log"
MUNGE_SOCKET="$STATE/munge/munge.socket"
MYSQL_SOCKET="$STATE/mysql/mysqld.sock"
export SLURM_CONF="$ETC/slurm.conf"   # read by slurmdbd (for slurmdbd.conf) and all clients
# Every daemon we start carries this variable; `stop` uses it to find our processes (and
# their children, e.g. slurmstepd) even when pid files are gone, without touching anyone
# else's. Jobs do not inherit it: they get the submitter's environment.
MARK="HFBENCH_SERVICES_OF=$STATE"

T0="$EPOCHREALTIME"
# Messages carry the seconds since this script started.
say() { printf '[services %5.1fs] %s\n' "$(awk "BEGIN{print $EPOCHREALTIME - $T0}")" "$*"; }

# Serialise start/stop/status on one state dir.
exec 9>"$STATE/.lock"
flock -w 300 9 || { echo "services.sh: $STATE is locked by another services.sh" >&2; exit 1; }

# ---------------------------------------------------------------- process helpers
# node_up NODE [STATE]: SLURM sees NODE up (in STATE, or any state a live node has).
node_up() {
  timeout 10 sinfo -h -N -n "$1" -o %T 2>/dev/null | grep -Eqx "${2:-(idle|mixed|allocated|completing)}"
}
# A zombie counts as dead: here pid 1 may take seconds to reap orphans.
alive() {
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  local st; st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null)"
  [[ "${st:0:1}" != Z ]]
}
# True when pid $1 was started by us for this state dir (guards against recycled pids).
ours() { alive "$1" && grep -qzxF "$MARK" "/proc/$1/environ" 2>/dev/null; }
pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }
# All live pids that carry our marker.
marked_pids() {
  grep -lzxF "$MARK" /proc/[0-9]*/environ 2>/dev/null | sed 's|^/proc/||; s|/environ$||' || true
}

# launch NAME CMD...: run CMD in the foreground mode of the daemon, in its own session (so
# its pid is also its process-group id), with stdout/stderr in log/NAME.out.
launch() {
  local name="$1"; shift
  # 9>&-: the daemon must not inherit (and so hold forever) our lock on $STATE/.lock.
  env "$MARK" setsid "$@" >"$LOG/$name.out" 2>&1 </dev/null 9>&- &
  echo $! >"$RUN/$name.pid"
}

# stop_group NAME...: SIGTERM the process groups of these services together, wait for all
# of them (15 s), then SIGKILL what is left.
stop_group() {
  local name pid i pids=() names=()
  for name in "$@"; do
    pid="$(pid_of "$name")"
    rm -f "$RUN/$name.pid"
    ours "$pid" || continue
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid"); names+=("$name")
  done
  ((${#pids[@]})) || return 0
  for ((i = 0; i < 150; i++)); do
    for pid in "${pids[@]}"; do alive "$pid" && { sleep 0.1; continue 2; }; done
    break
  done
  for i in "${!pids[@]}"; do
    if alive "${pids[i]}"; then
      say "${names[i]} (pid ${pids[i]}) ignored SIGTERM for 15 s; killing it"
      kill -KILL -- "-${pids[i]}" 2>/dev/null || kill -KILL "${pids[i]}" 2>/dev/null || true
    fi
  done
  say "stopped ${names[*]}"
}

# Pids of all processes in the sessions of the given pids (our daemons each lead their own
# session; a job's processes share the session of their slurmstepd).
session_members() {
  local sids
  sids="$(for p in "$@"; do ps -o sid= -p "$p" 2>/dev/null; done | tr -d ' ' | sort -u | paste -sd,)"
  [[ -n "$sids" ]] || return 0
  ps -e -o pid=,sid= | awk -v sids=",$sids," -v me="$$" \
    'index(sids, "," $2 ",") && $1 != me {print $1}'
}

stop_all() {
  local pids p i ctld=0
  # Cancel jobs first, so that slurmstepd ends them properly: stopping slurmd leaves jobs
  # running. Also done when the pid file is lost but a marked slurmctld still runs.
  ours "$(pid_of slurmctld)" && ctld=1
  for p in $(marked_pids); do [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == slurmctld ]] && ctld=1; done
  if ((ctld)) && [[ -f "$SLURM_CONF" ]]; then
    pids="$(timeout 10 squeue -h -o %A 2>/dev/null || true)"
    if [[ -n "$pids" ]]; then
      say "cancelling jobs: $(echo $pids)"
      # shellcheck disable=SC2086
      timeout 10 scancel $pids 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        [[ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ]] && break; sleep 0.2
      done
    fi
  fi
  # Front ends first, then accounting, then what it stands on. Nothing needs saving (each
  # start begins afresh), so each wave is stopped in parallel.
  stop_group mlflow slurmd slurmd2 slurmctld
  stop_group slurmdbd
  stop_group mariadbd munged
  # Whatever still carries the marker (slurmstepd, daemons whose pid file was lost), together
  # with everything in their sessions (the job processes under a slurmstepd).
  # shellcheck disable=SC2046
  pids="$(session_members $(marked_pids))"
  if [[ -n "$pids" ]]; then
    say "killing leftover processes: $(echo $pids)"
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for ((i = 0; i < 30; i++)); do
      for p in $pids; do alive "$p" && { sleep 0.1; continue 2; }; done
      break
    done
    for p in $pids; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
  fi
  rm -f "$STATE/env.sh"
  return 0
}

# ---------------------------------------------------------------- waiting and failing
fail() {
  local f
  echo "services.sh: ERROR: $1" >&2
  for f in "${@:2}"; do
    [[ -s "$f" ]] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 25 "$f" >&2
  done
  echo "---- stopping what was started ----" >&2
  stop_all >&2 || true
  exit 1
}

# wait_for NAME CHECK-COMMAND LOGS...: poll CHECK until it succeeds, the daemon dies, or
# TIMEOUT passes.
wait_for() {
  local name="$1" check="$2" t0=$SECONDS pid
  shift 2
  pid="$(pid_of "$name")"
  until eval "$check" >/dev/null 2>&1; do
    alive "$pid" || fail "$name exited during start-up" "$@"
    ((SECONDS - t0 < TIMEOUT)) || fail "$name not ready after ${TIMEOUT}s (check: $check)" "$@"
    sleep 0.2
  done
  say "${WAIT_LABEL:-$name} ready"
}

# ---------------------------------------------------------------- status
env_get() { sed -n "s/^export $1=//p" "$STATE/env.sh" 2>/dev/null | tr -d "'\""; }
probe() {   # probe NAME -> 0 when the service answers
  case "$1" in
    munged)    [[ -S "$MUNGE_SOCKET" ]] ;;
    mariadbd)  mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" -uroot ping ;;
    slurmdbd)  timeout 10 sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" ;;
    slurmctld) timeout 10 scontrol ping | grep -q UP ;;
    slurmd)    node_up "$(hostname -s)" ;;
    slurmd2)   node_up "$(hostname -s)2" ;;
    mlflow)    curl -fsS -m 5 "$(env_get HFBENCH_MLFLOW_URI)/health" ;;
  esac >/dev/null 2>&1
}
# The second node is best effort: where it could not start, env.sh exports no two-node partition.
want_slurmd2() { [[ -n "$(env_get HFBENCH_SLURM_MULTI_PARTITION)" ]]; }
all_alive() {   # cheap check before probing: every wanted service has a live pid
  local s
  for s in "${SERVICES[@]}"; do
    [[ $s == mlflow && $WANT_MLFLOW == 0 ]] && continue
    [[ $s == slurmd2 ]] && ! want_slurmd2 && continue
    ours "$(pid_of "$s")" || return 1
  done
}
status_all() {
  local s pid bad=0
  for s in "${SERVICES[@]}"; do
    [[ $s == mlflow && $WANT_MLFLOW == 0 ]] && continue
    [[ $s == slurmd2 && -f "$STATE/env.sh" ]] && ! want_slurmd2 && continue
    pid="$(pid_of "$s")"
    if ! ours "$pid"; then printf '  %-10s stopped\n' "$s"; bad=1
    elif probe "$s"; then printf '  %-10s running (pid %s)\n' "$s" "$pid"
    else printf '  %-10s running (pid %s) but NOT answering\n' "$s" "$pid"; bad=1
    fi
  done
  return $bad
}

# ---------------------------------------------------------------- start
free_ports() {   # print N free TCP ports on 127.0.0.1 (held open together, so distinct)
  local py=/usr/bin/python3; [[ -x $py ]] || py=python3
  "$py" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_configs() {
  local node="$1" node2="$1"2
  # A fresh ID base per start: job ids do not restart at 1 after each restart, so job
  # folders named after %j (submitit) never collide with an earlier run's.
  local first_job_id=$(( 1000 + ($(date +%s) % 40000000) ))
  # SLURM daemons (and srun) listen on 0.0.0.0 unless told to bind the address that
  # gethostname() resolves to. That address is 127.0.0.1 when the hostname maps to loopback in
  # /etc/hosts (as here); otherwise binding it would break the 127.0.0.1 addresses below, so
  # fall back to listening everywhere, with a warning.
  local comm_params="# Listen on the address the hostname resolves to (127.0.0.1), not on 0.0.0.0.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  if ! getent ahostsv4 "$(hostname)" | awk '{print $1}' | grep -q '^127\.'; then
    say "WARNING: $(hostname) does not resolve to 127.x; SLURM daemons will listen on all interfaces"
    comm_params="# $(hostname) does not resolve to loopback: daemons listen on 0.0.0.0"
  fi
  mkdir -p "$ETC" "$STATE/slurm/ctld" "$STATE/slurm/spool-$node" "$STATE/slurm/spool-$node2"
  : >"$ETC/plugstack.conf"   # empty: keeps /etc/slurm/plugstack.conf(.d) out of the way

  cat >"$ETC/slurm.conf" <<EOF
# Generated by scripts/services.sh -- test cluster on one machine (two slurmd), state in $STATE
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job is otherwise held ~2 min before it can run again.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
$comm_params
PlugStackConfig=$ETC/plugstack.conf
StateSaveLocation=$STATE/slurm/ctld
# %n: each node's slurmd (two on this machine) keeps its own spool, pid file and log.
SlurmdSpoolDir=$STATE/slurm/spool-%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (and no cgroup.conf: CgroupPlugin=disabled makes slurmd refuse to start).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that asks for no memory gets the whole node and jobs run one by one.
DefMemPerCPU=1000
# Allow the node to declare more CPUs/memory than the machine has.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Schedule often: the default 60 s main loop (plus 3 s batch delay) can leave an eligible job
# (next array task, requeued job) pending for up to a minute on an idle node.
SchedulerParameters=bf_interval=1,batch_sched_delay=0,sched_interval=2
FirstJobId=$first_job_id
JobRequeue=1
MinJobAge=10
KillWait=5
ReturnToService=2
# Jobs in partition "urgent" may preempt (requeue) jobs in "debug" (and in "multi", on the shared node).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$SLURMDBD_PORT
# Point at the munge socket; without it every sacctmgr call stalls ~2 s.
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node Port=$SLURMD_PORT CPUs=8 RealMemory=16000 State=UNKNOWN
NodeName=$node2 NodeAddr=127.0.0.1 NodeHostname=$node Port=$SLURMD2_PORT CPUs=8 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=04:00:00 State=UP PriorityTier=1
PartitionName=urgent Nodes=$node Default=NO MaxTime=04:00:00 State=UP PriorityTier=10
# Two nodes: for runs with engine.nodes > 1 (the master address is the first node, $node,
# which resolves; $node2 is reached through its NodeAddr).
PartitionName=multi Nodes=$node,$node2 Default=NO MaxTime=04:00:00 State=UP PriorityTier=1
EOF

  # slurmdbd finds this file next to \$SLURM_CONF; it must be private to SlurmUser.
  ( umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
# Generated by scripts/services.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
DbdHost=$node
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
$(echo "$comm_params" | sed 's/NoCtldInAddrAny,//')
SlurmUser=root
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  )
}

start_all() {
  local node
  if [[ -f "$STATE/env.sh" ]] && all_alive && status_all >/dev/null 2>&1; then
    say "already running"; echo "$STATE/env.sh"; return 0
  fi
  [[ -x "$MLFLOW_BIN" || $WANT_MLFLOW == 0 ]] || { echo "services.sh: no mlflow at $MLFLOW_BIN (run scripts/setup.sh, or set HFBENCH_VENV)" >&2; exit 1; }
  # Refuse to wipe a directory we did not create.
  if [[ -n "$(ls -A "$STATE" | grep -vx '.lock')" && ! -f "$STATE/.hfbench-services" ]]; then
    echo "services.sh: $STATE is not empty and was not made by services.sh; pick another STATE_DIR" >&2; exit 1
  fi
  # Clean slate: stop leftovers of an earlier run, then wipe its state.
  say "starting in $STATE"
  stop_all >/dev/null 2>&1 || true
  rm -rf "$ETC" "$RUN" "$LOG" "$STATE/munge" "$STATE/mysql" "$STATE/slurm" "$STATE/mlflow" "$STATE/env.sh"
  touch "$STATE/.hfbench-services"
  mkdir -p "$RUN" "$LOG"

  node="$(hostname -s)"
  read -r MYSQL_PORT SLURMDBD_PORT SLURMCTLD_PORT SLURMD_PORT SLURMD2_PORT MLFLOW_PORT <<<"$(free_ports 6)"
  DB_PASS="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  write_configs "$node"

  # --- mlflow first: it needs nothing else and takes longest (5-14 s, Python imports), so
  # it comes up while the rest starts. Job execution off: saves ~1.7 GB RAM and seconds.
  # One worker instead of mlflow's 4: each worker imports all of mlflow (~300 MB, seconds of
  # CPU on 2 cores), and a single writer suits the sqlite store.
  if ((WANT_MLFLOW)); then
    mkdir -p "$STATE/mlflow/artifacts"
    AUTH_ARGS=() AUTH_ENV=()
    if [[ "${HFBENCH_MLFLOW_AUTH:-0}" == 1 ]]; then
      # MLflow's basic-auth app: every request needs a user and password; the admin account
      # below is the one the clients of this state dir use (env.sh, readable by root only).
      MLFLOW_AUTH_PASS="$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
      (umask 077; printf '%s\n' "[mlflow]" "default_permission = READ" \
        "database_uri = sqlite:///$STATE/mlflow/auth.db" "admin_username = hfbench" \
        "admin_password = $MLFLOW_AUTH_PASS" \
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" >"$ETC/mlflow_auth.ini")
      AUTH_ARGS=(--app-name basic-auth)
      AUTH_ENV=("MLFLOW_AUTH_CONFIG_PATH=$ETC/mlflow_auth.ini"
                "MLFLOW_FLASK_SERVER_SECRET_KEY=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d " \\n")")
    fi
    launch mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "${AUTH_ENV[@]}" "$MLFLOW_BIN" server \
      --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
      --default-artifact-root "$STATE/mlflow/artifacts" \
      --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" "${AUTH_ARGS[@]}"
    if [[ $MLFLOW_HOST == 127.0.0.1 ]]; then
      say "mlflow binds 127.0.0.1:$MLFLOW_PORT (this machine only; HFBENCH_MLFLOW_HOST changes it)"
    else
      say "mlflow binds $MLFLOW_HOST port $MLFLOW_PORT (HFBENCH_MLFLOW_HOST; no authentication: reachable by every host that can reach this address)"
    fi
  fi

  # --- munge: own key. munged wants its key (and seed) in a private directory; the socket
  # directory stays world-readable so that non-root users can submit jobs too.
  mkdir -p "$STATE/munge/private"; chmod 755 "$STATE/munge"; chmod 700 "$STATE/munge/private"
  ( umask 077; head -c 1024 /dev/urandom >"$STATE/munge/private/munge.key" )
  launch munged munged --foreground --force \
    --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/private/munge.key" \
    --pid-file="$STATE/munge/munged.pid" \
    --seed-file="$STATE/munge/private/munged.seed"
  wait_for munged "[[ -S '$MUNGE_SOCKET' ]]" "$LOG/munged.out"   # -F: logs to stderr

  # --- mariadb: --no-defaults keeps /etc/mysql out; TCP on 127.0.0.1 for slurmdbd.
  # mariadb-install-db takes ~5 s (mostly waiting on disk), so its pristine output is kept
  # in STATE_DIR/cache (never wiped) and copied on later starts.
  local tmpl="$STATE/cache/mariadb-$(mariadbd --version | awk '{print $3}')"
  if [[ ! -d "$tmpl" ]]; then
    rm -rf "$tmpl.tmp"; mkdir -p "$tmpl.tmp"
    mariadb-install-db --no-defaults --datadir="$tmpl.tmp" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install-db.out" 2>&1 \
      || fail "mariadb-install-db failed" "$LOG/mariadb-install-db.out"
    mv "$tmpl.tmp" "$tmpl"
    say "mariadb-install-db done (cached in $tmpl)"
  fi
  mkdir -p "$STATE/mysql"
  cp -a "$tmpl" "$STATE/mysql/data"
  launch mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/mysql/data" \
    --socket="$MYSQL_SOCKET" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
    --pid-file="$STATE/mysql/mysqld.pid" --log-error="$LOG/mariadbd.log" \
    --skip-name-resolve --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
    --innodb-flush-log-at-trx-commit=2
  wait_for mariadbd "mariadb-admin --no-defaults --socket='$MYSQL_SOCKET' -uroot ping" \
    "$LOG/mariadbd.log" "$LOG/mariadbd.out"
  mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" >"$LOG/mariadb-setup.out" 2>&1 \
    || fail "could not create the slurm database user" "$LOG/mariadb-setup.out" "$LOG/mariadbd.log"

  # --- slurmdbd, then register the cluster before slurmctld comes up. Adding a cluster
  # also creates the `root` account with user root; without AccountingStorageEnforce any
  # user's jobs run and are recorded.
  launch slurmdbd slurmdbd -D
  wait_for slurmdbd "timeout 10 sacctmgr -n list cluster" "$LOG/slurmdbd.log" "$LOG/slurmdbd.out"
  timeout 30 sacctmgr -i add cluster "$CLUSTER" >"$LOG/sacctmgr.out" 2>&1 \
    || fail "sacctmgr add cluster failed" "$LOG/sacctmgr.out" "$LOG/slurmdbd.log"
  say "cluster $CLUSTER registered"

  # --- controller and node.
  launch slurmctld slurmctld -D -f "$SLURM_CONF"
  wait_for slurmctld "timeout 10 scontrol ping | grep -q UP" "$LOG/slurmctld.log" "$LOG/slurmctld.out"
  # HFBENCH_SERVICES_NODE: the node a slurmd (and the slurmstepd it forks) belongs to (crash-node)
  launch slurmd env "HFBENCH_SERVICES_NODE=$node" slurmd -D -f "$SLURM_CONF" -N "$node"
  launch slurmd2 env "HFBENCH_SERVICES_NODE=${node}2" slurmd -D -f "$SLURM_CONF" -N "${node}2"
  wait_for slurmd "node_up $node idle" "$LOG/slurmd-$node.log" "$LOG/slurmd.out" "$LOG/slurmctld.log"
  # The second node is best effort (SLURM documents several slurmd on one host for builds with
  # --enable-multiple-slurmd; Debian's 22.05 runs them with distinct ports): if it does not come
  # up, the one-node cluster still serves every test but the two-node one, which says why.
  MULTI=multi
  local t0=$SECONDS
  until node_up "${node}2" idle; do
    if ! alive "$(pid_of slurmd2)" || ((SECONDS - t0 >= TIMEOUT)); then
      say "WARNING: the second node ${node}2 did not start (see $LOG/slurmd2.out, $LOG/slurmd-${node}2.log); no two-node partition"
      stop_group slurmd2
      timeout 10 scontrol update nodename="${node}2" state=down reason="slurmd2 did not start" >/dev/null 2>&1 || true
      MULTI=""
      break
    fi
    sleep 0.2
  done
  [[ -n $MULTI ]] && say "slurmd2 ready"
  WAIT_LABEL=sacct wait_for slurmdbd "timeout 10 sacct -n -X -S now-1minute" "$LOG/slurmctld.log" "$LOG/slurmdbd.log"

  if ((WANT_MLFLOW)); then
    wait_for mlflow "curl -fsS -m 5 http://$MLFLOW_CLIENT_HOST:$MLFLOW_PORT/health" "$LOG/mlflow.out"
  fi

  cat >"$STATE/env.sh" <<EOF
# Generated by scripts/services.sh start; source this file in clients.
export HFBENCH_SERVICES_DIR='$STATE'
export SLURM_CONF='$SLURM_CONF'
export HFBENCH_SLURM_CLUSTER='$CLUSTER'
export HFBENCH_SLURM_PARTITION='debug'
# munge clients (munge/unmunge CLI) need --socket=\$HFBENCH_MUNGE_SOCKET; SLURM reads it from slurm.conf.
export HFBENCH_MUNGE_SOCKET='$MUNGE_SOCKET'
EOF
  if [[ -n $MULTI ]]; then   # two nodes (<hostname> and <hostname>2): for multi-node runs
    echo "export HFBENCH_SLURM_MULTI_PARTITION='$MULTI'" >>"$STATE/env.sh"
  fi
  if ((WANT_MLFLOW)); then
    echo "export HFBENCH_MLFLOW_URI='http://$MLFLOW_CLIENT_HOST:$MLFLOW_PORT'" >>"$STATE/env.sh"
    echo "export HFBENCH_MLFLOW_HOST='$MLFLOW_HOST'" >>"$STATE/env.sh"
    if [[ -n "${MLFLOW_AUTH_PASS:-}" ]]; then  # MLflow's client reads these two
      chmod 600 "$STATE/env.sh"
      echo "export MLFLOW_TRACKING_USERNAME='hfbench'" >>"$STATE/env.sh"
      echo "export MLFLOW_TRACKING_PASSWORD='$MLFLOW_AUTH_PASS'" >>"$STATE/env.sh"
    fi
  fi
  say "all services up"
  echo "$STATE/env.sh"
}

# ---------------------------------------------------------------- node failure (tests)
# What a node failure looks like to SLURM: slurmd and the jobs on the node vanish together.
# The controller would notice by itself after SlurmdTimeout (300 s by default); we tell it
# at once, as a health check would, so a test does not wait five minutes.
crash_node() {
  local node p steps pids
  node="$(hostname -s)"
  # the job steps of this node only (the second node's slurmstepd carry their own node name)
  steps="$(for p in $(marked_pids); do [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == slurmstepd ]] \
             && grep -qzxF "HFBENCH_SERVICES_NODE=$node" "/proc/$p/environ" 2>/dev/null && echo "$p"; done; true)"
  # shellcheck disable=SC2086
  pids="$(session_members $steps) $steps $(pid_of slurmd)"
  say "crashing node $node: SIGKILL to slurmd and job processes: $(echo $pids)"
  # shellcheck disable=SC2086
  kill -KILL -- "-$(pid_of slurmd)" 2>/dev/null || true
  for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
  timeout 20 scontrol update nodename="$node" state=down reason="hfbench crash-node" \
    || fail "scontrol could not mark $node down" "$LOG/slurmctld.log"
  say "node $node is DOWN"
}

restart_node() {
  local node
  node="$(hostname -s)"
  rm -f "$RUN/slurmd-$node.daemon.pid"
  launch slurmd env "HFBENCH_SERVICES_NODE=$node" slurmd -D -f "$SLURM_CONF" -N "$node"
  WAIT_LABEL="slurmd registered" wait_for slurmd \
    "timeout 10 scontrol update nodename=$node state=resume; \
     node_up $node" "$LOG/slurmd-$node.log" "$LOG/slurmctld.log"
}

stop_controller() {
  stop_group slurmctld
  say "slurmctld stopped"
}

start_controller() {
  rm -f "$RUN/slurmctld.daemon.pid"
  launch slurmctld slurmctld -D -f "$SLURM_CONF"
  wait_for slurmctld "timeout 10 scontrol ping | grep -q UP" "$LOG/slurmctld.log" "$LOG/slurmctld.out"
}

case "$cmd" in
  stop-controller)  stop_controller ;;
  start-controller) start_controller ;;
  crash-node)   crash_node ;;
  restart-node) restart_node ;;
  start)  start_all ;;
  stop)   stop_all; say "stopped (state kept in $STATE)" ;;
  status)
    # A SLURM-only start leaves HFBENCH_MLFLOW_URI out of env.sh: then mlflow is not expected.
    [[ -f "$STATE/env.sh" && -z "$(env_get HFBENCH_MLFLOW_URI)" ]] && WANT_MLFLOW=0
    echo "services in $STATE:"; status_all ;;
  env)    [[ -f "$STATE/env.sh" ]] && echo "$STATE/env.sh" ;;
esac
