"""Is a resumed answer at temperature 0 the uninterrupted one, token for token? (issue 17). Run by hand.

A resumed coordinator is sent prompt + the tokens already generated as its prompt. Stock
llama-server evaluates all of it as one batched prompt, while the uninterrupted answer decoded
those tokens one at a time; the CPU backend computes a batch with other kernels (tiled flash
attention, tiled K-quant matmul), the logits differ in their last bits, and at a near-tie greedy
decoding takes the other token. Patch 0005 (patches/llama.cpp) lets the request mark that tail
(`n_decode_tail`): it is decoded one token at a time, and the prompt before it is batched as the
uninterrupted answer batched its prompt.

One ggml-rpc-server and one llama-server over it (as a fleet's coordinator: every layer on the RPC
device), gemma-3-270m, short story prompts (whose greedy continuations have near-ties, unlike the
counting prompts of the `faults` tests), raw `/completion` and chat (`/v1/chat/completions`, whose
prompt llama-server splits at the user message for a model with sliding-window attention). For
each prompt, one uninterrupted answer; then, for every `--step`-th position, the answer resumed
there through the gateway's own code (gateway/resume.py: `prompt_ids`, `continuation_body`), and
compared with the uninterrupted rest. Arms, side by side:
- `batched`: the continuation without `n_decode_tail` (what stock llama-server does);
- `tail-decoded`: with it (patch 0005);
- `stock`: the request of `tail-decoded` sent to a stock build (`--stock DIR`), which ignores it.

    .venv/bin/python bench/resume_exactness.py [--prompts 8] [--tokens 40] [--step 2] [--stock DIR] [--json]

Needs LLAMAFLEET_TEST_LLAMA_CPP (a build with patch 0005) and LLAMAFLEET_TEST_MODEL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamafleet.common.llamacpp.install import Manifest, read_manifest  # noqa: E402
from llamafleet.common.llamacpp.probe import free_loopback_port  # noqa: E402
from llamafleet.controller.gateway.resume import (  # noqa: E402
    Progress,
    ResumeSpec,
    continuation_body,
    prompt_ids,
)
from llamafleet.controller.gateway.upstream import chat_pieces, completion_pieces  # noqa: E402

STORIES = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The robot opened its eyes for the first time and saw",
    "It was a cold winter night when the stranger knocked on the door of the inn. He",
    "My grandmother always told me that the forest behind our house",
    "The spaceship landed softly on the red sand, and the captain",
    "Nobody in the town knew where the little dog had come from, but every morning it",
    "The last train of the evening was almost empty, except for a woman who",
    "When the king heard the news, he called his three daughters and said",
    "Deep under the mountain, the dwarves had been digging for a hundred years until",
    "The scientist looked at the results again and could not believe that",
    "On the first day of school, Mia found a strange letter in her desk. It said",
    "The storm had passed, and the children ran down to the beach to see what",
]
# Long enough that prompt + tail is at least 64 tokens, where the CPU backend's flash attention
# takes its tiled kernel (GGML_FA_TILE_Q); shorter batches differ from one token less often.
PREAMBLE = ("What follows is a short story for children, written for a collection of bedtime stories. "
            "Each story in the collection has a beginning, a middle and an end, the characters have names, "
            "and something surprising happens before the end. The stories are told simply, in the past tense. ")
SAMPLING = {"temperature": 0, "seed": 3}


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            return bool(reply.status == 200)
    except OSError:  # not listening yet, or 503 while the model loads
        return False


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {what} within {timeout_s:g} s")
        time.sleep(0.3)


@contextmanager
def coordinator(manifest: Manifest, model: Path, log_dir: Path, rpc_threads: int) -> Iterator[str]:
    """A ggml-rpc-server and a llama-server with every layer on it; yields llama-server's URL."""
    rpc_port, port = free_loopback_port(), free_loopback_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "rpc.log").open("wb") as rpc_log, (log_dir / "server.log").open("wb") as server_log:
        rpc = subprocess.Popen([manifest.rpc_server, "-H", "127.0.0.1", "-p", str(rpc_port), "-t", str(rpc_threads)],
                               stdout=rpc_log, stderr=subprocess.STDOUT)
        wait_until(lambda: _accepts(rpc_port), 30, "the rpc-server's port")
        server = subprocess.Popen([manifest.llama_server, "--model", str(model), "--rpc", f"127.0.0.1:{rpc_port}",
                                   "--device", "RPC0", "--n-gpu-layers", "99", "--ctx-size", "2048",
                                   "--parallel", "1", "--fit", "off", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-webui"], stdout=server_log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: server.poll() is None and _healthy(url), 120,
                       f"llama-server (see {log_dir / 'server.log'})")
            yield url
        finally:
            server.terminate()
            server.wait()
            rpc.terminate()
            rpc.wait()


async def uninterrupted(session: aiohttp.ClientSession, url: str, spec: ResumeSpec) -> tuple[int, list[int]]:
    """The prompt's token count and the answer's ids, evaluated afresh (no cached prefix)."""
    progress = Progress()
    if spec.messages is not None:
        body = {"messages": spec.messages, **spec.sampling, "max_tokens": spec.n_predict, "cache_prompt": False}
        pieces = chat_pieces(session, url, body, progress)
    else:
        body = {"prompt": spec.prompt, **spec.sampling, "n_predict": spec.n_predict, "cache_prompt": False}
        pieces = completion_pieces(session, url, body, progress)
    async for _ in pieces:
        pass
    assert progress.prompt_tokens is not None and not progress.missed, "a token's id was not reported"
    return progress.prompt_tokens, progress.ids


async def resumed(session: aiohttp.ClientSession, url: str, spec: ResumeSpec, generated: list[int],
                  tail_decoded: bool, n_predict: int) -> list[int]:
    """The `n_predict` ids that a continuation after `generated` produces (the gateway's request)."""
    prompt = await prompt_ids(session, url, spec)
    body = continuation_body(spec, prompt, generated, n_predict)
    if not tail_decoded:
        body.pop("n_decode_tail", None)
        body.pop("message_delimiters", None)
    progress = Progress(ids=list(generated), safe_ids=len(generated), base=len(generated))
    async for _ in completion_pieces(session, url, body, progress):
        pass
    return progress.ids[len(generated):]


async def measure(url: str, specs: list[tuple[str, ResumeSpec]], step: int, tail_decoded: bool,
                  reference: dict[str, list[int]] | None, horizon: int = 0) -> dict[str, Any]:
    """Resume every spec at every `step`-th position; count the continuations that differ from
    the uninterrupted answer (over its whole rest, or its next `horizon` tokens)."""
    tried = differ = 0
    where: list[str] = []
    answers: dict[str, list[int]] = {}
    # As the controller does (daemon.py): llama-server closes connections that aiohttp would reuse.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        for name, spec in specs:
            _, whole = await uninterrupted(session, url, spec)
            answers[name] = whole
            if reference is not None and reference[name] != whole:
                where.append(f"{name}: the uninterrupted answer differs from the first build's")
            for at in range(1, len(whole) - 1, step):
                expected = whole[at:at + horizon] if horizon else whole[at:]
                rest = await resumed(session, url, spec, whole[:at], tail_decoded, len(expected))
                tried += 1
                if rest != expected:
                    differ += 1
                    first = next((i for i, (a, b) in enumerate(zip(rest, whole[at:], strict=False)) if a != b),
                                 min(len(rest), len(expected)))
                    where.append(f"{name}: resumed after {at} tokens, differs {first} tokens later")
    return {"resumes": tried, "differ": differ, "where": where, "answers": answers}


def story_specs(i: int, story: str, tokens: int) -> list[tuple[str, ResumeSpec]]:
    """One raw prompt and one chat, each continuing `story`."""
    return [(f"raw{i}", ResumeSpec(SAMPLING, tokens, prompt=PREAMBLE + story)),
            (f"chat{i}", ResumeSpec(SAMPLING, tokens, messages=[
                {"role": "user", "content": f"{PREAMBLE}Go on with this story: {story}"}]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="story prompts (raw and chat each)")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per answer")
    parser.add_argument("--step", type=int, default=2, help="resume after every STEP-th token")
    parser.add_argument("--stock", type=Path, help="a stock build's install dir: also run the `stock` arm")
    parser.add_argument("--rpc-threads", type=int, default=1,
                        help="the rpc-server's threads (more than the free cores makes ggml's spinning threads crawl)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    manifest = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"]))
    model = Path(os.environ["LLAMAFLEET_TEST_MODEL"])
    if "0005-server-decode-generated-prompt-tail.patch" not in manifest.patch_names:
        raise SystemExit(f"{manifest.install_dir} lacks patch 0005: the `tail-decoded` arm would measure nothing")
    specs: list[tuple[str, ResumeSpec]] = []
    for i, story in enumerate(STORIES[:args.prompts]):
        specs += story_specs(i, story, args.tokens)
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="resume-exactness-"))
    print(f"logs: {logs}", file=sys.stderr)
    if True:
        with coordinator(manifest, model, logs / "patched", args.rpc_threads) as url:
            results["batched"] = asyncio.run(measure(url, specs, args.step, False, None))
            results["tail-decoded"] = asyncio.run(measure(url, specs, args.step, True, results["batched"]["answers"]))
        if args.stock is not None:
            with coordinator(read_manifest(args.stock), model, logs / "stock", args.rpc_threads) as url:
                results["stock"] = asyncio.run(measure(url, specs, args.step, True, results["batched"]["answers"]))
    for result in results.values():
        del result["answers"]
    summary = {"prompts": len(specs), "tokens": args.tokens, "step": args.step, "build": manifest.key,
               "seconds": round(time.monotonic() - started, 1), "arms": results}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{len(specs)} answers of {args.tokens} tokens (raw and chat), resumed after every {args.step} tokens; "
          f"{summary['seconds']} s")
    print(f"{'arm':<14}{'resumes':>9}{'differ':>8}{'share':>8}")
    for arm, result in results.items():
        share = result["differ"] / result["resumes"] if result["resumes"] else 0.0
        print(f"{arm:<14}{result['resumes']:>9}{result['differ']:>8}{share:>8.1%}")
    for arm, result in results.items():
        for line in result["where"][:12]:
            print(f"  {arm}: {line}")


if __name__ == "__main__":
    main()
