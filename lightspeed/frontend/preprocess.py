"""Text -> token ids for the frontend: tokenizer, special tokens and the chat template.

A pure transform: the messages it renders were checked by `validation` first.

Loads only local files (tokenizer.json + tokenizer_config.json of an HF-style folder) with the
`tokenizers` library, and renders chat templates with jinja2 the way HF transformers does, so a
prompt tokenizes to the same ids a user would get from `apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lightspeed.errors import InvalidRequest
from lightspeed.frontend.openai_types import ChatMessage
from lightspeed.frontend.special_text import Masked, SpecialText
from lightspeed.frontend.token_bound import TokenBound
from lightspeed.models.registry import folder_eos_token_ids

log = logging.getLogger(__name__)

_DEFAULT_CONTEXT = 2048


@dataclass(frozen=True, slots=True)
class TokenizerSettings:
    """The parts of tokenizer_config.json that change how text becomes ids."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    model_max_length: int = _DEFAULT_CONTEXT

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], template_file: str | None = None) -> TokenizerSettings:
        max_len = cfg.get("model_max_length")
        # HF writes ~1e30 for "unset"; treat absurd values as unknown.
        if not isinstance(max_len, int) or not 0 < max_len < 1 << 24:
            max_len = _DEFAULT_CONTEXT
        return cls(
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
            unk_token=_token_content(cfg.get("unk_token")),
            pad_token=_token_content(cfg.get("pad_token")),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            add_eos_token=bool(cfg.get("add_eos_token", False)),
            chat_template=template_file or _pick_template(cfg.get("chat_template")),
            model_max_length=max_len,
        )


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: object) -> str | None:
    """HF allows one template or a list of named ones; the unnamed request uses "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


# ---------------------------------------------------------------- chat template environment


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): render the body.

    Templates written for `return_assistant_tokens_mask` use it; without this they fail to compile.
    """

    # jinja2 declares `tags` as a plain annotated attribute, so a ClassVar here clashes for mypy.
    tags: set[str] = {"generation"}  # noqa: RUF012 -- read-only in practice; shape fixed by jinja2

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja2's built-in tojson this does not HTML-escape, matching transformers.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile with the same sandbox, whitespace rules and helpers transformers provides."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# ---------------------------------------------------------------- messages


def normalize_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Validated messages as the dicts chat templates expect: `content` a plain string, and
    tool-call arguments mappings."""
    return [_template_message(message) for message in messages]


def _template_message(message: ChatMessage) -> dict[str, Any]:
    out = message.to_template_dict()
    out["content"] = _content_text(message.content)
    if message.tool_calls:
        out["tool_calls"] = [_parse_arguments(call) for call in message.tool_calls]
    return out


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:  # an assistant turn that only calls tools
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)  # text parts only; joined as vLLM does


def _parse_arguments(call: object) -> object:
    """Templates expect tool-call arguments as a mapping (they `tojson` them); OpenAI sends a
    JSON string, so decode it when it is one."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return call
    if not isinstance(parsed, dict):
        return call
    return {**call, "function": {**call["function"], "arguments": parsed}}


# ---------------------------------------------------------------- the preprocessor


class Preprocessor:
    """Tokenizer + chat template of one model folder. Thread-safe for reads (encode/decode)."""

    def __init__(
        self, tokenizer: Tokenizer, settings: TokenizerSettings, eos_token_ids: list[int], vocab_size: int | None = None
    ) -> None:
        self._tokenizer = tokenizer
        self.settings = settings
        self._eos_token_ids = list(eos_token_ids)
        # The model's embedding rows may outnumber the tokenizer's tokens (padded vocabularies).
        self.vocab_size = max(vocab_size or 0, tokenizer.get_vocab_size(with_added_tokens=True))
        self.bos_token_id = tokenizer.token_to_id(settings.bos_token) if settings.bos_token else None
        self.eos_token_id = tokenizer.token_to_id(settings.eos_token) if settings.eos_token else None
        template = settings.chat_template
        self._template = compile_chat_template(template) if template is not None else None
        self._special_text = SpecialText(tokenizer)
        self.token_bound = TokenBound.of(tokenizer)  # None: prompts of any length get tokenized

    @classmethod
    def from_folder(cls, folder: Path) -> Preprocessor:
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        cfg = _read_json(folder / "tokenizer_config.json")
        template_path = folder / "chat_template.jinja"  # newer HF folders keep it separately
        template = template_path.read_text() if template_path.is_file() else None
        settings = TokenizerSettings.from_dict(cfg, template)
        vocab = _read_json(folder / "config.json").get("vocab_size")
        return cls(tokenizer, settings, folder_eos_token_ids(folder), vocab if isinstance(vocab, int) else None)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS only when add_special_tokens and the config asks for them.

        A tokenizer.json whose post-processor already adds BOS is not given a second one.
        """
        # encode_batch, not encode: only the batch call releases the GIL while the Rust code
        # runs, so a long prompt tokenized in a pool thread does not hold up the event loop.
        ids: list[int] = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if not add_special_tokens:
            return ids
        bos, eos = self.bos_token_id, self.eos_token_id
        if self.settings.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        if self.settings.add_eos_token and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def proves_at_least(self, text: str, limit: int) -> int | None:
        """A count of at least `limit` tokens that `text` provably becomes, from its length; None
        when it may become fewer (or the tokenizer proves no bound)."""
        return self.token_bound.proves_at_least(text, limit) if self.token_bound is not None else None

    def apply_chat_template(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render the conversation to prompt text (special tokens appear as text)."""
        return self.render_chat(messages, add_generation_prompt, tools).text

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatPrompt:
        """The rendered conversation, ready for `encode_chat_prompt`. Special-token strings in
        messages are masked while the template runs (`special_text`), so only the template's
        markup becomes control tokens."""
        normalized = normalize_messages(messages)
        try:
            masked = self._special_text.mask(normalized, tools)
        except RecursionError:  # arguments nested as deep as the JSON decoder allows
            raise InvalidRequest("messages are nested too deeply", param="messages") from None
        if masked is None:
            text = self._render(normalized, add_generation_prompt, tools)
            return ChatPrompt(text)
        masked_text = self._render(masked.messages, add_generation_prompt, masked.tools)
        return ChatPrompt(masked.unmask(masked_text), masked_text, masked)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any) -> str:
        if self._template is None:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        s = self.settings
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=s.bos_token or "",
                eos_token=s.eos_token or "",
                unk_token=s.unk_token or "",
                pad_token=s.pad_token or "",
            )
        except (jinja2.exceptions.TemplateError, TypeError, ValueError) as exc:
            # The template rejects this conversation (e.g. roles must alternate): a client error.
            raise InvalidRequest(f"chat template error: {exc}", param="messages") from exc
        except RecursionError:  # arguments nested as deep as the JSON decoder allows
            raise InvalidRequest("messages are nested too deeply", param="messages") from None

    def encode_chat_prompt(self, prompt: ChatPrompt) -> list[int]:
        # The rendered text already holds BOS etc. as text, so no special tokens are added again.
        if prompt.masked is None:
            return self.encode(prompt.text, add_special_tokens=False)
        assert prompt.masked_text is not None
        return self._special_text.encode(prompt.masked_text, prompt.masked)

    def encode_chat(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        return self.encode_chat_prompt(self.render_chat(messages, add_generation_prompt, tools))


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered conversation: its text, and (when messages held special-token strings) the
    masked rendering that says which control tokens are the template's."""

    text: str
    masked_text: str | None = None
    masked: Masked | None = None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
