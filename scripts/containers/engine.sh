#!/usr/bin/env bash
# A Docker engine for `make image` and the compose test.
#   engine.sh start RUNDIR   prints the DOCKER_HOST to use; exit 77 (with the reason on stderr)
#                            when no engine answers and none can start here (no root, no dockerd,
#                            no kernel support).
#   engine.sh stop RUNDIR    stops the engine it started (by the pid in RUNDIR), removes RUNDIR.
#   engine.sh clean HOST     removes test stacks' containers whose test process is gone.
# An engine already answering (DOCKER_HOST, or the default socket) is used as it is. Otherwise a
# private dockerd: its socket, exec root and pid file in RUNDIR, its data root in the cache (the
# layer cache survives; one private engine at a time holds it, others wait for the lock), no
# iptables, no default bridge, and a closed proxy so a registry pull fails at once, never hangs.
# Its socket is printed, never exported: other tests must not see an engine that cannot pull.
set -euo pipefail
. "$(dirname "$0")/common.sh"
cmd=${1:?start|stop} RUN=${2:?run dir}

# Compose test stacks (projects batontest<pid>, the pid of the test process) whose process is
# gone: a run killed before its `compose down` leaves them, and their restart policy would bring
# them back, load and all, in the next engine that opens the data root. Removed when a private
# engine stops and when one starts (the engine of a killed run may have died with it), and by
# `engine.sh clean HOST`.
leftovers() {
  local id project pid gone=()
  while read -r id project; do
    pid=${project#batontest}
    [[ $project == batontest* && $pid =~ ^[0-9]+$ ]] || continue
    kill -0 "$pid" 2>/dev/null || gone+=("$id")
  done < <(timeout 60 docker -H "$1" ps -a --filter label=com.docker.compose.project \
    --format '{{.ID}} {{.Label "com.docker.compose.project"}}' 2>/dev/null || true)
  [ ${#gone[@]} -gt 0 ] || return 0
  say "removing ${#gone[@]} test containers left by runs that are gone"
  timeout 120 docker -H "$1" rm -f -v "${gone[@]}" >/dev/null 2>&1 || say "could not remove all of: ${gone[*]}"
}

stop() {
  [ -f "$RUN/docker.pid" ] || { rm -rf "$RUN"; return 0; }
  local pid; pid=$(cat "$RUN/docker.pid")
  leftovers "unix://$RUN/docker.sock"
  # Images no tag points to any more (earlier builds); the tagged ones are the next layer cache.
  timeout 60 docker -H "unix://$RUN/docker.sock" image prune -f >/dev/null 2>&1 || true
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { say "dockerd $pid still running after 30 s: KILL"; kill -KILL "$pid"; }
  fi
  local m
  for m in "$RUN"/exec/netns/*; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
  rm -rf "$RUN"
}

answers() { timeout 10 docker -H "$1" version >/dev/null 2>&1; }

start() {
  mkdir -p "$RUN"
  if [ -n "${DOCKER_HOST:-}" ] && answers "$DOCKER_HOST"; then echo "$DOCKER_HOST"; return; fi
  if [ -S /var/run/docker.sock ] && answers unix:///var/run/docker.sock; then
    echo unix:///var/run/docker.sock; return
  fi
  command -v docker >/dev/null || { say "no docker client (make container-tools)"; exit 77; }
  [ "$(id -u)" = 0 ] || { say "no engine answers and dockerd needs root here"; exit 77; }
  command -v dockerd >/dev/null || { say "no engine answers and dockerd is not installed (make container-tools)"; exit 77; }
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  grep -qw overlay /proc/filesystems || { say "the kernel has no overlay file system"; exit 77; }
  # A bridge's traffic passes the FORWARD chain once br_netfilter is loaded: a DROP policy left
  # there (by an earlier dockerd with iptables on) cuts the stack's containers off from each other.
  if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ] &&
    iptables -S FORWARD 2>/dev/null | grep -qx -- '-P FORWARD DROP'; then
    say "iptables' FORWARD policy is DROP with br_netfilter loaded: containers on a bridge cannot"
    say "talk to each other (left by another dockerd?); 'iptables -P FORWARD ACCEPT' or unload br_netfilter"
    exit 1
  fi
  local host=unix://$RUN/docker.sock
  # The lock is inherited by dockerd (fd 9) and held as long as it runs.
  exec 9>"$CACHE/engine.lock"
  if ! flock -n 9; then
    # Its owner (the process that started it) gone, e.g. a test run killed: stop it by its pid.
    local other owner
    other=$(cat "$CACHE/engine.run" 2>/dev/null || true)
    owner=$(cat "$other/owner" 2>/dev/null || true)
    if [ -n "$other" ] && [ -n "$owner" ] && ! kill -0 "$owner" 2>/dev/null; then
      say "stopping the private engine left by process $owner ($other)"
      RUN=$other stop
    fi
    flock -n 9 || { say "another private engine uses $CACHE/docker: waiting (up to 15 min)"; flock -w 900 9; }
  fi
  echo "$PPID" >"$RUN/owner"
  echo "$RUN" >"$CACHE/engine.run"
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= http_proxy= https_proxy= \
    setsid dockerd --host "$host" --data-root "$CACHE/docker" --exec-root "$RUN/exec" \
    --pidfile "$RUN/docker.pid" --storage-driver overlay2 --iptables=false --ip-forward=false \
    --bridge=none --userland-proxy=false --log-level warn >"$RUN/dockerd.log" 2>&1 </dev/null &
  exec 9>&-
  for _ in $(seq 120); do answers "$host" && [ -s "$RUN/docker.pid" ] && break; sleep 0.25; done
  if ! answers "$host"; then
    say "dockerd did not start: $(tail -n 3 "$RUN/dockerd.log" | tr '\n' ' ')"
    stop; exit 77
  fi
  leftovers "$host"
  echo "$host"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  clean) leftovers "$RUN" ;;  # RUN is a DOCKER_HOST here
  *) say "usage: engine.sh start|stop RUNDIR | clean DOCKER_HOST"; exit 2 ;;
esac
