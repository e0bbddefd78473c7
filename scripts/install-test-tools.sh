#!/usr/bin/env bash
# System tools some tests use. Idempotent; each step is skipped when the tool is already there.
set -euo pipefail
echo "test tools: nothing extra needed yet"
