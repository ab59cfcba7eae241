#!/usr/bin/env bash
# Runs a command with DOCKER_HOST set to an engine (engine.sh): the one answering, else a private
# dockerd started for it and stopped by its pid afterwards.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
run=$(mktemp -d /tmp/baton-ctr-XXXXXX)
trap '"$HERE/engine.sh" stop "$run"' EXIT
host=$("$HERE/engine.sh" start "$run") || { rc=$?; echo "containers: no container engine: $*" >&2; exit "$rc"; }
DOCKER_HOST=$host "$@"
