#!/usr/bin/env bash
# The whole test suite: set-up (scripts/setup.sh), then pytest. Extra arguments go to pytest,
# e.g.  scripts/test.sh -k ctaphid -x   or the whole suite on PostgreSQL:
#       scripts/test.sh --store-engine postgresql
# Without arguments, once the suite passed, the store's contract suite (tests marked
# store_contract) runs a second time with the store on PostgreSQL; both decide the exit code.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh

run_pytest() {  # run_pytest WHAT ARGS...: pytest, its duration and exit code said
    local what=$1 started rc=0
    shift
    echo "token-agent test: $what: .venv/bin/python -m pytest $*" >&2
    started=$SECONDS
    .venv/bin/python -m pytest "$@" || rc=$?
    echo "token-agent test: $what: exit code $rc after $((SECONDS - started)) s" >&2
    if [[ $rc -eq 5 ]]; then
        echo "token-agent test: ERROR: pytest collected no tests (exit code 5); that is a failure here" >&2
    fi
    return "$rc"
}

rc=0
run_pytest "the suite" "$@" || rc=$?
if [[ $rc -eq 0 && $# -eq 0 ]]; then
    run_pytest "the store's contract suite again, on PostgreSQL" \
        --store-engine postgresql -m store_contract || rc=$?
fi
exit "$rc"
