"""Chat templates: the model's own jinja2 template (from its tokenizer_config.json or
chat_template.jinja, kept in the contract) rendered in jinja2's immutable sandbox, as transformers'
``apply_chat_template`` renders it: the same globals (``raise_exception``, ``strftime_now``), the
same ``tojson`` and the same whitespace options, so a prompt here is the prompt the model was
trained on. A template that fails, or raises on purpose (an unknown role), is a 400 naming the
messages, never a 500."""

from __future__ import annotations

import datetime
import json
from functools import lru_cache
from typing import Any

from services.errors import bad_request

MAX_RENDERED_CHARS = 1_000_000  # a template's output beyond this is refused (a loop in a hostile template)


class TemplateRaised(Exception):
    """``raise_exception`` in a template: the template refuses these messages."""


def _raise(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    from markupsafe import Markup

    return Markup(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                             sort_keys=sort_keys))


@lru_cache(maxsize=32)
def compiled(template: str):
    """A template's compiled form (compiling takes milliseconds; models keep their template)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise bad_request("messages", f"the model's chat template does not compile: {exc}") from None


def render(template: str | None, model: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
           special_tokens: dict[str, str] | None = None, variables: dict[str, Any] | None = None) -> str:
    """The prompt text of ``messages`` (dicts with role and content) by the model's template."""
    from jinja2.exceptions import SecurityError, TemplateError

    if not template:
        raise bad_request("messages", f"model {model!r} has no chat template; use /v1/completions with a prompt")
    reserved = {"messages", "add_generation_prompt"} & set(variables or {})
    if reserved:
        raise bad_request("chat_template_kwargs", f"{sorted(reserved)[0]} is set by the request itself")
    context = {**(special_tokens or {}), **(variables or {}), "messages": messages,
               "add_generation_prompt": add_generation_prompt}
    try:
        text = compiled(template).render(**context)
    except TemplateRaised as exc:
        raise bad_request("messages", f"the chat template refused the messages: {exc}") from None
    except SecurityError as exc:
        raise bad_request("messages", f"the chat template did something its sandbox forbids: {exc}") from None
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise bad_request("messages", f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from None
    if len(text) > MAX_RENDERED_CHARS:
        raise bad_request("messages", f"the rendered chat is {len(text)} characters; the limit is {MAX_RENDERED_CHARS}")
    return text


def message_dicts(messages: list) -> list[dict[str, Any]]:
    """Pydantic chat messages -> the dicts templates read: text parts joined into one string (the
    "string" content format, which every text-only template reads)."""
    out = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        item = {"role": message.role, "content": content if content is not None else ""}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(message, key)
            if value is not None:
                item[key] = value
        out.append(item)
    return out
