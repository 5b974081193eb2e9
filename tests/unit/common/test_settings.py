from __future__ import annotations

from pathlib import Path

import pytest

from llamafleet.agent.settings import AgentSettings
from llamafleet.common.errors import UsageError
from llamafleet.common.settings import load_settings
from llamafleet.common.units import format_size, parse_size
from llamafleet.controller.settings import ControllerSettings


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('rpc_port = 6000\nrpc_threads = 3\nlisten = "127.0.0.1:7000"\nmemory_limit = "1GiB"\n')
    env = {"LLAMAFLEET_RPC_THREADS": "5", "LLAMAFLEET_LISTEN": "127.0.0.1:7001"}
    settings = load_settings(AgentSettings, flags={"listen": "127.0.0.1:7002", "rpc_port": None},
                             config_file=config, environ=env)
    assert settings.listen == "127.0.0.1:7002"  # flag beats env and file
    assert settings.rpc_threads == 5  # env beats file
    assert settings.rpc_port == 6000  # file beats default
    assert settings.memory_limit == 2**30
    assert settings.rpc_host == "127.0.0.1"  # default


def test_settings_are_frozen() -> None:
    settings = load_settings(AgentSettings, flags={}, environ={})
    with pytest.raises(AttributeError):
        settings.rpc_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("rpc_prot = 1\n", {}, "unknown key 'rpc_prot'"),
        ("rpc_port = 'abc'\n", {}, "invalid rpc_port from config file"),
        ("", {"LLAMAFLEET_RPC_CACHE": "maybe"}, "invalid rpc_cache from LLAMAFLEET_RPC_CACHE"),
        ("rpc_port = true\n", {}, "not an integer"),
        ("devices = [1, 2]\n", {}, "not a list of strings"),
        ("not toml at all", {}, "is not valid TOML"),
    ],
)
def test_bad_values_name_their_origin(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(UsageError, match=message):
        load_settings(AgentSettings, flags={}, config_file=config, environ=env)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        load_settings(AgentSettings, flags={}, config_file=tmp_path / "nope.toml", environ={})


def test_wildcard_rpc_host_needs_the_explicit_flag() -> None:
    with pytest.raises(UsageError, match="exposes the unauthenticated rpc-server"):
        load_settings(AgentSettings, flags={"rpc_host": "0.0.0.0"}, environ={})
    allowed = load_settings(AgentSettings, flags={"rpc_host": "0.0.0.0", "rpc_allow_wildcard": True}, environ={})
    assert allowed.rpc_host == "0.0.0.0"


def test_devices_from_a_comma_list_or_array(tmp_path: Path) -> None:
    assert load_settings(AgentSettings, flags={"devices": "CUDA0, CUDA1"}, environ={}).devices == ("CUDA0", "CUDA1")
    config = tmp_path / "c.toml"
    config.write_text('devices = ["CUDA1"]\n')
    assert load_settings(AgentSettings, flags={}, config_file=config, environ={}).devices == ("CUDA1",)


@pytest.mark.parametrize(("text", "value"), [("120MiB", 120 * 2**20), ("20GiB", 20 * 2**30), ("1.5GB", 1_500_000_000),
                                             ("4096", 4096), ("2 gib", 2 * 2**30)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "1XB"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(UsageError, match="not a size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(1536 * 2**20) == "1.5 GiB" and format_size(12) == "12 B"


def test_the_example_config_is_valid_and_says_the_defaults() -> None:
    example = Path(__file__).resolve().parents[3] / "agent" / "agent.example.toml"
    from_file = load_settings(AgentSettings, flags={}, config_file=example, environ={})
    assert from_file == load_settings(AgentSettings, flags={}, environ={})


def test_the_controller_example_config_is_valid_and_says_the_defaults() -> None:
    from llamafleet.controller.settings import ControllerSettings

    example = Path(__file__).resolve().parents[3] / "controller" / "controller.example.toml"
    from_file = load_settings(ControllerSettings, flags={}, config_file=example, environ={})
    assert from_file == load_settings(ControllerSettings, flags={}, environ={})


def test_the_rpc_cache_cap_from_a_flag_the_environment_or_the_file(tmp_path: Path) -> None:
    assert load_settings(AgentSettings, flags={}, environ={}).rpc_cache_max is None  # auto: half the filesystem
    assert load_settings(AgentSettings, flags={"rpc_cache_max": "50GiB"}, environ={}).rpc_cache_max == 50 * 2**30
    for no_cap in ("0", "none", "unlimited"):
        assert load_settings(AgentSettings, flags={}, environ={"LLAMAFLEET_RPC_CACHE_MAX": no_cap}).rpc_cache_max == 0
    config = tmp_path / "c.toml"
    config.write_text('rpc_cache_max = "auto"\nrpc_cache_check_s = 60\n')
    from_file = load_settings(AgentSettings, flags={}, config_file=config, environ={})
    assert from_file.rpc_cache_max is None and from_file.rpc_cache_check_s == 60
    config.write_text("rpc_cache_max = 1000\n")
    assert load_settings(AgentSettings, flags={}, config_file=config, environ={}).rpc_cache_max == 1000


@pytest.mark.parametrize(("flags", "message"), [
    ({"rpc_cache_max": "lots"}, "invalid rpc_cache_max from --rpc-cache-max: not a size"),
    ({"rpc_cache_max": "-5GiB"}, "invalid rpc_cache_max from --rpc-cache-max: not a size"),
    ({"rpc_cache_check_s": "0"}, "rpc_cache_check_s must be > 0"),
])
def test_a_bad_rpc_cache_setting_is_one_line(flags: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_settings(AgentSettings, flags=flags, environ={})


def test_the_pull_rate_limit_is_a_size_from_any_source_and_not_below_a_mebibyte(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('pull_rate_limit = "50MiB"\n')
    assert load_settings(ControllerSettings, flags={}, config_file=config, environ={}).pull_rate_limit == 50 * 2**20
    from_env = load_settings(ControllerSettings, flags={}, environ={"LLAMAFLEET_PULL_RATE_LIMIT": "2MB"})
    assert from_env.pull_rate_limit == 2_000_000
    with pytest.raises(UsageError, match="at least 1MiB"):
        load_settings(ControllerSettings, flags={"pull_rate_limit": "10KiB"}, environ={})


def test_ollama_origins_is_read_as_ollama_reads_it_unless_llamafleet_origins_or_the_flag_says(tmp_path: Path) -> None:
    ollama = {"OLLAMA_ORIGINS": "https://chat.example.com, http://*.lan:*"}
    assert load_settings(ControllerSettings, flags={}, environ=ollama).origins == (
        "https://chat.example.com", "http://*.lan:*")
    config = tmp_path / "controller.toml"
    config.write_text('origins = ["https://from-the-file.example"]\n')
    # An environment variable still: above the file, below LLAMAFLEET_ORIGINS and --origins.
    assert load_settings(ControllerSettings, flags={}, config_file=config, environ=ollama).origins == (
        "https://chat.example.com", "http://*.lan:*")
    assert load_settings(ControllerSettings, flags={}, config_file=config, environ={}).origins == (
        "https://from-the-file.example",)
    both = ollama | {"LLAMAFLEET_ORIGINS": "https://ours.example"}
    assert load_settings(ControllerSettings, flags={}, environ=both).origins == ("https://ours.example",)
    assert load_settings(ControllerSettings, flags={"origins": "https://flag.example"}, environ=both).origins == (
        "https://flag.example",)
