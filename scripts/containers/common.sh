# Shared by the container scripts: where the cache lives and how a step reports itself.
# The cache is outside the repository (a fresh clone reuses it): the base image's root file
# system, the stand-ins' downloads and the private engine's data root (its layer cache).
CACHE=${BATON_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/baton-containers}
BASE_IMAGE=local/python:3.11-bookworm
BATON_IMAGE=${BATON_IMAGE:-baton:latest}
mkdir -p "$CACHE" 2>/dev/null || true  # engine.sh may run as a user who cannot: it says why
say() { echo "containers: $*" >&2; }
# A hash of files' contents (missing files count as empty): what a cached artefact was made from.
key_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
