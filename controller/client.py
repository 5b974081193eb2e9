"""The operator CLI's HTTP calls to a controller: JSON in, JSON out, errors as one line."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.access import is_inference_path


class ControllerError(LlamafleetError):
    """The controller could not be reached or answered with an error."""


class DoesNotFitError(ControllerError):
    """The controller answered 507: the model fits on no set of ready workers."""

    exit_code = 3


def key_for(path: str) -> str | None:
    """The key to send on `path`: $LLAMAFLEET_ADMIN_KEY on control routes; on the Ollama/OpenAI
    routes $LLAMAFLEET_API_KEY, else the admin key (it opens those too).

    An API key is never sent to a control route: the controller refuses it there (403), while
    with no key at all a controller without admin keys answers its own host (loopback).
    """
    api, admin = os.environ.get("LLAMAFLEET_API_KEY") or None, os.environ.get("LLAMAFLEET_ADMIN_KEY") or None
    return (api or admin) if is_inference_path(path) else admin


def _request(controller: str, method: str, path: str, body: dict[str, Any] | None) -> urllib.request.Request:
    data = json.dumps(body).encode() if body is not None else None
    # JSON on every call: the controller refuses a state-changing control request without it.
    headers = {"Content-Type": "application/json"}
    if key := key_for(path):
        headers["Authorization"] = f"Bearer {key}"
    return urllib.request.Request(controller.rstrip("/") + path, data=data, method=method, headers=headers)


def _error(controller: str, exc: Exception) -> ControllerError:
    if isinstance(exc, urllib.error.HTTPError):
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (json.JSONDecodeError, AttributeError):
            # Not our JSON error shape: fall back to the HTTP reason.
            message = exc.reason
        if isinstance(message, dict):
            message = message.get("message", message)
        return (DoesNotFitError if exc.code == 507 else ControllerError)(str(message))
    reason = getattr(exc, "reason", exc)
    return ControllerError(f"controller at {controller} is unreachable: {reason}")


def call(controller: str, method: str, path: str, body: dict[str, Any] | None = None,
         timeout: float | None = 60) -> Any:
    try:
        with urllib.request.urlopen(_request(controller, method, path, body), timeout=timeout) as reply:
            return json.loads(reply.read())
    except (urllib.error.URLError, OSError) as exc:
        raise _error(controller, exc) from None


def stream_json_lines(controller: str, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """POST and yield each NDJSON line of the answer as it arrives."""
    try:
        with urllib.request.urlopen(_request(controller, "POST", path, body), timeout=None) as reply:
            for line in reply:
                if line.strip():
                    yield json.loads(line)
    except (urllib.error.URLError, OSError) as exc:
        raise _error(controller, exc) from None


def stream_sse(controller: str, path: str) -> Iterator[dict[str, Any]]:
    """GET a server-sent event stream and yield each event's JSON data as it arrives."""
    try:
        with urllib.request.urlopen(_request(controller, "GET", path, None), timeout=None) as reply:
            for line in reply:
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
    except (urllib.error.URLError, OSError) as exc:
        raise _error(controller, exc) from None
