"""A generation that outlives its coordinator: what it produced so far, and how a new one goes on.

When an rpc-server or a worker dies, llama.cpp aborts the coordinator and the stream breaks.
The deployment heals (a restart, or a re-placement on the surviving nodes), and the gateway
then asks the new coordinator to continue: the prompt's token ids plus the ids already
generated become the new prompt, with the same sampling settings and the tokens left of the
budget. The client sees one stream that paused.

Token ids, never text: llama-server reports the id of every token it streams (`return_tokens`
on /completion; on /v1/chat/completions the sampled token's id in `logprobs`, with
`post_sampling_probs` so that it costs no pass over the vocabulary), and the prompt is
tokenized by the new coordinator from the same template output, its length checked against
what the first coordinator counted. Re-tokenizing the text the client saw could drift.

llama-server holds back a token's text while it is an incomplete UTF-8 character (and then
sends no event for it) or a possible stop word (an event with no text). So the resume point is
the last event after which the client's text is exactly the text of the ids known: at most a
few tokens before the break. The continuation regenerates from there; the text the client has
already seen is checked against it and skipped, and a continuation that disagrees with it
(possible only with sampling) ends the stream with the error line rather than a garbled answer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.gateway.upstream import Final, completion_pieces, one_answer

# OpenAI request fields that are not sampling settings of the continuation.
OPENAI_NOT_SAMPLING = frozenset({"model", "messages", "prompt", "stream", "stream_options", "n", "logprobs",
                                 "top_logprobs", "max_tokens", "max_completion_tokens", "tools", "tool_choice",
                                 "parallel_tool_calls", "response_format", "echo", "suffix"})
# With any of these the answer is shaped by a grammar, a parser or extra output that a plain
# continuation would not reproduce: such requests are not resumed (the error line, as before).
OPENAI_NOT_RESUMABLE = ("tools", "response_format", "logprobs", "top_logprobs", "echo", "suffix", "logit_bias")


class ResumeFailed(LlamafleetError):
    """The generation cannot be continued consistently on the new coordinator."""


@dataclass
class Progress:
    """What one generation produced, across the coordinators that served it."""

    prompt_tokens: int | None = None  # as the first coordinator counted them (cached ones included)
    prompt_ms: float = 0.0
    ids: list[int] = field(default_factory=list)  # generated ids, in order, while no event was missed
    text: str = ""  # the text of this attempt's events, from the start of the answer
    sent: str = ""  # what the client has been sent
    safe_ids: int = 0  # the resume point: ids[:safe_ids] ...
    safe_text: int = 0  # ... are exactly text[:safe_text]
    base: int = 0  # ids generated before this attempt (its resume point)
    decoded: int = 0  # tokens this attempt has generated (the coordinator's count)
    missed: bool = False  # an event was missed in this attempt: the resume point stays where it was
    plain: bool = True  # only text so far (no reasoning, no tool calls)
    earlier_predicted_ms: float = 0.0
    predicted_ms: float = 0.0
    resumes: int = 0

    def token(self, decoded: int | None, token_id: int | None, content: str) -> str:
        """Record one streamed token; returns the text the client has not been sent yet."""
        if self.missed or decoded is None or token_id is None or decoded != self.decoded + 1:
            self.missed = True
        else:
            self.ids.append(token_id)
        if decoded is not None:
            self.decoded = decoded
        before = len(self.text)
        self.text += content
        if content and not self.missed:
            self.safe_ids, self.safe_text = len(self.ids), len(self.text)
        if before >= len(self.sent):
            self.sent += content
            return content
        # Replaying what the client already has: it must be the same text.
        overlap = min(len(self.text), len(self.sent))
        if self.text[before:overlap] != self.sent[before:overlap]:
            raise ResumeFailed("the continuation differs from the text already sent")
        new = self.text[len(self.sent):]
        self.sent += new
        return new

    def timings(self, timings: dict[str, Any]) -> None:
        if self.prompt_tokens is None and "prompt_n" in timings:
            self.prompt_tokens = int(timings.get("cache_n", 0)) + int(timings["prompt_n"])
            self.prompt_ms = float(timings.get("prompt_ms", 0.0))
        self.predicted_ms = float(timings.get("predicted_ms", self.predicted_ms))

    def begin_resume(self) -> None:
        """The next attempt starts at the resume point."""
        self.resumes += 1
        self.earlier_predicted_ms += self.predicted_ms
        self.predicted_ms = 0.0
        del self.ids[self.safe_ids:]
        self.text = self.text[:self.safe_text]
        self.base, self.decoded, self.missed = self.safe_ids, 0, False

    def final(self, final: Final) -> Final:
        """`final` of the last attempt, with the counts and times of the whole answer."""
        if not self.resumes:
            return final
        return replace(final, prompt_tokens=self.prompt_tokens or final.prompt_tokens, prompt_ms=self.prompt_ms,
                       predicted_tokens=self.base + final.predicted_tokens,
                       predicted_ms=self.earlier_predicted_ms + final.predicted_ms)


@dataclass(frozen=True)
class ResumeSpec:
    """How to rebuild the prompt on a new coordinator, and the continuation's settings."""

    sampling: dict[str, Any]  # llama-server /completion fields, n_predict apart
    n_predict: int  # the whole answer's budget; <= 0: none
    messages: list[dict[str, Any]] | None = None  # a chat: the template is applied by the coordinator
    prompt: str | None = None  # a raw prompt


async def _post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async for doc in one_answer(session, url, body):
        return doc
    raise ResumeFailed(f"{url} answered nothing")


@dataclass(frozen=True)
class Prompt:
    """The prompt of a continuation, as the new coordinator tokenizes it."""

    ids: list[int]
    # A chat's message delimiters, where the coordinator answers them (patch 0005): a completion
    # of the templated prompt then splits it into batches where the chat did.
    message_delimiters: list[Any] | None = None


async def prompt_ids(session: aiohttp.ClientSession, base: str, spec: ResumeSpec) -> Prompt:
    """The prompt as the coordinator tokenizes it for a generation (the template applied for a chat)."""
    text = spec.prompt
    delimiters = None
    if spec.messages is not None:
        templated = await _post_json(session, f"{base}/apply-template", {"messages": spec.messages})
        text = templated.get("prompt")
        if not isinstance(text, str):
            raise ResumeFailed("the coordinator's /apply-template answered no prompt")
        delimiters = templated.get("message_delimiters")
        if not isinstance(delimiters, list):
            delimiters = None  # a stock llama-server: it batches the prompt its own way
    # The flags llama-server itself tokenizes a completion's prompt with.
    doc = await _post_json(session, f"{base}/tokenize", {"content": text, "add_special": True, "parse_special": True})
    tokens = doc.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ResumeFailed("the coordinator's /tokenize answered no token list")
    return Prompt(tokens, delimiters)


def continuation_body(spec: ResumeSpec, prompt: Prompt, generated: list[int], left: int) -> dict[str, Any]:
    """The /completion request that goes on after `generated`.

    For a greedy answer, `n_decode_tail` asks a patched llama-server (patch 0005) to decode the
    generated ids one at a time, as the uninterrupted answer did, and to batch the prompt before
    them as that answer batched its prompt: batched and single-token kernels round differently,
    and at a near-tie greedy decoding would otherwise take the other token. A stock llama-server
    ignores both fields and evaluates everything as one batched prompt (the answer goes on,
    without the guarantee).
    """
    body = spec.sampling | {"prompt": prompt.ids + generated, "n_predict": left, "cache_prompt": False}
    if greedy(spec.sampling):
        # Only where it buys the same answer: decoding the tail costs the time it took to generate
        # it, and a sampled continuation draws afresh anyway.
        body["n_decode_tail"] = len(generated)
    if prompt.message_delimiters is not None:
        body["message_delimiters"] = prompt.message_delimiters
    return body


def greedy(sampling: dict[str, Any]) -> bool:
    """Whether llama-server decodes greedily with these settings (its default temperature is 0.8)."""
    temperature, top_k = sampling.get("temperature", 0.8), sampling.get("top_k", 40)
    return bool((isinstance(temperature, (int, float)) and temperature <= 0)
                or (isinstance(top_k, int) and top_k == 1))


async def continuation(session: aiohttp.ClientSession, base: str, spec: ResumeSpec,
                       progress: Progress) -> AsyncGenerator[str | Final]:
    """Stream the rest of the answer from the coordinator at `base`: text pieces, then one Final."""
    prompt = await prompt_ids(session, base, spec)
    if progress.prompt_tokens is not None and len(prompt.ids) != progress.prompt_tokens:
        raise ResumeFailed(f"the new coordinator counts {len(prompt.ids)} prompt tokens, the first one counted "
                           f"{progress.prompt_tokens}")
    progress.begin_resume()
    left = spec.n_predict - progress.base if spec.n_predict > 0 else -1
    if left == 0:  # everything was generated; only the final counts were lost
        yield Final("length", progress.prompt_tokens or len(prompt.ids), progress.prompt_ms, progress.base,
                    progress.earlier_predicted_ms)
        return
    async for piece in completion_pieces(session, base, continuation_body(spec, prompt, progress.ids, left), progress):
        yield piece
