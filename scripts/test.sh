#!/usr/bin/env bash
# The whole test suite: set-up (scripts/setup.sh), then pytest. Extra arguments go to pytest,
# e.g.  scripts/test.sh -k ctaphid -x
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
echo "token-agent test: .venv/bin/python -m pytest $*" >&2
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "token-agent test: ERROR: pytest collected no tests (exit code 5); that is a failure here" >&2
fi
exit "$rc"
