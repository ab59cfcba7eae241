#!/usr/bin/env bash
# docker.io (dockerd + client), docker-compose (v1; no compose v2 plugin in Debian 12) and
# debootstrap from Debian's packages, for `make image` and the compose test. Silent when all are
# there; installs what is missing as root where apt exists; otherwise says what is missing and
# exits 0 (the compose test then skips with the reason, `make image` stops with it).
set -uo pipefail
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
((${#need[@]})) || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "containers: ${need[*]} not installed and cannot be (needs root and apt-get): the compose test will skip" >&2
  exit 0
fi
log=$(mktemp)
# No service may start from the package's scripts: a system dockerd answering on the default
# socket would be seen by every test run on this machine.
guard=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && guard=1
fi
echo "containers: apt-get install ${need[*]}" >&2
ok=0
# Another apt (a second install target, unattended upgrades) may hold dpkg's lock: wait for it
# rather than fail (seen: "Could not get lock /var/lib/dpkg/lock-frontend" skipped the compose test).
apt=(apt-get -o DPkg::Lock::Timeout=600 -q)
DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${need[@]}" >"$log" 2>&1 \
  || { "${apt[@]}" update >>"$log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${need[@]}" >>"$log" 2>&1; } \
  || ok=$?
[ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d
if [ "$ok" != 0 ]; then
  tail -n 5 "$log" >&2
  echo "containers: could not install ${need[*]}: the compose test will skip" >&2
fi
rm -f "$log"
exit 0
