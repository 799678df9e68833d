#!/usr/bin/env bash
# Install Debian's `chromium` package when /usr/bin/chromium is missing.
#
# The report tests (tests/test_report.py) render `efficacy report`'s HTML in
# headless Chromium and check what is on the page, so `make test` runs this
# first. Idempotent: does nothing when chromium is already installed.
# Non-interactive; needs root (or passwordless sudo) for apt-get.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install-chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install-chromium: chromium is missing and this is not root;" \
             "run as root: apt-get install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-chromium: /usr/bin/chromium not found; installing Debian's chromium package"
$SUDO apt-get update -qq
# --no-install-recommends keeps out the desktop integration, fonts beyond the
# package's own dependencies and the sandbox helper; the tests run it headless.
$SUDO apt-get install -y -qq --no-install-recommends chromium

if [ ! -x /usr/bin/chromium ]; then
    echo "install-chromium: apt-get installed chromium but /usr/bin/chromium is missing" >&2
    exit 1
fi
echo "install-chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n 1)"
