#!/usr/bin/env bash
# Builds baton's image (BATON_IMAGE, default baton:latest) with the engine at DOCKER_HOST.
# The base is the official python:3.11-slim-bookworm where a registry gives it; where none
# answers, local/python:3.11-bookworm made from Debian's packages (base-image.sh, cached).
# BATON_PYTHON_IMAGE picks another base. The image is stamped with the version and the commit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
REPO=$(cd "$HERE/../.." && pwd)
OFFICIAL=python:3.11-slim-bookworm

base=${BATON_PYTHON_IMAGE:-}
if [ -z "$base" ]; then
  if docker image inspect "$OFFICIAL" >/dev/null 2>&1 || timeout 120 docker pull -q "$OFFICIAL" >/dev/null 2>&1; then
    base=$OFFICIAL
  else
    say "$OFFICIAL cannot be pulled here: the base is made from Debian's packages"
    "$HERE/base-image.sh"
    base=$BASE_IMAGE
  fi
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n 1)
commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ] && commit=$commit-dirty
t0=$SECONDS
# The legacy builder (no buildx plugin here); the build's RUN steps use the host's network, as
# the private engine has no bridge of its own.
if ! DOCKER_BUILDKIT=0 docker build -q --network host --build-arg PYTHON_IMAGE="$base" \
  --build-arg BATON_VERSION="$version" --build-arg BATON_COMMIT="$commit" \
  --build-arg BATON_BUILD_TIME="$(date -u +%FT%TZ)" \
  -t "$BATON_IMAGE" "$REPO" >"$CACHE/build.log" 2>&1; then
  tail -n 40 "$CACHE/build.log" >&2
  say "docker build failed (the whole log: $CACHE/build.log)"
  exit 1
fi
size=$(docker image inspect -f '{{.Size}}' "$BATON_IMAGE")
say "$BATON_IMAGE built on $base in $((SECONDS - t0)) s: $((size / 1000000)) MB, $version at $commit"
