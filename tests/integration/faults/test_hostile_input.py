"""The hostile-input corpus (tests/fixtures/hostile/) against a live controller.

Every case gets its status and a one-line JSON error; afterwards the controller is alive,
answers at once, and has not grown without bound.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port
from tests.fixtures.hostile_gguf import HOSTILE
from tests.integration.controller.harness import Fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
CORPUS = json.loads((Path(__file__).parents[2] / "fixtures" / "hostile" / "requests.json").read_text())["cases"]
BODY_LIMIT = 64 * 1024


def gguf_name(case: str) -> str:
    return "bad-" + "".join(c if c.isalnum() else "-" for c in case)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    """A controller with no agents (so nothing loads) and a models directory full of bad files."""
    tmp = tmp_path_factory.mktemp("hostile")
    models = tmp / "models"
    models.mkdir()
    (models / "gemma.gguf").symlink_to(test_model)
    for case, (content, _) in HOSTILE.items():
        (models / f"{gguf_name(case)}.gguf").write_bytes(content)
    token = tmp / "token"
    token.write_text("unused\n")
    fleet = Fleet(None, f"http://127.0.0.1:{free_loopback_port()}", [], token, tmp / "state", models,
                  tmp / "controller.log", llama_cpp, 0.3, ("--max-request-bytes", str(BODY_LIMIT)))
    fleet.start_controller([])
    try:
        yield fleet
    finally:
        fleet.stop_controller()


def send(url: str, method: str, path: str, data: bytes | None) -> tuple[int, Any]:
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def body_of(case: dict[str, Any]) -> bytes | None:
    if "body" in case:
        return case["body"].encode()
    if "body_b64" in case:
        return base64.b64decode(case["body_b64"])
    if "repeat" in case:
        r = case["repeat"]
        return (r["prefix"] + r["chunk"] * r["times"] + r["suffix"]).encode()
    return json.dumps(case["json"]).encode() if "json" in case else None


def test_the_corpus_has_enough_cases() -> None:
    assert len(CORPUS) + len(HOSTILE) >= 50 and len({c["name"] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_hostile_request_gets_its_status_and_one_line(controller: Fleet, case: dict[str, Any]) -> None:
    status, doc = send(controller.url, case["method"], case["path"], body_of(case))
    error = doc["error"]["message"] if isinstance(doc.get("error"), dict) else doc.get("error")
    assert status == case["status"] and isinstance(error, str) and case["contains"] in error, (status, doc)
    assert "\n" not in error and "Traceback" not in error


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_gguf_is_a_clear_422_for_show_and_generate(controller: Fleet, case: str) -> None:
    _, expected = HOSTILE[case]
    for path, body in (("/api/show", {"model": gguf_name(case)}),
                       ("/api/generate", {"model": gguf_name(case), "prompt": "x"})):
        status, doc = send(controller.url, "POST", path, json.dumps(body).encode())
        assert status == 422 and expected in doc["error"] and "\n" not in doc["error"], (path, doc)


def test_bad_files_do_not_hide_good_ones_from_the_listing(controller: Fleet) -> None:
    status, doc = send(controller.url, "GET", "/api/tags", None)
    assert status == 200 and [m["name"] for m in doc["models"]] == ["gemma:latest"]


@pytest.mark.parametrize(("args", "message"), [
    (["run", "../../etc/passwd", "x"], "invalid model name"),
    (["run", "nothing-here", "x"], "not found"),
    (["run", "gemma", "x", "-o", "n_discard=1"], "unknown option 'n_discard'"),
    (["run", "gemma", "x", "-o", "num_ctx=-1"], "'num_ctx' must be between"),
    (["run", "gemma", "x", "--keep-alive", "later"], "not a duration"),
    (["run", "gemma", "x"], "no nodes are known"),
    (["plan", "a" * 300], "longer than"),
    (["stop", "gemma"], "not loaded"),
])
def test_hostile_cli_input_is_one_line_and_a_nonzero_exit(controller: Fleet, args: list[str], message: str) -> None:
    result = controller.cli(*args, timeout=30)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_controller_survived_the_corpus_without_growing(controller: Fleet) -> None:
    assert controller.controller is not None and controller.controller.poll() is None
    rss_mb = psutil.Process(controller.controller.pid).memory_info().rss / 2**20
    assert rss_mb < 300, rss_mb  # a megabyte body was refused, not held; nothing piled up
    assert send(controller.url, "GET", "/api/version", None)[0] == 200
