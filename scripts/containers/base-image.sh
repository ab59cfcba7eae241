#!/usr/bin/env bash
# Makes local/python:3.11-bookworm, the image's base where no registry answers: Debian bookworm's
# own python3 (3.11) by debootstrap, with this machine's CA certificates (TLS to PyPI passes a
# proxy with a CA of its own here). Cached: the root file system as a tarball keyed on this
# script and the CA certificates, and the imported image carries the key as a label, so neither
# is made again until one of them changes. Needs DOCKER_HOST (engine.sh start) and root.
set -euo pipefail
. "$(dirname "$0")/common.sh"
CAS=(/usr/local/share/ca-certificates/*.crt)
[ -e "${CAS[0]}" ] || CAS=()
KEY=$(key_of "$0" "${CAS[@]}")
TAR=$CACHE/base-$KEY.tar

# image.sh and standins.sh may run at once: one makes the base, the other waits and finds it.
exec 8>"$CACHE/base.lock"
flock -w 900 8 || { say "the base image lock is still held after 15 min"; exit 1; }
have=$(docker image inspect -f '{{index .Config.Labels "baton.base-key"}}' "$BASE_IMAGE" 2>/dev/null || true)
[ "$have" = "$KEY" ] && exit 0

if [ ! -s "$TAR" ]; then
  command -v debootstrap >/dev/null || { say "debootstrap is not installed (make container-tools)"; exit 1; }
  say "debootstrap of bookworm for $BASE_IMAGE (about 2 minutes, once)"
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  # Two stages, so the second (dpkg configuring every package: most of the time) runs with
  # force-unsafe-io: no fsync per file. This root is only ever tarred; a crash leaves no tarball.
  # Measured: 129 s -> 56 s for the second stage (docs/benchmarks.md, "Suite duration").
  log=$CACHE/debootstrap.log
  debootstrap --foreign --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,wget \
    bookworm "$root" >"$log" 2>&1 || { tail -n 20 "$log"; exit 1; }
  echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/baton-unsafe-io"
  chroot "$root" /debootstrap/debootstrap --second-stage >>"$log" 2>&1 || { tail -n 20 "$log"; exit 1; }
  rm -f "$root/etc/dpkg/dpkg.cfg.d/baton-unsafe-io"
  ((${#CAS[@]})) && cp "${CAS[@]}" "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" --numeric-owner -cf "$TAR.tmp" . && mv "$TAR.tmp" "$TAR"
  rm -f "$CACHE"/base-*.tar.tmp
  find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -name "base-$KEY.tar" -delete
fi
docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL baton.base-key=$KEY" \
  --change 'CMD ["python3"]' "$TAR" "$BASE_IMAGE" >/dev/null
say "$BASE_IMAGE imported ($KEY)"
