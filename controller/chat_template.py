"""What a model's chat template does: the built-in one a template-less GGUF gets, and what it can.

A GGUF without `tokenizer.chat_template` makes llama-server fall back to ChatML, which models
of other families answer with junk (`<|im_end|>` and made-up turns). For families whose
template llama.cpp knows by name, the coordinator is started with that one instead.

Capabilities are read from the template text the way Ollama reads its own templates: a
template that names `tools` renders them (llama-server's jinja engine then parses the model's
calls), one that names a thinking switch or `<think>` tags separates reasoning.
"""

from __future__ import annotations

import re

from llamafleet.controller.gguf import GGUFHeader

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
# GGUF architecture → llama.cpp's built-in template of that family (`llama-server --help` lists
# them). Only families with one template: `llama` GGUFs are Llama 2, Llama 3 or Mistral, and
# `qwen2`'s template is ChatML already, so those keep llama-server's default.
BUILTIN_TEMPLATES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "phi3": "phi3",
    "command-r": "command-r", "cohere2": "command-r",
    "granite": "granite", "granitemoe": "granite",
    "exaone": "exaone3", "exaone4": "exaone4",
    "llama4": "llama4",
    "gpt-oss": "gpt-oss",
    "rwkv6": "rwkv-world", "rwkv7": "rwkv-world",
    "minicpm": "minicpm",
    "orion": "orion",
}
_TOOLS = re.compile(r"\btools\b")
_THINKING = re.compile(r"enable_thinking|reasoning_content|reasoning_effort|<think>|\.thinking\b")


def builtin_template(header: GGUFHeader) -> str | None:
    """The built-in template name for a GGUF that carries no template of its own, else None."""
    if header.get(CHAT_TEMPLATE_KEY):
        return None
    return BUILTIN_TEMPLATES.get(header.architecture)


def template_capabilities(template: str) -> list[str]:
    """`tools` and `thinking`, as far as the GGUF's own jinja template handles them.

    A built-in template (the model has none) is applied without jinja, which takes no tools.
    """
    found = []
    if _TOOLS.search(template):
        found.append("tools")
    if _THINKING.search(template):
        found.append("thinking")
    return found
