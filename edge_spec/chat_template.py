"""Render a GGUF's chat template (Jinja) in jinja2's sandbox."""

from __future__ import annotations

import datetime
from functools import lru_cache

from .types import EdgespecError

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template: str | None, messages: list[dict], bos: str = "", eos: str = "",
           add_generation_prompt: bool = True) -> str:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template or FALLBACK_TEMPLATE).render(
            messages=messages, bos_token=bos, eos_token=eos,
            add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise EdgespecError(f"the model's chat template failed: {e}; use `edgespec generate` for raw prompts") from e


def chat_tokens(backend, messages) -> list[int]:
    """Render messages with the model's chat template and tokenize (special tokens parsed)."""
    facts = backend.facts
    bos = backend.token_text(facts.bos) if facts.bos >= 0 else ""
    eos = backend.token_text(facts.eos) if facts.eos >= 0 else ""
    text = render(facts.chat_template, list(messages), bos=bos, eos=eos)
    add_bos = facts.extra.get("add_bos", False) and not (bos and text.startswith(bos))
    return backend.tokenize(text, add_special=add_bos, parse_special=True)
