#!/usr/bin/env bash
# apt-install.sh PACKAGE...: Debian's packages, quietly, where root and apt-get exist (exit 1 where
# they do not, apt's status where the install failed). Waits for another apt's lock rather than failing, and
# refreshes the package lists once if the first try cannot find a package.
set -uo pipefail
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || exit 1
apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" install -y "$@" >/dev/null 2>&1 ||
  { "${apt[@]}" update >/dev/null 2>&1 && "${apt[@]}" install -y "$@" >/dev/null 2>&1; }
