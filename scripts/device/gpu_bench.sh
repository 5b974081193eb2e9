#!/usr/bin/env bash
# The GPU run of issue 8, on a lent GPU machine (no network there). Run from the repository root:
#
#   bash scripts/device/gpu_bench.sh all      # setup, then bench inside the same time budget
#   bash scripts/device/gpu_bench.sh setup    # wheels, CUDA build, pack binaries, NVML check, model
#   bash scripts/device/gpu_bench.sh bench    # bench/gpu/split_bench.py (needs setup's outputs)
#
# It needs what scripts/device/prepare.sh put in the checkout's ignored folders: .whl/ (wheels
# for Python 3.12, llamafleet's own among them) and .devsrc/ (the trimmed llama.cpp source), and
# optionally .devbin/ (a CUDA install packed by an earlier run: then nothing is compiled).
# Results go to $OUT (at most 8 files come back): log.txt, setup.json, results.json, results.md,
# and llama-cuda.tar.zst.NN (the built binaries, for a later run).
#
# Environment: OUT (required), BENCH_BUDGET_S (whole-run budget, default 570),
# BENCH_MEMORY_LIMIT (per agent, default 6GiB), BENCH_NOT_RUN (a line for the report's not-run list),
# and for trying it out on a CPU machine: BENCH_SHAPE (default llama-8b), BENCH_BUILD_FLAGS
# (default --cuda), BENCH_STATE_DIR (default /tmp/lf/state), BENCH_SOURCE (default the carried
# tarball), BENCH_USE_INSTALLED=1 (use the llamafleet on PATH, install no wheels).
set -euo pipefail

MODE=${1:-all}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
: "${OUT:?set OUT to the folder whose files come back}"
START=${BENCH_START:-$(date +%s)}
BUDGET=${BENCH_BUDGET_S:-570}
WORK=/tmp/lf
SITE=/tmp/site
SRC_SUBDIR=llama_cpp_python-0.3.36/vendor/llama.cpp
SHAPE=${BENCH_SHAPE:-llama-8b}
# tmpfs when the model is there or fits (8.5 GB for the 8B shape), else the disk (page cache).
if [ -f "/dev/shm/$SHAPE-q8_0.gguf" ] ||
  [ "$(df --output=avail -B1 /dev/shm 2>/dev/null | tail -n 1)" -gt $((12 * 1024 ** 3)) ] 2>/dev/null; then
  MODEL_DIR=/dev/shm
else
  MODEL_DIR=$WORK/models
fi
MODEL=$MODEL_DIR/$SHAPE-q8_0.gguf
STATE=${BENCH_STATE_DIR:-$WORK/state}
exec > >(tee -a "$OUT/log.txt") 2>&1

say() { printf '==> [%ss] %s\n' "$(($(date +%s) - START))" "$*"; }

install_wheels() {
  if [ -n "${BENCH_USE_INSTALLED:-}" ]; then
    return 0
  fi
  if [ ! -x "$SITE/bin/llamafleet-agent" ]; then
    say "installing carried wheels into $SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  fi
  export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH
  python3 -c 'import llamafleet.agent.cli, gguf, grpc, google.protobuf as p; print("python", __import__("sys").version.split()[0], "protobuf", p.__version__, "grpc", grpc.__version__)'
}

restore_binaries() {
  # A CUDA install packed by an earlier run: put it back where its manifest says it lives.
  local parts=(.devbin/llama-cuda.tar.zst.*)
  [ -e "${parts[0]}" ] || return 0
  say "restoring the packed CUDA install from .devbin/"
  cat "${parts[@]}" | zstd -d --long=30 -q | tar -x -C /
}

build() {
  say "llamafleet-agent build ${BENCH_BUILD_FLAGS:---cuda}"
  local t0 status
  t0=$(date +%s)
  set +e
  # shellcheck disable=SC2086 # BENCH_BUILD_FLAGS is a list of flags
  llamafleet-agent build --source "${BENCH_SOURCE:-.devsrc/llama-src.tar.gz:$SRC_SUBDIR}" ${BENCH_BUILD_FLAGS:---cuda} \
    --jobs "$(nproc)" --state-dir "$STATE" > "$WORK/build.out" 2>&1
  status=$?
  set -e
  tail -n 15 "$WORK/build.out"
  if [ "$status" -ne 0 ]; then
    say "build failed (exit $status)"
    return "$status"
  fi
  INSTALL=$(tail -n 1 "$WORK/build.out")
  echo "$INSTALL" > "$WORK/install-dir"
  echo "$(($(date +%s) - t0))" > "$WORK/build-seconds"
  say "built in $(cat "$WORK/build-seconds") s: $INSTALL"
}

pack_binaries() {
  # Bring the install back (zstd, long window: the two binaries share the CUDA kernels).
  [ -e .devbin/llama-cuda.tar.zst.00 ] && return 0
  say "packing $INSTALL"
  tar -C / -cf - "${INSTALL#/}" | zstd -q -T0 -12 --long=30 > "$WORK/llama-cuda.tar.zst"
  local size
  size=$(stat -c %s "$WORK/llama-cuda.tar.zst")
  say "packed: $((size / 1048576)) MiB"
  if [ "$size" -le $((44 * 1048576)) ]; then
    split -b 15M -d "$WORK/llama-cuda.tar.zst" "$OUT/llama-cuda.tar.zst."
  else
    say "too large to bring back (over 44 MiB); a later run rebuilds"
  fi
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
  install_wheels
  mkdir -p "$WORK"
  restore_binaries
  build
  local install=$INSTALL
  pack_binaries
  say "rpc-server banner and manifest"
  timeout 20 stdbuf -oL "$install/bin/ggml-rpc-server" -H 127.0.0.1 -p 50099 > "$WORK/banner.txt" 2>&1 &
  local banner_pid=$!
  sleep 3
  kill "$banner_pid" 2>/dev/null || true
  wait "$banner_pid" 2>/dev/null || true
  cat "$WORK/banner.txt"
  say "NVML (agent) vs nvidia-smi vs rpc-server banner"
  python3 bench/gpu/nvml_check.py --llama-cpp "$install" --out "$WORK/nvml.json" --workdir "$WORK/nvml" \
    || say "the NVML check failed (see above); going on"
  say "generating the model"
  mkdir -p "$MODEL_DIR"
  df -h "$MODEL_DIR" | tail -n 1
  python3 bench/gpu/make_model.py --shape "$SHAPE" --type q8_0 --out "$MODEL"
  python3 - "$install" "$WORK" "$OUT/setup.json" <<'EOF'
import json, sys
from pathlib import Path
install, work, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
doc = {
    "install": str(install),
    "manifest": json.loads((install / "manifest.json").read_text()),
    "build_seconds": int((work / "build-seconds").read_text()) if (work / "build-seconds").exists() else None,
    "build_output_tail": (work / "build.out").read_text(errors="replace").splitlines()[-40:],
    "rpc_server_banner": (work / "banner.txt").read_text(errors="replace").splitlines(),
    "nvml": json.loads((work / "nvml.json").read_text()) if (work / "nvml.json").exists() else None,
}
out.write_text(json.dumps(doc, indent=2) + "\n")
m = doc["manifest"]
print("manifest backends:", m["backends"], "| flags:", " ".join(m["cmake_flags"]))
EOF
}

bench() {
  install_wheels
  local install left
  install=$(cat "$WORK/install-dir")
  left=$((BUDGET - ($(date +%s) - START)))
  say "benchmarks (about $left s left)"
  local extra=()
  if [ -n "${BENCH_NOT_RUN:-}" ]; then extra+=(--not-run "$BENCH_NOT_RUN"); fi
  PYTHONUNBUFFERED=1 python3 bench/gpu/split_bench.py --llama-cpp "$install" --model "$MODEL" \
    --out "$OUT" --workdir "$WORK/bench" --nvml "$WORK/nvml.json" --deadline-s "$left" \
    --memory-limit "${BENCH_MEMORY_LIMIT:-6GiB}" "${extra[@]}"
}

case "$MODE" in
  setup) setup ;;
  bench) bench ;;
  all) setup; bench ;;
  *) echo "usage: $0 all|setup|bench" >&2; exit 2 ;;
esac
say "done"
