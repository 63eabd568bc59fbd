"""Render chat messages with the model's Jinja chat template, as transformers does.

The environment matches transformers' apply_chat_template: a sandboxed, immutable Jinja
environment with trim_blocks/lstrip_blocks, the `raise_exception` and `strftime_now`
globals, a `tojson` filter that keeps non-ASCII text, loop controls and a pass-through
`{% generation %}` block. A GGUF without `tokenizer.chat_template` gets ChatML.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moestream.kernels.errors import MoestreamError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names: templates are untrusted input and must
    not reach Python internals through attributes they set (transformers does the same)."""

    def __init__(*args: Any, **kwargs: Any):
        self, values = args[0], dict(*args[1:], **kwargs)
        for name in values:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set the underscore attribute {name!r} on a namespace")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=8)
def _compile(template: str | None) -> jinja2.Template:
    if not template:
        log.warning("the GGUF has no tokenizer.chat_template; formatting chats as ChatML")
        template = CHATML_TEMPLATE
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise MoestreamError(f"the model's chat template does not parse: {e}") from e


def check_chat_template(template: str | None) -> None:
    """Raise a MoestreamError now if the template does not parse, rather than in every chat
    request (a corrupt file, or a template that is not Jinja). None or empty is ChatML."""
    if template:
        _compile(template)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """The prompt text for `messages`; `template` None or empty means ChatML.

    `extra` reaches the template as variables (e.g. tools, documents, enable_thinking);
    tools and documents are None unless given, as in transformers.
    """
    variables = {"tools": None, "documents": None, **extra}
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **variables,
        )
    except jinja2.TemplateError as e:
        raise MoestreamError(f"chat template error: {e}") from e
    except MoestreamError:
        raise
    except Exception as e:  # the template is code from the file: its bugs are its own errors
        raise MoestreamError(f"chat template error: {type(e).__name__}: {e}") from e
