"""Which template a GGUF is served with, and what its template can do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamafleet.controller.chat_template import builtin_template, template_capabilities
from llamafleet.controller.gguf import GGUFHeader


def header(**metadata: Any) -> GGUFHeader:
    return GGUFHeader(Path("/m.gguf"), 3, metadata, [], 0, 0)


@pytest.mark.parametrize(("architecture", "name"), [("gemma3", "gemma"), ("gemma2", "gemma"), ("phi3", "phi3"),
                                                    ("llama", None), ("qwen2", None), ("", None)])
def test_a_gguf_without_a_template_gets_its_familys_builtin(architecture: str, name: str | None) -> None:
    assert builtin_template(header(**{"general.architecture": architecture})) == name


def test_a_gguf_template_is_kept() -> None:
    assert builtin_template(header(**{"general.architecture": "gemma3", "tokenizer.chat_template": "{{ x }}"})) is None


def test_capabilities_come_from_what_the_template_renders() -> None:
    assert template_capabilities("") == []
    assert template_capabilities("{% for m in messages %}{{ m.content }}{% endfor %}") == []
    assert template_capabilities("{% if tools %}{{ tools | tojson }}{% endif %}") == ["tools"]
    qwen3 = ("{% if tools %}..{% endif %}"
             "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>{% endif %}")
    assert template_capabilities(qwen3) == ["tools", "thinking"]
    assert template_capabilities("{{ message.reasoning_content }}") == ["thinking"]
