#!/usr/bin/env bash
# The GPU run of issue 8, on a lent GPU machine (no network there). Run from the repository root:
#
#   bash scripts/device/gpu_bench.sh all      # setup, then bench inside the same time budget
#   bash scripts/device/gpu_bench.sh setup    # wheels, CUDA build, pack binaries, NVML check, model
#   bash scripts/device/gpu_bench.sh bench    # bench/gpu/split_bench.py (needs setup's outputs)
#   bash scripts/device/gpu_bench.sh streams  # bench/gpu/streams_bench.py (issue 13; needs setup's outputs)
#   bash scripts/device/gpu_bench.sh streams-all  # setup (packing left to the end), streams, then
#                                                 # pack the build if the budget still allows
#   bash scripts/device/gpu_bench.sh loads     # bench/gpu/load_bench.py (issues 15, 16; needs setup's outputs)
#   bash scripts/device/gpu_bench.sh loads-all # setup without packing, then loads
#   bash scripts/device/gpu_bench.sh report-all # setup without packing, loads (into $OUT/loads), then
#                                               # the split_bench stages in BENCH_STAGES (default
#                                               # fleet,llamafleet,single,rpc,membw) in what is left
#   bash scripts/device/gpu_bench.sh coordinator-all # setup without packing, then the coordinator
#                                               # placement stages (issue 22)
#   bash scripts/device/gpu_bench.sh paths-all # setup without packing, then bench/gpu/decode_paths.py
#                                               # (where a split's decode time goes; BENCH_PATHS_ARGS)
#
# It needs what scripts/device/prepare.sh put in the checkout's ignored folders: .whl/ (wheels
# for Python 3.12, llamafleet's own among them) and .devsrc/ (the trimmed llama.cpp source), and
# optionally .devbin/ (a CUDA install packed by an earlier run: then nothing is compiled).
# Results go to $OUT (at most 8 files come back): log.txt, setup.json, results.json, results.md,
# and llama-cuda.tar.{zst,xz}.NN (the built binaries, for a later run: zstd when the machine has
# it, else xz, else none; packing is optional and never stops a run).
#
# Environment: OUT (required), BENCH_BUDGET_S (whole-run budget, default 570),
# BENCH_MEMORY_LIMIT (per agent, default 6GiB), BENCH_NOT_RUN (a line for the report's not-run list),
# BENCH_STREAMS_MEMORY_LIMIT (per agent for streams, default 7GiB: 8 slots of ctx 2048 over both),
# BENCH_STREAMS_ARGS (more flags for streams_bench.py, e.g. "--reps 5 --stages streams"),
# BENCH_NO_PACK=1 (streams-all: do not pack the build at the end; with xz it came to 79 MiB, too
# large to bring back),
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
  local parts=(.devbin/llama-cuda.tar.zst.*) tool=(zstd -d --long=30 -q)
  if [ ! -e "${parts[0]}" ]; then
    parts=(.devbin/llama-cuda.tar.xz.*) tool=(xz -d -q)
  fi
  [ -e "${parts[0]}" ] || return 0
  if ! command -v "${tool[0]}" > /dev/null; then
    say "${tool[0]} is not on this machine: cannot unpack .devbin/; building instead"
    return 0
  fi
  say "restoring the packed CUDA install from .devbin/"
  cat "${parts[@]}" | "${tool[@]}" | tar -x -C / || say "unpacking .devbin/ failed; building instead"
}

build() {
  local patch_flag=""
  if ! command -v patch > /dev/null && ! command -v git > /dev/null; then
    say "neither patch nor git is on this machine: building stock llama.cpp (--no-patches)"
    patch_flag=--no-patches
  fi
  say "llamafleet-agent build ${BENCH_BUILD_FLAGS:---cuda} $patch_flag"
  local t0 status
  t0=$(date +%s)
  set +e
  # shellcheck disable=SC2086 # BENCH_BUILD_FLAGS is a list of flags
  llamafleet-agent build --source "${BENCH_SOURCE:-.devsrc/llama-src.tar.gz:$SRC_SUBDIR}" ${BENCH_BUILD_FLAGS:---cuda} $patch_flag \
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
  # Bring the install back for a later run (optional: any failure here is reported, never fatal).
  # zstd with a long window (the two binaries share the CUDA kernels), else xz, else nothing.
  if [ -e .devbin/llama-cuda.tar.zst.00 ] || [ -e .devbin/llama-cuda.tar.xz.00 ]; then
    return 0
  fi
  local ext tool
  if command -v zstd > /dev/null; then
    ext=zst tool=(zstd -q -T0 -12 --long=30)
  elif command -v xz > /dev/null; then
    ext=xz tool=(xz -q -T0 -6)
  else
    say "not packing the build: neither zstd nor xz is on this machine (a later run rebuilds)"
    return 0
  fi
  local limit=${1:-600}
  say "packing $INSTALL with ${tool[0]} (at most $limit s)"
  if ! tar -C / -cf - "${INSTALL#/}" | timeout "$limit" "${tool[@]}" > "$WORK/llama-cuda.tar.$ext"; then
    say "packing failed or ran out of time; a later run rebuilds"
    rm -f "$WORK/llama-cuda.tar.$ext"
    return 0
  fi
  local size
  size=$(stat -c %s "$WORK/llama-cuda.tar.$ext")
  say "packed: $((size / 1048576)) MiB"
  if [ "$size" -le $((44 * 1048576)) ]; then
    split -b 15M -d "$WORK/llama-cuda.tar.$ext" "$OUT/llama-cuda.tar.$ext."
  else
    say "too large to bring back (over 44 MiB); a later run rebuilds"
  fi
}

start_model() {
  # The model is written while the build compiles (one core and memory bandwidth; the build has
  # the rest): about 20 s of the run saved.
  mkdir -p "$MODEL_DIR"
  df -h "$MODEL_DIR" | tail -n 1
  say "generating the model in the background: $MODEL"
  python3 bench/gpu/make_model.py --shape "$SHAPE" --type q8_0 --out "$MODEL" > "$WORK/model.out" 2>&1 &
  MODEL_PID=$!
}

finish_model() {
  local status=0
  wait "$MODEL_PID" || status=$?
  cat "$WORK/model.out"
  if [ "$status" -ne 0 ]; then
    say "model generation failed (exit $status)"
  fi
  return "$status"
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || true
  install_wheels
  mkdir -p "$WORK"
  restore_binaries
  start_model
  local build_status=0
  build || build_status=$?
  finish_model || return $?
  [ "$build_status" -eq 0 ] || return "$build_status"
  local install=$INSTALL
  if [ -z "${SKIP_PACK:-}" ]; then
    pack_binaries || say "packing failed (exit $?); going on without it"
  fi
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
    --memory-limit "${BENCH_MEMORY_LIMIT:-6GiB}" --stages "${BENCH_STAGES:-membw,fleet,single,rpc,cache,llamafleet,rpc_local_gpu}" \
    "${extra[@]}"
}

streams() {
  install_wheels
  local install left
  install=$(cat "$WORK/install-dir")
  left=$((BUDGET - ($(date +%s) - START)))
  say "streams benchmark (about $left s left)"
  local extra=()
  if [ -n "${BENCH_NOT_RUN:-}" ]; then extra+=(--not-run "$BENCH_NOT_RUN"); fi
  # shellcheck disable=SC2206 # BENCH_STREAMS_ARGS is a list of flags
  extra+=(${BENCH_STREAMS_ARGS:-})
  PYTHONUNBUFFERED=1 python3 bench/gpu/streams_bench.py --llama-cpp "$install" --model "$MODEL" \
    --out "$OUT" --workdir "$WORK/streams" --deadline-s "$left" \
    --memory-limit "${BENCH_STREAMS_MEMORY_LIMIT:-7GiB}" "${extra[@]}"
}

loads() {
  # $1: the folder for its results.json/results.md (default $OUT)
  install_wheels
  local install out=${1:-$OUT}
  install=$(cat "$WORK/install-dir")
  mkdir -p "$out"
  say "load benchmark (local vs llamafleet cold/warm, pre-computed hashes vs stock hashing)"
  PYTHONUNBUFFERED=1 python3 bench/gpu/load_bench.py --llama-cpp "$install" --model "$MODEL" \
    --out "$out" --workdir "$WORK/loads" --memory-limit "${BENCH_MEMORY_LIMIT:-6GiB}" --setup-json "$OUT/setup.json"
}

pack_late() {
  # After the measurement: pack the build with what is left of the budget (optional).
  local left
  if [ -n "${BENCH_NO_PACK:-}" ]; then
    say "not packing the build (BENCH_NO_PACK is set)"
    return 0
  fi
  INSTALL=$(cat "$WORK/install-dir")
  left=$((BUDGET - ($(date +%s) - START) - 15))
  if [ "$left" -lt 30 ]; then
    say "not packing the build: $left s left of the budget"
    return 0
  fi
  pack_binaries "$left" || say "packing failed (exit $?); going on without it"
}

case "$MODE" in
  setup) setup ;;
  bench) bench ;;
  all) setup; bench ;;
  streams) streams ;;
  streams-all)
    SKIP_PACK=1 setup
    streams || say "streams_bench.py exited $?"
    pack_late
    ;;
  loads) loads ;;
  loads-all)
    SKIP_PACK=1 setup
    loads || say "load_bench.py exited $?"
    ;;
  report-all)
    # One call for the README's GPU table: the loads first (about 60 s), then as many split_bench
    # stages as the budget leaves (it skips, and reports, those that would overrun).
    SKIP_PACK=1 setup
    loads "$OUT/loads" || say "load_bench.py exited $?"
    BENCH_STAGES=${BENCH_STAGES:-fleet,llamafleet,single,rpc,membw} bench || say "split_bench.py exited $?"
    ;;
  coordinator-all)
    # Issue 22: where the coordinator runs. The single-GPU baseline, the split with the first share
    # on the coordinator's own GPU, llamafleet with the coordinator on the worker, then (budget
    # permitting) both shares remote by hand and through llamafleet.
    SKIP_PACK=1 setup
    BENCH_STAGES=${BENCH_STAGES:-fleet,single,rpc_one_local,llamafleet_worker,rpc,llamafleet} bench \
      || say "split_bench.py exited $?"
    ;;
  paths-all)
    SKIP_PACK=1 setup
    install_wheels
    left=$((BUDGET - ($(date +%s) - START)))
    say "decode paths (about $left s left)"
    # shellcheck disable=SC2086 # BENCH_PATHS_ARGS is a list of flags
    PYTHONUNBUFFERED=1 python3 bench/gpu/decode_paths.py --llama-cpp "$(cat "$WORK/install-dir")" --model "$MODEL" \
      --out "$OUT" --workdir "$WORK/paths" --deadline-s "$left" ${BENCH_PATHS_ARGS:-} || say "decode_paths.py exited $?"
    ;;
  *) echo "usage: $0 all|setup|bench|streams|streams-all|loads|loads-all|report-all|coordinator-all|paths-all" >&2; exit 2 ;;
esac
say "done"
