"""32 streaming clients for a minute against the split model: every answer complete, none refused.

The coordinator has 2 slots (`--parallel 2`), so most requests wait in llama-server's queue:
waiting is the expected behaviour, an error is not. TTFT percentiles are printed.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.controller.harness import running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
CLIENTS = 32
SECONDS = float(os.environ.get("LLAMAFLEET_LOAD_SECONDS", "60"))
TOKENS = 8


def one_request(url: str, client: int) -> tuple[float, int, str]:
    """(time to first piece, pieces, problem or "")."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None, parsed
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
    body = {"model": "gemma", "prompt": f"Client {client} says:", "raw": True,
            "options": {"num_predict": TOKENS, "temperature": 0, "seed": client}}
    started = time.perf_counter()
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            return 0.0, 0, f"status {reply.status}: {reply.read()[:200]!r}"
        first, pieces, last = 0.0, 0, {}
        for line in reply:
            last = json.loads(line)
            if "error" in last:
                return 0.0, pieces, f"error line: {last['error']}"
            first = first or time.perf_counter() - started
            pieces += 1
        if not last.get("done") or last.get("eval_count") != TOKENS:
            return first, pieces, f"incomplete: {last}"
        return first, pieces, ""
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        # Counted as a failure of the gateway: the assertion below reports it.
        return 0.0, 0, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def test_32_streaming_clients_for_a_minute_see_no_errors(tmp_path: Path, llama_cpp: Manifest,
                                                         test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=3, controller_args=("--parallel", "2")) as fleet:
        one_request(fleet.url, 0)  # load first: the minute measures serving, not loading
        ttfts: list[float] = []
        problems: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + SECONDS

        def client(n: int) -> None:
            while time.monotonic() < deadline:
                first, _, problem = one_request(fleet.url, n)
                with lock:
                    (problems.append(problem) if problem else ttfts.append(first))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=SECONDS + 300)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert problems == [], problems[:5]
        ttfts.sort()
        p50, p99 = statistics.median(ttfts), ttfts[min(int(len(ttfts) * 0.99), len(ttfts) - 1)]
        print(f"{CLIENTS} clients, {SECONDS:.0f}s: {len(ttfts)} complete answers, 0 errors; "
              f"TTFT p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (2 slots: the rest queue)")
        assert len(ttfts) >= CLIENTS
