#!/usr/bin/env bash
# Install Debian's `prometheus` package (prometheus + promtool) when promtool is
# missing, and `prometheus-alertmanager` (amtool) when amtool is missing.
#
# The monitoring tests run `promtool check config` / `check rules` / `test rules`
# against monitoring/prometheus/, `amtool check-config` against
# monitoring/alertmanager/, and start a real Prometheus on loopback, so `make test`
# runs this first. Idempotent: does nothing when both tools are already on PATH.
# Non-interactive; needs root (or passwordless sudo) for apt-get.
set -euo pipefail

PACKAGES=()
command -v promtool >/dev/null 2>&1 || PACKAGES+=(prometheus)
command -v amtool >/dev/null 2>&1 || PACKAGES+=(prometheus-alertmanager)
if [ ${#PACKAGES[@]} -eq 0 ]; then
    echo "install-prometheus: $(promtool --version 2>&1 | head -n 1)"
    echo "install-prometheus: $(amtool --version 2>&1 | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install-prometheus: ${PACKAGES[*]} missing and this is not root;" \
             "run as root: apt-get install ${PACKAGES[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-prometheus: installing Debian's ${PACKAGES[*]}"
$SUDO apt-get update -qq
# --no-install-recommends keeps out the node exporter and friends. The packages'
# services are not started here (no systemd in containers); tests start their own.
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"

for tool in promtool amtool; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-prometheus: apt-get installed ${PACKAGES[*]} but $tool is not on PATH" >&2
        exit 1
    fi
    echo "install-prometheus: $($tool --version 2>&1 | head -n 1)"
done
