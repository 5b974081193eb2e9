#!/usr/bin/env bash
# Fill the checkout's ignored folders that scripts/device/gpu_bench.sh carries to the GPU machine:
#   .whl/     wheels for the device's Python 3.12 (llamafleet's dependencies, gguf, llamafleet itself)
#   .devsrc/  llama.cpp source: the tree vendored in llama-cpp-python's sdist, without docs/models
# Run here (with network), from anywhere:  bash scripts/device/prepare.sh [--worktree]
# llamafleet's wheel is built from HEAD (committed code only), or from the working tree with --worktree.
# Both folders must be ignored (.whl/ is in .gitignore; add /.devsrc/ and /.devbin/ to .git/info/exclude).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
CACHE=${LLAMAFLEET_TEST_CACHE:-$HOME/.cache/llamafleet-test}
SDIST=$CACHE/downloads/llama_cpp_python-0.3.36.tar.gz
SUBDIR=llama_cpp_python-0.3.36/vendor/llama.cpp
PY=${PYTHON:-$ROOT/.venv/bin/python}

for dir in .whl .devsrc .devbin; do
  git check-ignore -q "$dir/x" || { echo "error: $dir/ is not ignored (see the header of $0)" >&2; exit 1; }
done

mkdir -p .whl .devsrc
# Same versions as the project's own venv; --no-deps, so each is named.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 -d .whl \
  grpcio==1.85.1 grpcio-health-checking==1.85.1 protobuf==7.36.2 gguf==0.19.0 nvidia-ml-py==13.615.71 \
  psutil==7.2.2 click==8.5.1 aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 \
  frozenlist==1.8.0 aiosignal==1.4.0 aiohappyeyeballs==2.7.1 attrs==26.1.0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "${1:-}" = "--worktree" ]; then
  # Tracked and untracked-not-ignored files, as they are now.
  git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$tmp" 2>/dev/null || true
else
  git archive HEAD | tar -x -C "$tmp"
fi
rm -f .whl/llamafleet-*.whl
(cd "$tmp" && "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$ROOT/.whl" .)

if [ ! -f .devsrc/llama-src.tar.gz ]; then
  mkdir -p "$tmp/src"
  tar -xzf "$SDIST" -C "$tmp/src" "$SUBDIR"
  tar -czf .devsrc/llama-src.tar.gz -C "$tmp/src" --exclude="$SUBDIR/docs" --exclude="$SUBDIR/models" \
    --exclude="$SUBDIR/media" --exclude="$SUBDIR/benches" "$SUBDIR"
fi
du -sh .whl .devsrc
