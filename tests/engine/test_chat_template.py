"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from moestream.engine.chat_template import render_chat
from moestream.kernels.errors import MoestreamError

BOS, EOS = "<s>", "</s>"

# Qwen1.5-MoE-A2.7B-Chat (ChatML with a default system prompt).
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# OLMoE-Instruct / Tulu style, written over several indented lines so that trim_blocks and
# lstrip_blocks decide the whitespace.
OLMOE_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {{ '<|system|>\\n' + message['content'] + '\\n' }}
    {% elif message['role'] == 'user' %}
        {{ '<|user|>\\n' + message['content'] + '\\n' }}
    {% elif message['role'] == 'assistant' %}
        {% if not loop.last %}
            {{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}
        {% else %}
            {{ '<|assistant|>\\n' + message['content'] + eos_token }}
        {% endif %}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
        {{ '<|assistant|>\\n' }}
    {% endif %}
{% endfor %}"""

# Mixtral-8x7B-Instruct-v0.1.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# Helpers transformers provides to templates: dates, JSON without ASCII escapes, the
# {% generation %} block, tools=None by default, namespace(), loop controls.
HELPERS_TEMPLATE = (
    "{{ strftime_now('%Y-%m-%d') }}|{{ messages | tojson }}|"
    "{% generation %}{{ messages[-1]['content'] }}{% endgeneration %}|"
    "{% if tools is not none %}tools{% else %}no tools{% endif %}|"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
    "{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
)

USER_ONLY = [{"role": "user", "content": "Hello there!"}]
MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3, en français ? Ça va"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}, *MULTI_TURN]


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    """A transformers tokenizer only for apply_chat_template (its vocabulary is irrelevant)."""
    vocab = {"<unk>": 0, BOS: 1, EOS: 2}
    return PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token=BOS, eos_token=EOS, unk_token="<unk>")


def _transformers(hf_tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template,messages", [
    (QWEN_TEMPLATE, USER_ONLY), (QWEN_TEMPLATE, WITH_SYSTEM), (QWEN_TEMPLATE, MULTI_TURN),
    (OLMOE_TEMPLATE, USER_ONLY), (OLMOE_TEMPLATE, WITH_SYSTEM), (OLMOE_TEMPLATE, MULTI_TURN),
    (MIXTRAL_TEMPLATE, USER_ONLY), (MIXTRAL_TEMPLATE, MULTI_TURN),
    (HELPERS_TEMPLATE, MULTI_TURN),
], ids=["qwen-user", "qwen-system", "qwen-multi", "olmoe-user", "olmoe-system", "olmoe-multi",
        "mixtral-user", "mixtral-multi", "helpers"])
def test_render_matches_transformers(hf_tokenizer, template, messages, add_generation_prompt):
    ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=BOS, eos_token=EOS)
    assert ours == _transformers(hf_tokenizer, template, messages, add_generation_prompt)


@pytest.mark.parametrize("messages,message", [
    ([USER_ONLY[0], {"role": "tool", "content": "42"}], "Only user and assistant roles are supported!"),
    (WITH_SYSTEM, "Conversation roles must alternate"),
])
def test_raise_exception_becomes_moestream_error(hf_tokenizer, messages, message):
    with pytest.raises(jinja2.TemplateError, match=message):
        _transformers(hf_tokenizer, MIXTRAL_TEMPLATE, messages, True)
    with pytest.raises(MoestreamError, match=message):
        render_chat(MIXTRAL_TEMPLATE, messages, bos_token=BOS, eos_token=EOS)


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{{ m['content'] }",  # does not parse
    "{{ ''.__class__.__mro__ }}",  # reaches for Python internals: the sandbox refuses
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{% for m in messages %}{{ '<|im_start|>' * m['role'] }}{% endfor %}",  # TypeError inside it
])
def test_bad_templates_are_moestream_errors(template):
    with pytest.raises(MoestreamError):
        render_chat(template, USER_ONLY)


def test_missing_template_falls_back_to_chatml():
    text = render_chat(None, MULTI_TURN[:2] + [{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat("", USER_ONLY, add_generation_prompt=False) == \
        "<|im_start|>user\nHello there!<|im_end|>\n"
