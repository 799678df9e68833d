#!/usr/bin/env bash
# Install Debian's `prometheus` package (prometheus + promtool) when promtool is missing.
#
# The monitoring tests run `promtool check config` / `promtool check rules` against
# monitoring/prometheus/ and start a real Prometheus on loopback, so `make test`
# runs this first. Idempotent: does nothing when promtool is already on PATH.
# Non-interactive; needs root (or passwordless sudo) for apt-get.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "install-prometheus: $(promtool --version 2>&1 | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install-prometheus: promtool is missing and this is not root;" \
             "run as root: apt-get install prometheus" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-prometheus: promtool not found; installing Debian's prometheus package"
$SUDO apt-get update -qq
# --no-install-recommends keeps out the node exporter and friends. The package's
# service is not started here (no systemd in containers); tests start their own.
$SUDO apt-get install -y -qq --no-install-recommends prometheus

if ! command -v promtool >/dev/null 2>&1; then
    echo "install-prometheus: apt-get installed prometheus but promtool is not on PATH" >&2
    exit 1
fi
echo "install-prometheus: $(promtool --version 2>&1 | head -n 1)"
