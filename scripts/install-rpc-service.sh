#!/usr/bin/env bash
# install-rpc-service.sh: install (or remove) the llamafleet agent on a worker as a systemd unit.
#
# Usage: install-rpc-service.sh [OPTIONS]
#
# What it does, in order (each step skipped when already done; --dry-run prints them all):
#   1. checks: systemd is running, Python >= 3.11, the rpc-server bind address is safe;
#   2. creates a virtual environment and installs llamafleet into it;
#   3. writes the agent config (agent.toml) and either the join token (--join: the agent trades it
#      for a node credential of its own at first start) or a token file (mode 0600);
#   4. builds llama.cpp (--build-llama-cpp) or adopts an install (--llama-cpp), if asked;
#   5. installs llamafleet-agent.service (and the IPAddressAllow drop-in with --controller-ip),
#      enables and starts it, and waits until systemd calls it active (the agent sent READY=1);
#   6. prints how to add this worker to the controller (with --join it has joined by itself).
# Everything it creates is listed in CONFIG_DIR/install-manifest; --uninstall removes exactly that.
#
# Options:
#   --user                        install a systemd --user unit (no root); default: a system unit
#   --prefix DIR                  where the venv goes (default /opt/llamafleet, or
#                                 ~/.local/share/llamafleet with --user)
#   --config-dir DIR              config and token (default /etc/llamafleet, or
#                                 ~/.config/llamafleet with --user)
#   --from SPEC                   what pip installs: a source directory, a wheel, or a requirement
#                                 (default: the checkout this script is in, else "llamafleet")
#   --pip-args "ARGS"             extra pip arguments, e.g. "--no-index --find-links /srv/wheels"
#   --python PY                   interpreter for the venv (default /usr/bin/python3 for a system
#                                 unit, since the service user must be able to read it; else python3)
#   --listen HOST:PORT            the agent's gRPC address (default 127.0.0.1:50051)
#   --rpc-host IPV4               rpc-server bind address (default 127.0.0.1): the worker's private
#                                 address; 0.0.0.0 needs --i-know-rpc-is-unauthenticated
#   --rpc-port N                  rpc-server port (default 50052)
#   --memory-limit SIZE           cap on memory advertised per device, e.g. 20GiB
#   --join URL                    join the controller at URL (http://HOST:PORT) at first start
#   --join-token TOKEN            the join token (`llamafleet token create` on the controller)
#   --join-token-file FILE        the same, read from FILE (keeps it out of the process list)
#   --advertise HOST:PORT         the gRPC address the controller dials (default: --listen)
#   --token-file FILE             without --join: use this node credential instead of generating
#                                 one (a fleet-wide shared token here is deprecated)
#   --llama-cpp DIR               adopt an existing llama.cpp install
#   --build-llama-cpp SOURCE      build llama.cpp: GIT_URL[@REF], a DIR, or TARBALL[:SUBDIR]
#   --no-patches                  with --build-llama-cpp: stock llama.cpp, without llamafleet's patches
#   --controller-ip IPV4          allow traffic only from loopback and this address (drop-in)
#   --watchdog-sec N              the unit's WatchdogSec (default 30)
#   --no-start                    install and enable, but do not start
#   --dry-run                     print every action and change nothing
#   --uninstall                   stop and remove everything this script installed, nothing else
#   --i-know-rpc-is-unauthenticated
#                                 allow a wildcard --rpc-host (rpc-server has NO authentication)
#   -h, --help                    this text
#
# Environment:
#   LLAMAFLEET_PYTHON             default for --python
#   LLAMAFLEET_PIP_ARGS           default for --pip-args
#   SYSTEMCTL                     the systemctl to use (default: systemctl)
#   ACTIVE_TIMEOUT                seconds to wait for the unit to become active (default 180)
set -euo pipefail

UNIT=llamafleet-agent.service
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
SYSTEMCTL=${SYSTEMCTL:-systemctl}
ACTIVE_TIMEOUT=${ACTIVE_TIMEOUT:-180}

mode=system prefix="" config_dir="" from="" pip_args=${LLAMAFLEET_PIP_ARGS:-} python=${LLAMAFLEET_PYTHON:-}
listen=127.0.0.1:50051 rpc_host=127.0.0.1 rpc_port=50052 memory_limit="" token_src="" llama_cpp=""
build_source="" build_flags=() controller_ip="" watchdog_sec=30 start=1 dry_run=0 uninstall=0 allow_wildcard=0
join_url="" join_token="" join_token_src="" advertise=""

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
need_arg() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }

while [ $# -gt 0 ]; do
  case $1 in
    --user) mode=user ;;
    --prefix) need_arg "$@"; prefix=$2; shift ;;
    --config-dir) need_arg "$@"; config_dir=$2; shift ;;
    --from) need_arg "$@"; from=$2; shift ;;
    --pip-args) need_arg "$@"; pip_args=$2; shift ;;
    --python) need_arg "$@"; python=$2; shift ;;
    --listen) need_arg "$@"; listen=$2; shift ;;
    --rpc-host) need_arg "$@"; rpc_host=$2; shift ;;
    --rpc-port) need_arg "$@"; rpc_port=$2; shift ;;
    --memory-limit) need_arg "$@"; memory_limit=$2; shift ;;
    --token-file) need_arg "$@"; token_src=$2; shift ;;
    --join) need_arg "$@"; join_url=$2; shift ;;
    --join-token) need_arg "$@"; join_token=$2; shift ;;
    --join-token-file) need_arg "$@"; join_token_src=$2; shift ;;
    --advertise) need_arg "$@"; advertise=$2; shift ;;
    --llama-cpp) need_arg "$@"; llama_cpp=$2; shift ;;
    --build-llama-cpp) need_arg "$@"; build_source=$2; shift ;;
    --no-patches) build_flags+=(--no-patches) ;;
    --controller-ip) need_arg "$@"; controller_ip=$2; shift ;;
    --watchdog-sec) need_arg "$@"; watchdog_sec=$2; shift ;;
    --no-start) start=0 ;;
    --dry-run) dry_run=1 ;;
    --uninstall) uninstall=1 ;;
    --i-know-rpc-is-unauthenticated) allow_wildcard=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

if [ "$mode" = user ]; then
  prefix=${prefix:-$HOME/.local/share/llamafleet}
  config_dir=${config_dir:-${XDG_CONFIG_HOME:-$HOME/.config}/llamafleet}
  unit_dir=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
  unit_template=$REPO_DIR/systemd/user/$UNIT
  sc=("$SYSTEMCTL" --user)
  python=${python:-python3}
else
  prefix=${prefix:-/opt/llamafleet}
  config_dir=${config_dir:-/etc/llamafleet}
  unit_dir=/etc/systemd/system
  unit_template=$REPO_DIR/systemd/$UNIT
  sc=("$SYSTEMCTL")
  if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=python3; fi
  fi
fi
venv=$prefix/venv
manifest=$config_dir/install-manifest
dropin_dir=$unit_dir/$UNIT.d

say() { printf '==> %s\n' "$*"; }
# Run a command, or only print it under --dry-run.
act() {
  if [ "$dry_run" = 1 ]; then printf '[dry-run] %s\n' "$*"; else "$@"; fi
}
# Remember what this script created, so --uninstall removes it and nothing else:
#   file:PATH  a file;  tree:PATH  a folder that is all ours (the venv, the service's state);
#   dir:PATH   a folder we made that others may use too (removed only when empty).
record() {
  if [ "$dry_run" = 1 ]; then return; fi
  mkdir -p "$config_dir"
  grep -qxF "$1:$2" "$manifest" 2>/dev/null || printf '%s:%s\n' "$1" "$2" >>"$manifest"
}
make_dir() {
  if [ ! -d "$1" ]; then act mkdir -p "$1"; record dir "$1"; fi
}
# Folders systemd makes for the unit (StateDirectory=, CacheDirectory=) are ours if absent now.
record_service_dirs() {
  local base dir
  if [ "$mode" = user ]; then
    for dir in "${XDG_STATE_HOME:-$HOME/.local/state}/llamafleet-agent" "${XDG_CONFIG_HOME:-$HOME/.config}/llamafleet-agent" \
               "${XDG_CACHE_HOME:-$HOME/.cache}/llamafleet-agent"; do
      [ -e "$dir" ] || record tree "$dir"
    done
    return
  fi
  for base in /var/lib /var/cache; do
    [ -e "$base/private" ] || record dir "$base/private"
    for dir in "$base/llamafleet-agent" "$base/private/llamafleet-agent"; do
      [ -e "$dir" ] || [ -L "$dir" ] || record tree "$dir"
    done
  done
}

check_systemd() {
  if [ "$mode" = user ]; then
    "${sc[@]}" show-environment >/dev/null 2>&1 || die "no systemd --user manager is running for $(id -un) (try: loginctl enable-linger $(id -un))"
  else
    [ -d /run/systemd/system ] || die "systemd is not running on this machine (no /run/systemd/system)"
    [ "$(id -u)" = 0 ] || die "a system unit needs root (or use --user)"
  fi
}

check_inputs() {
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$python is not Python 3.11 or newer (pass --python)"
  case $rpc_host in
    0.0.0.0)
      [ "$allow_wildcard" = 1 ] || die "--rpc-host 0.0.0.0 exposes the unauthenticated rpc-server on every interface; give the worker's private address, or pass --i-know-rpc-is-unauthenticated"
      ;;
    *.*.*.*) ;;
    *) die "--rpc-host must be an IPv4 address, not '$rpc_host'" ;;
  esac
  case $rpc_port in ''|*[!0-9]*) die "--rpc-port must be a number" ;; esac
  case $watchdog_sec in ''|*[!0-9]*) die "--watchdog-sec must be a number of seconds" ;; esac
  [ -z "$token_src" ] || [ -r "$token_src" ] || die "cannot read --token-file $token_src"
  if [ -n "$join_url" ]; then
    case $join_url in http://?*|https://?*) ;; *) die "--join must be the controller's http(s):// URL" ;; esac
    [ -z "$token_src" ] || die "--join and --token-file exclude each other: a joining worker gets its credential from the controller"
    [ -n "$join_token" ] || [ -n "$join_token_src" ] || die "--join needs --join-token or --join-token-file"
    [ -z "$join_token_src" ] || [ -r "$join_token_src" ] || die "cannot read --join-token-file $join_token_src"
  elif [ -n "$join_token" ] || [ -n "$join_token_src" ]; then
    die "a join token needs --join URL"
  fi
  [ -z "$llama_cpp" ] || [ -d "$llama_cpp" ] || die "--llama-cpp $llama_cpp is not a directory"
  [ -z "$llama_cpp" ] || [ -z "$build_source" ] || die "--llama-cpp and --build-llama-cpp exclude each other"
  [ -f "$unit_template" ] || die "unit template $unit_template is missing"
  if [ -z "$from" ]; then
    if [ -f "$REPO_DIR/pyproject.toml" ]; then from=$REPO_DIR; else from=llamafleet; fi
  fi
}

install_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    make_dir "$prefix"
    say "creating $venv"
    act "$python" -m venv "$venv"
    record tree "$venv"
  fi
  say "installing llamafleet from $from"
  # shellcheck disable=SC2086 # pip_args is a list of words on purpose
  act "$venv/bin/python" -m pip install -q --disable-pip-version-check $pip_args "$from"
}

write_join_token() {
  local file=$config_dir/join-token
  say "writing $file (mode 0600)"
  if [ "$dry_run" = 1 ]; then
    act "write the join token into $file"
  elif [ -n "$join_token_src" ]; then
    install -m 0600 "$join_token_src" "$file"
  else
    (umask 077 && printf '%s\n' "$join_token" >"$file")
  fi
  record file "$file"
}

write_config() {
  make_dir "$config_dir"
  local token=$config_dir/agent.token config=$config_dir/agent.toml
  if [ -n "$join_url" ]; then
    write_join_token
  elif [ ! -f "$token" ]; then
    say "writing $token (mode 0600)"
    if [ -n "$token_src" ]; then
      act install -m 0600 "$token_src" "$token"
    elif [ "$dry_run" = 1 ]; then
      act "generate a random token into $token"
    else
      (umask 077 && "$python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$token")
    fi
    record file "$token"
  fi
  say "writing $config"
  if [ "$dry_run" = 1 ]; then
    act "write $config (listen=$listen rpc_host=$rpc_host rpc_port=$rpc_port)"
  else
    {
      echo "# Written by install-rpc-service.sh; see agent.example.toml for every key."
      echo "listen = \"$listen\""
      echo "rpc_host = \"$rpc_host\""
      echo "rpc_port = $rpc_port"
      [ "$allow_wildcard" = 1 ] && echo "rpc_allow_wildcard = true"
      [ -n "$memory_limit" ] && echo "memory_limit = \"$memory_limit\""
      [ -n "$llama_cpp" ] && echo "llama_cpp = \"$llama_cpp\""
      [ -n "$join_url" ] && echo "join = \"$join_url\""
      [ -n "$advertise" ] && echo "advertise = \"$advertise\""
      true
    } >"$config"
  fi
  record file "$config"
}

build_llama_cpp() {
  [ -n "$build_source" ] || return 0
  say "building llama.cpp from $build_source (minutes; the unit's state directory keeps it)"
  if [ "$mode" = user ]; then
    act "$venv/bin/llamafleet-agent" build --source "$build_source" "${build_flags[@]}" \
      --state-dir "${XDG_STATE_HOME:-$HOME/.local/state}/llamafleet-agent"
  else
    # Build as the service will run: same state directory, a transient user of its own.
    act systemd-run --quiet --wait --pipe --collect -p DynamicUser=yes -p StateDirectory=llamafleet-agent \
      -p CacheDirectory=llamafleet-agent -p Environment=CCACHE_DIR=/var/cache/llamafleet-agent/ccache \
      "$venv/bin/llamafleet-agent" build --source "$build_source" "${build_flags[@]}" \
      --state-dir /var/lib/llamafleet-agent
  fi
}

install_unit() {
  make_dir "$unit_dir"
  local unit=$unit_dir/$UNIT
  say "installing $unit"
  if [ "$dry_run" = 1 ]; then
    act "write $unit from $unit_template (WatchdogSec=$watchdog_sec)"
  else
    sed -e "s|@BIN@|$venv/bin|g" -e "s|@CONF@|$config_dir|g" -e "s|^WatchdogSec=.*|WatchdogSec=$watchdog_sec|" \
      "$unit_template" >"$unit"
  fi
  record file "$unit"
  if [ -n "$controller_ip" ]; then
    make_dir "$dropin_dir"
    if [ "$dry_run" = 1 ]; then
      act "write $dropin_dir/ipaddressallow.conf (IPAddressAllow=localhost $controller_ip)"
    else
      sed "s|@CONTROLLER_IP@|$controller_ip|" "$REPO_DIR/systemd/llamafleet-agent-ipaddressallow.conf" \
        >"$dropin_dir/ipaddressallow.conf"
    fi
    record file "$dropin_dir/ipaddressallow.conf"
  fi
  if [ -n "$join_url" ]; then
    make_dir "$dropin_dir"
    if [ "$dry_run" = 1 ]; then
      act "write $dropin_dir/join.conf (the join token as the unit's credential)"
    elif [ "$mode" = user ]; then
      # A user manager passes no credentials: the agent reads the 0600 file itself.
      grep -v '^LoadCredential=' "$REPO_DIR/systemd/llamafleet-agent-join.conf" \
        | sed -e "s|@BIN@|$venv/bin|g" -e "s|@CONF@|$config_dir|g" -e "s|%d/join-token|$config_dir/join-token|" \
        >"$dropin_dir/join.conf"
    else
      sed -e "s|@BIN@|$venv/bin|g" -e "s|@CONF@|$config_dir|g" "$REPO_DIR/systemd/llamafleet-agent-join.conf" \
        >"$dropin_dir/join.conf"
    fi
    record file "$dropin_dir/join.conf"
  fi
  act "${sc[@]}" daemon-reload
  act "${sc[@]}" enable --quiet "$UNIT"
}

start_and_wait() {
  [ "$start" = 1 ] || return 0
  say "starting $UNIT and waiting for READY=1"
  act "${sc[@]}" restart --no-block "$UNIT"
  [ "$dry_run" = 0 ] || return 0
  local waited=0 state
  while :; do
    state=$("${sc[@]}" is-active "$UNIT" || true)
    case $state in
      active) break ;;
      failed) "${sc[@]}" status --no-pager "$UNIT" >&2 || true; die "$UNIT failed to start" ;;
    esac
    [ "$waited" -lt $((ACTIVE_TIMEOUT * 5)) ] || die "$UNIT is still '$state' after ${ACTIVE_TIMEOUT}s"
    sleep 0.2
    waited=$((waited + 1))
  done
  say "$UNIT is active: $("${sc[@]}" show -p StatusText --value "$UNIT")"
}

print_next_steps() {
  local host=${listen%:*}
  if [ -n "$join_url" ]; then
    cat <<EOF

Worker installed; it joins the controller at $join_url by itself (its join token is spent then,
and the node credential it gets is kept in the service's state directory). On the controller:
  llamafleet nodes
Check it here with:
  ${sc[*]} status $UNIT
  journalctl $([ "$mode" = user ] && echo "--user ")-u $UNIT
EOF
    return
  fi
  cat <<EOF

Worker installed. Copy its credential to the controller (it is this worker's alone), and there:
  llamafleet node add $host:${listen##*:} --credential-file COPY_OF_$config_dir/agent.token
(Or install with --join URL --join-token TOKEN and the worker adds itself.)
Check it here with:
  ${sc[*]} status $UNIT
  journalctl $([ "$mode" = user ] && echo "--user ")-u $UNIT
EOF
}

do_uninstall() {
  [ -f "$manifest" ] || die "nothing to uninstall: $manifest does not exist"
  say "stopping and disabling $UNIT"
  act "${sc[@]}" disable --now --quiet "$UNIT" || true
  # Files and our own trees first, then the folders we made, deepest first, if now empty.
  local kind path
  while IFS=: read -r kind path; do
    case $kind in
      file) act rm -f -- "$path" ;;
      tree) act rm -rf -- "$path" ;;
    esac
  done <"$manifest"
  grep '^dir:' "$manifest" | cut -d: -f2- | sort -r | while IFS= read -r path; do
    [ "$path" = "$config_dir" ] && continue
    if [ -d "$path" ] && [ -z "$(ls -A "$path")" ]; then act rmdir -- "$path"; fi
  done
  local made_config_dir=0
  grep -qxF "dir:$config_dir" "$manifest" && made_config_dir=1
  act rm -f -- "$manifest"
  if [ "$made_config_dir" = 1 ] && [ -d "$config_dir" ] && [ -z "$(ls -A "$config_dir")" ]; then
    act rmdir -- "$config_dir"
  fi
  act "${sc[@]}" daemon-reload
  act "${sc[@]}" reset-failed "$UNIT" 2>/dev/null || true
  say "removed"
}

check_systemd
if [ "$uninstall" = 1 ]; then
  do_uninstall
  exit 0
fi
check_inputs
[ -f "$manifest" ] || { make_dir "$config_dir"; record_service_dirs; }
install_venv
write_config
build_llama_cpp
install_unit
start_and_wait
print_next_steps
