#!/usr/bin/env bash
# ruff and mypy over the repository, as configured in pyproject.toml; exits non-zero on any finding.
# scripts/test.sh runs it before pytest. Needs the dev extra installed (LLAMAFLEET_VENV, default .venv).
# mypy covers the program, every test and the benches (bench/gpu's device-only imports: pyproject.toml).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${LLAMAFLEET_VENV:-$ROOT/.venv}
cd "$ROOT"
# The distribution maps the top-level folders onto `llamafleet.*` ([tool.setuptools] package-dir),
# which mypy cannot follow through the editable install: a tree of links gives every module the
# name it is imported by (pyproject.toml's mypy_path points here).
links=build/typecheck/llamafleet
mkdir -p "$links"
for package in agent common controller patches proto; do
  ln -sfn "../../../$package" "$links/$package"
done
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/mypy" "$links" tests bench
