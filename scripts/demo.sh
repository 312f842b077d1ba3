#!/usr/bin/env bash
# The main job, demonstrated on the simulators: set-up (scripts/setup.sh), then
# `python -m token_agent.demo` with any arguments given here.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m token_agent.demo "$@"
