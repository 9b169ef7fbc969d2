"""Chat templates: a conversation rendered as the text a model reads, by the tokenizer's own Jinja
template (`chat_template` in tokenizer_config.json, chat_template.jinja or chat_template.json) or, for a
tokenizer without one, mlxllm's plain template; and that text cut into the parts a loss counts (the
assistant turns) and the parts it does not.

Templates come from other people's models, so they are rendered in Jinja's ImmutableSandboxedEnvironment,
with the settings and helpers transformers gives them (trim_blocks, lstrip_blocks, loop controls,
`tojson`, `raise_exception`, `strftime_now`) and no loader: a template cannot call Python, reach
attributes the sandbox forbids, or read a file. Anything a template does wrong is an MlxllmError.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mlxllm.errors import MlxllmError

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# mlxllm's own template, for tokenizers that came with none (mlxllm's BPE and byte tokenizers): each
# message as a `<|role|>` line and its content on the lines after, the generation prompt `<|assistant|>`.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# The special tokens transformers hands a template by name (its special_tokens_map).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class Part:
    """A piece of a record's rendered text, and whether the loss counts its tokens."""

    text: str
    counted: bool


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _template_text(value: Any) -> str | None:
    """chat_template as a string, or the one named "default" of a list of named templates."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def read_settings(directory: Path) -> dict[str, str]:
    """The chat template of the Hugging Face tokenizer in directory and the special tokens it may name
    ({} when it has no template): from tokenizer_config.json, else chat_template.jinja or
    chat_template.json, where transformers 4.43+ writes it."""

    def read_json(name: str) -> dict[str, Any]:
        try:
            d = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    config = read_json("tokenizer_config.json")
    template = _template_text(config.get("chat_template"))
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if template is None:
        template = _template_text(read_json("chat_template.json").get("chat_template"))
    if template is None:
        return {}
    own = config.get("mlxllm_chat_tokens")  # as HFTokenizer.save keeps them
    tokens = {name: _token_text((own if isinstance(own, dict) else config).get(name)) for name in SPECIAL_TOKENS}
    return {"chat_template": template, **{k: v for k, v in tokens.items() if v is not None}}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: Jinja's own escapes HTML characters, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (its marks of assistant text), rendered as
    its body: mlxllm finds the assistant turns by their prefixes, so a template using it still reads."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class ChatTemplate:
    """A Jinja chat template compiled in the sandbox, with the special tokens it is rendered with."""

    def __init__(self, source: str, tokens: dict[str, str] | None = None, origin: str = "mlxllm's plain template"):
        """source: the Jinja text; tokens: special tokens by name (bos_token, ...); origin: where the
        template came from, for messages."""
        self.source, self.tokens, self.origin = source, dict(tokens or {}), origin
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self.compiled = env.from_string(source)
        except jinja2.TemplateError as e:
            raise MlxllmError(
                f"The chat template of {origin} is not a template mlxllm can read ({type(e).__name__}: {e}). "
                "Fix chat_template in its tokenizer_config.json, or remove it to use mlxllm's plain template."
            ) from None

    @property
    def plain(self) -> bool:
        return self.source == PLAIN_TEMPLATE

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.source, sorted(self.tokens.items())]).encode()).hexdigest()

    def render(
        self, messages: Sequence[dict], *, tools: list | None = None, add_generation_prompt: bool = False
    ) -> str:
        """The conversation's text, as transformers' apply_chat_template(tokenize=False) renders it."""
        try:
            return self.compiled.render(
                messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt, **self.tokens
            )
        except Exception as e:  # noqa: BLE001 - whatever a foreign template raises is the template's problem
            raise MlxllmError(
                f"The chat template of {self.origin} failed on this conversation ({type(e).__name__}: {e}). "
                "Check the record's roles and contents against what the model's template expects; a template "
                "that reaches for Python internals or files is refused by the sandbox."
            ) from None

    def parts(self, messages: Sequence[dict], *, tools: list | None = None, mask: bool = True) -> list[Part]:
        """The rendered conversation in parts: each assistant turn counted (what the template adds
        after the generation prompt, up to the end of that turn), the rest not; with mask False, all
        of it counted. Found by rendering each prefix of the conversation, as mlx-lm finds its prompt."""
        full = self.render(messages, tools=tools)
        if not mask:
            return [Part(full, True)]
        parts, pos = [], 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = self.render(messages[:i], tools=tools, add_generation_prompt=True)
            upto = self.render(messages[: i + 1], tools=tools)
            if not (full.startswith(upto) and upto.startswith(start) and len(start) >= pos):
                raise MlxllmError(
                    f"The chat template of {self.origin} does not render this conversation turn by turn (a "
                    f"conversation up to assistant turn {i + 1} is not the start of the whole one), so its "
                    "assistant turns cannot be told from the prompt. Train with --set train.mask_prompt=false "
                    "(every token counted), or drop the earlier turns from such records."
                )
            parts += [Part(full[pos : len(start)], False), Part(full[len(start) : len(upto)], True)]
            pos = len(upto)
        parts.append(Part(full[pos:], False))
        return [p for p in parts if p.text]


def template_for(tokenizer: object) -> ChatTemplate:
    """The template records are rendered with for this tokenizer: its own (an imported Hugging Face
    tokenizer's chat_template), else mlxllm's plain template."""
    settings = dict(getattr(tokenizer, "chat", None) or {})
    source = settings.pop("chat_template", None)
    if source is None:
        return ChatTemplate(PLAIN_TEMPLATE)
    return ChatTemplate(source, settings, origin="the model's tokenizer")
