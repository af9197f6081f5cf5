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
