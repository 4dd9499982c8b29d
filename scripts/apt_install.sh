#!/usr/bin/env bash
# Install one Debian/Ubuntu package unless a probe says it is already there.
#
#   scripts/apt_install.sh PACKAGE PROBE-COMMAND...
#
# Idempotent: exits 0 at once when PROBE-COMMAND succeeds. Installing needs root and apt-get;
# elsewhere the script says what to install and exits non-zero, so callers decide whether the
# package is required (make test-deps: Chromium for the attention-page test) or only helps
# (make setup: tcmalloc for a lower memory peak in CPU training).
set -euo pipefail

package=$1
shift
if "$@" >/dev/null 2>&1; then
    echo "$package is already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no apt-get here; install $package with your package manager" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: installing $package needs root; run: sudo apt-get update && sudo apt-get install -y $package" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y "$package"
"$@" >/dev/null 2>&1 || { echo "error: apt-get installed $package but the check '$*' still fails" >&2; exit 1; }
echo "installed $package"
