"""No request outlives its client, and nothing starts once the controller is stopping.

Real clients (raw sockets) queue behind a busy slot of a real coordinator (`--parallel 1`) and
hang up: they leave the queue at once, and llama-server never evaluates their prompts (its log
counts the tasks it launched). Then the controller is told to stop while requests for a model
not loaded keep coming: none of them starts a coordinator.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
BUSY_TOKENS = 160  # long enough to queue behind and hang up, on 2 cores
LAUNCHED = re.compile(r"launch_slot_")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("orphans"), llama_cpp, test_model, agents=1, memory_limit="2GiB",
                       model_names=("gemma", "gemma-copy"), controller_args=("--parallel", "1")) as fleet:
        yield fleet


def ps(fleet: Fleet) -> list[dict[str, Any]]:
    # The API itself rather than the CLI: a CLI process costs most of a second on 2 busy cores.
    with urllib.request.urlopen(f"{fleet.url}/llamafleet/v1/ps", timeout=5) as reply:
        docs: list[dict[str, Any]] = json.loads(reply.read())
    return docs


def launched_tasks(fleet: Fleet) -> int:
    [model] = [m for m in ps(fleet) if m["model"].startswith("gemma") and m["log"]]
    return len(LAUNCHED.findall(Path(model["log"]).read_text(errors="replace")))


def ask_and_wait(fleet: Fleet, body: dict[str, Any]) -> socket.socket:
    """A raw client: it sends its request and waits; closing it is the hang-up."""
    parsed = urllib.parse.urlsplit(fleet.url)
    assert parsed.hostname is not None and parsed.port is not None
    conn = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
    raw = json.dumps(body).encode()
    conn.sendall(b"POST /api/generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (parsed.netloc.encode(), len(raw), raw))
    return conn


def test_clients_that_hang_up_while_queued_leave_the_queue_and_cost_the_coordinator_nothing(fleet: Fleet) -> None:
    body = {"model": "gemma", "prompt": "Once upon a time", "raw": True,
            "options": {"temperature": 0, "num_predict": BUSY_TOKENS}}
    short = body | {"options": {"temperature": 0, "num_predict": 2}, "stream": False}
    urllib.request.urlopen(urllib.request.Request(f"{fleet.url}/api/generate", json.dumps(short).encode()),
                           timeout=120).read()  # loaded: what follows waits for the slot, not a start
    before = launched_tasks(fleet)

    parsed = urllib.parse.urlsplit(fleet.url)
    busy = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=120)
    busy.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    reply = busy.getresponse()
    lines = iter(reply)
    next(lines)  # the busy request holds the one slot now
    answered: list[bytes] = []
    reading = threading.Thread(target=lambda: answered.extend(lines), daemon=True)
    reading.start()

    waiting = [ask_and_wait(fleet, body) for _ in range(3)]
    wait_for(lambda: ps(fleet)[0]["queued"] == 3, 10, "three requests queued behind the busy slot")
    for conn in waiting:
        conn.close()
    hung_up = time.monotonic()
    wait_for(lambda: ps(fleet)[0]["queued"] == 0, 5, "the queue empty once its clients hung up", interval_s=0.1)
    print(f"queue empty {time.monotonic() - hung_up:.2f} s after the hang-ups")
    assert reading.is_alive(), "the busy answer ended before the test could tell the queue emptied early"

    reading.join(120)
    busy.close()
    assert json.loads(answered[-1])["done"], answered[-1]
    time.sleep(1.0)  # a turn handed to a gone client would launch a task now
    [model] = [m for m in ps(fleet) if m["model"].startswith("gemma") and m["log"]]
    assert model["in_flight"] == 0 and model["queued"] == 0, model
    assert launched_tasks(fleet) - before == 1, "llama-server worked on a request whose client had gone"


def test_once_the_controller_is_stopping_nothing_starts_a_coordinator(fleet: Fleet) -> None:
    # Last in this module: it stops the module's controller.
    assert not any(m["model"].startswith("gemma-copy") for m in ps(fleet))
    statuses: list[str] = []
    stop = threading.Event()

    def keep_asking() -> None:
        body = json.dumps({"model": "gemma-copy", "prompt": "Hi", "raw": True, "stream": False,
                           "options": {"num_predict": 1}}).encode()
        while not stop.is_set():
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{fleet.url}/api/generate", body),
                                            timeout=30) as done:
                    statuses.append(f"{done.status}")
            except urllib.error.HTTPError as exc:
                statuses.append(f"{exc.code} {json.loads(exc.read()).get('error')}")
            except OSError:
                statuses.append("refused")  # the listener is closed: the controller is gone
            time.sleep(0.01)

    askers = [threading.Thread(target=keep_asking, daemon=True) for _ in range(2)]
    assert fleet.controller is not None
    fleet.controller.send_signal(signal.SIGTERM)
    for asker in askers:
        asker.start()
    fleet.controller.wait(30)
    stop.set()
    for asker in askers:
        asker.join(30)
    print(f"while stopping: {sorted(set(statuses))}")
    assert all(s == "refused" or s.startswith("503 not loading gemma-copy") for s in statuses), statuses
    assert not list(fleet.state_dir.rglob("*gemma-copy*")), "a coordinator was started while the controller stopped"
