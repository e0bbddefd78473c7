#!/usr/bin/env bash
# System tools some tests use. Idempotent; each step is skipped when the tool is already there.
set -euo pipefail

if ! command -v prometheus >/dev/null 2>&1; then
    echo "installing prometheus (Debian package) for tests/test_prometheus.py"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
prometheus --version 2>&1 | head -n 1
