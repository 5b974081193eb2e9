"""What a broken answer keeps (gateway/resume.py) and what llama-server's stream may not carry
(gateway/upstream.py). The kills themselves are tests/integration/faults/test_resume.py's."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from llamafleet.controller.gateway.resume import Progress, Prompt, ResumeFailed, ResumeSpec, continuation_body
from llamafleet.controller.gateway.upstream import UpstreamGarbage, UpstreamUnavailable, one_answer, sse_events


def test_the_resume_point_is_the_last_event_whose_text_matches_its_ids() -> None:
    progress = Progress()
    assert progress.token(1, 10, "Hello") == "Hello"
    assert progress.token(2, 11, "") == ""  # held back (a possible stop word): not safe yet
    assert (progress.safe_ids, progress.safe_text) == (1, 5)
    assert progress.token(3, 12, " wo") == " wo"  # the held text came with this one
    assert (progress.safe_ids, progress.safe_text) == (3, 8)
    assert progress.token(5, 14, "rld") == "rld"  # token 4 sent no event (half a UTF-8 character)
    assert progress.missed and (progress.safe_ids, progress.safe_text) == (3, 8)
    progress.begin_resume()
    assert progress.ids == [10, 11, 12] and progress.text == "Hello wo" and progress.sent == "Hello world"
    # The continuation regenerates "rld": checked against what was sent, then only new text goes out.
    assert progress.token(1, 13, "r") == ""
    assert progress.token(2, 14, "ld!") == "!"
    assert progress.ids == [10, 11, 12, 13, 14] and progress.base + progress.decoded == 5


def test_the_continuation_marks_the_generated_ids_as_a_tail_to_decode_one_at_a_time() -> None:
    spec = ResumeSpec({"temperature": 0, "seed": 3}, 96, messages=[{"role": "user", "content": "hi"}])
    delimiters = [{"role": "user", "delimiter": "<start_of_turn>user"}]
    body = continuation_body(spec, Prompt([2, 5, 7], delimiters), [11, 12], 94)
    assert body == {"temperature": 0, "seed": 3, "prompt": [2, 5, 7, 11, 12], "n_predict": 94,
                    "cache_prompt": False, "n_decode_tail": 2, "message_delimiters": delimiters}
    # A stock coordinator answers no delimiters: none are sent (it ignores n_decode_tail).
    assert "message_delimiters" not in continuation_body(spec, Prompt([2, 5, 7]), [11], 95)
    # A sampled continuation draws afresh anyway: its tail is not worth decoding token by token.
    sampled = ResumeSpec({"temperature": 0.7}, 96, prompt="Once")
    assert "n_decode_tail" not in continuation_body(sampled, Prompt([2, 5]), [11], 95)
    assert "n_decode_tail" not in continuation_body(ResumeSpec({}, 96, prompt="Once"), Prompt([2, 5]), [11], 95)
    assert continuation_body(ResumeSpec({"top_k": 1}, 96, prompt="Once"), Prompt([2, 5]), [11], 95)["n_decode_tail"] == 1


def test_a_continuation_that_differs_from_the_text_sent_is_refused() -> None:
    progress = Progress()
    progress.token(1, 1, "a")
    progress.token(3, 3, "bc")  # one event missed: resume from "a"
    progress.begin_resume()
    with pytest.raises(ResumeFailed):
        progress.token(1, 2, "X")


def _serve(lines: list[bytes]) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        await response.write_eof()
        return response
    app = web.Application()
    app.router.add_post("/s", handler)
    return app


@pytest.mark.parametrize(("lines", "error"), [
    ([b'data: {"a": 1}\n\n', b"data: {not json\n\n"], UpstreamGarbage),
    ([b"data: [1, 2]\n\n"], UpstreamGarbage),
    ([b'data: {"a": 1}\n\n'], UpstreamUnavailable),  # cut before [DONE]: never a finished answer
])
def test_garbage_or_a_cut_stream_from_llama_server_is_an_error(lines: list[bytes], error: type) -> None:
    async def run() -> None:
        runner = web.AppRunner(_serve(lines))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(error):
                    async for _ in sse_events(session, f"http://127.0.0.1:{port}/s", {}):
                        pass
        finally:
            await runner.cleanup()
    asyncio.run(run())


def test_a_one_json_answer_that_is_not_json_is_garbage_not_a_traceback() -> None:
    async def run() -> None:
        runner = web.AppRunner(_serve([b"<html>oops</html>"]))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as session:
                with pytest.raises(UpstreamGarbage):
                    async for _ in one_answer(session, f"http://127.0.0.1:{port}/s", {}):
                        pass
        finally:
            await runner.cleanup()
    asyncio.run(run())
