#!/usr/bin/env bash
# Install Debian's headless-capable Chromium, which tests/downstream/test_attention.py uses to
# open the page written by tools/visualize_attention.py. Idempotent: does nothing when a
# chromium binary is already on PATH. Installing needs root and apt-get (Debian/Ubuntu);
# elsewhere the script says what to install and exits non-zero.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    echo "chromium is already installed: $(command -v chromium || command -v chromium-browser)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no apt-get here; install Chromium with your package manager (it must provide 'chromium')" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: installing chromium needs root; run: sudo apt-get update && sudo apt-get install -y chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium
command -v chromium >/dev/null 2>&1 || { echo "error: apt-get finished but 'chromium' is not on PATH" >&2; exit 1; }
echo "installed $(chromium --version 2>/dev/null || echo chromium)"
