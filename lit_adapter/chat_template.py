"""Hugging Face chat templates: a checkpoint's Jinja `chat_template`, rendered as transformers renders it.

transformers (`apply_chat_template`) compiles a template in jinja2's immutable sandbox with `trim_blocks` and
`lstrip_blocks`, the loop-control extension and a `{% generation %}` tag that marks assistant text; the template sees
`raise_exception`, `strftime_now`, a `tojson` filter that keeps non-ASCII text (with `indent`, `separators`,
`sort_keys`), sandbox-safe `dict` and `namespace`, and is rendered with `messages` (keys whose value is None dropped),
`tools`, `documents`, `add_generation_prompt` and the tokenizer's named special tokens (`bos_token`, `eos_token`,
...). The same here, so that a conversation becomes the very text the model was tuned on.

Messages are OpenAI-style: a list of {"role", "content"}, the content a string or a list of {"type": "text",
"text"} parts (what `lit-adapter generate --messages FILE` reads, and later the server).
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lit_adapter.errors import LitAdapterError, first_line
from lit_adapter.files import read_json

Message = dict[str, Any]
Span = tuple[int, int]  # [start, end) character positions in a rendered conversation

# while set, `{% generation %}` blocks are wrapped in these two private-use characters (to find their spans)
_MARK_START, _MARK_END = "\ue000", "\ue001"
_marking: ContextVar[bool] = ContextVar("marking_generation_blocks", default=False)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplate:
    """One compiled template and the special tokens it renders with; `where` names its file in errors,
    `control_tokens` are the tokenizer's added tokens (`<|end|>`, ...), which a reply's span never cuts through."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], where: str,
                 control_tokens: Sequence[str] = ()) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.where = where
        self.control_tokens = tuple(control_tokens)
        self.compiled = self._guard(lambda: compile_template(source))
        self.has_generation_blocks = bool(_GENERATION_TAG.search(source)) and _MARK_START not in source

    @classmethod
    def of_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        """The chat template of a `lit_adapter.tokenizer.Tokenizer` (its default one when it names several)."""
        template, where = tokenizer.chat_template, tokenizer.chat_template_file
        if template is None:
            raise LitAdapterError(
                f"{where.parent}: the tokenizer has no chat template (no 'chat_template' in tokenizer_config.json, no "
                "chat_template.jinja); choose another prompt style (alpaca, alpaca_zh, chat, raw)"
            )
        if isinstance(template, dict):
            if "default" not in template:
                raise LitAdapterError(f"{where}: the named chat templates {sorted(template)} have no 'default'")
            template = template["default"]
        return cls(template, tokenizer.special_tokens, str(where), tokenizer.control_tokens)

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False,
        tools: Optional[list] = None, documents: Optional[list] = None, **variables: Any,
    ) -> str:
        """The conversation as the model's text (as `apply_chat_template(..., tokenize=False)` gives it)."""
        return self._guard(lambda: self.compiled.render(
            **self._context(messages, add_generation_prompt, tools, documents, variables)))

    def render_with_spans(self, messages: Sequence[Message]) -> tuple[str, list[Span]]:
        """The conversation (no generation prompt) and the spans of its `{% generation %}` blocks (none when the
        template has no such tag)."""
        if not self.has_generation_blocks:
            return self.render(messages), []
        token = _marking.set(True)
        try:
            marked = self.render(messages)
        finally:
            _marking.reset(token)
        spans, text, start = [], [], None
        for char in marked:
            if char == _MARK_START:
                start = len(text)
            elif char == _MARK_END and start is not None:
                spans.append((start, len(text)))
                start = None
            else:
                text.append(char)
        return "".join(text), spans

    def _context(self, messages, add_generation_prompt, tools, documents, variables) -> dict[str, Any]:
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        return {**self.special_tokens, **variables, "messages": chat, "tools": tools, "documents": documents,
                "add_generation_prompt": add_generation_prompt}

    def _guard(self, action):
        """Run a compile or render step; a template's own failure becomes one line naming its file."""
        jinja2 = _jinja2()
        try:
            return action()
        except jinja2.TemplateError as err:
            raise LitAdapterError(f"{self.where}: chat template: {first_line(err)}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            raise LitAdapterError(
                f"{self.where}: chat template failed on this conversation ({type(err).__name__}: {first_line(err)})"
            ) from None


def _jinja2():
    try:
        import jinja2
    except ImportError:
        raise LitAdapterError("chat templates need jinja2: pip install 'jinja2>=3.1'") from None
    return jinja2


@lru_cache(maxsize=32)
def compile_template(source: str):
    """The template compiled in the environment transformers uses (cached: a chat renders it every turn)."""
    return _environment().from_string(source)


@lru_cache(maxsize=1)
def _environment():
    jinja2 = _jinja2()
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body; marked while spans are being collected."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            text = caller()
            return f"{_MARK_START}{text}{_MARK_END}" if _marking.get() else text

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, "jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_PlainDict(), namespace=_namespace_class()
    )
    return environment


def _raise_exception(message: str):
    raise _jinja2().TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters (<, >, &, '), which would change what the model reads
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _PlainDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type object itself (no attribute walks)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _namespace_class():
    from jinja2.exceptions import SecurityError
    from jinja2.utils import Namespace

    def check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template cannot store {name!r} on a namespace (underscore names)")

    class SafeNamespace(Namespace):
        """jinja's namespace, refusing underscore attributes (a way towards Python internals)."""

        def __init__(*args, **kwargs):  # Namespace's own signature trick: `namespace(self=...)` still works
            self, rest = args[0], args[1:]
            attributes = dict(*rest, **kwargs)
            for name in attributes:
                check(name)
            Namespace.__init__(self, attributes)

        def __setitem__(self, name, value) -> None:
            check(name)
            Namespace.__setitem__(self, name, value)

    return SafeNamespace


def assistant_spans(template: ChatTemplate, messages: Sequence[Message]) -> tuple[str, list[Span]]:
    """The rendered conversation and the span of each assistant reply in it, for the training loss.

    A template's `{% generation %}` blocks say it outright. Otherwise a reply is what rendering the conversation up
    to it adds to the conversation before it with the assistant header (`add_generation_prompt`), when the template
    renders each prefix of the conversation as a prefix of the whole; for templates that do not (Mistral puts the
    system text in the last user message, Phi-3 ends a finished conversation with EOS), the reply's text is found in
    the rendering and the end-of-turn text both renderings put after it is added. Trailing whitespace stays out:
    generation stops at the end-of-turn token before it.
    """
    text, spans = template.render_with_spans(messages)
    if spans:
        return text, spans
    cursor = 0
    for index, message in enumerate(messages):
        if message.get("role") != "assistant" or not content_text(message.get("content")).strip():
            continue
        start, end = _prefix_span(template, messages, index, text, cursor) or _found_span(
            template, messages, index, text, cursor)
        end = start + len(text[start:end].rstrip())
        spans.append((start, end))
        cursor = end
    return text, spans


def _prefix_span(template: ChatTemplate, messages: Sequence[Message], index: int, text: str,
                 cursor: int) -> Optional[Span]:
    try:
        before = template.render(messages[:index], add_generation_prompt=True)
    except LitAdapterError:  # e.g. a template that refuses a conversation ending where this one would be cut
        return None
    upto = template.render(messages[: index + 1])
    if len(before) >= cursor and upto.startswith(before) and text.startswith(upto):
        return len(before), len(upto)
    return None


def _found_span(template: ChatTemplate, messages: Sequence[Message], index: int, text: str, cursor: int) -> Span:
    content = content_text(messages[index].get("content")).strip()
    start = text.find(content, cursor)
    if start < 0:
        raise LitAdapterError(
            f"{template.where}: assistant message {index} does not appear in the rendered conversation (the chat "
            "template changes it), so its loss cannot be placed"
        )
    end = start + len(content)
    start -= _leading_space(template, messages, index, text[:start])
    upto = template.render(messages[: index + 1])
    closing = upto[upto.rfind(content) + len(content):] if content in upto else ""
    shared = 0
    while shared < len(closing) and end + shared < len(text) and closing[shared] == text[end + shared]:
        shared += 1
    return start, _outside_tokens(text, end + shared, template.control_tokens)


def _leading_space(template: ChatTemplate, messages: Sequence[Message], index: int, before: str) -> int:
    """How much of the whitespace right before a reply the model writes itself (Mistral's " " after [/INST]): all
    of it but what the generation prompt already ends with (Phi-3's newline after <|assistant|>)."""
    space = before[len(before.rstrip()):]
    if not space:
        return 0
    try:
        prompt = template.render(messages[:index], add_generation_prompt=True)
    except LitAdapterError:
        prompt = ""
    given = prompt[len(prompt.rstrip()):]  # the prompt's own trailing whitespace comes first in the run
    return len(space) - len(given) if space.startswith(given) else len(space)


def _outside_tokens(text: str, position: int, tokens: Sequence[str]) -> int:
    """`position`, moved back to the start of a control token it would cut in two (`<|end|>\n<|` -> `<|end|>\n`)."""
    moved = True
    while moved:
        moved = False
        for token in tokens:
            for start in range(max(0, position - len(token) + 1), position):
                if text.startswith(token, start):
                    position, moved = start, True
                    break
    return position


# ---- OpenAI-style messages ----


def check_messages(value: Any) -> list[Message]:
    """A conversation checked to be a non-empty list of {"role", "content"} objects (content text, or a list of
    text parts; an assistant message may carry tool_calls instead); raises LitAdapterError naming the message."""
    if not isinstance(value, list) or not value:
        raise LitAdapterError('expected a non-empty JSON list of messages {"role": ..., "content": ...}')
    for index, message in enumerate(value):
        label = f"message {index}"
        if not isinstance(message, dict):
            raise LitAdapterError(f'{label} must be an object {{"role": ..., "content": ...}}, not '
                                  f"{type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise LitAdapterError(f"{label}: 'role' must be a non-empty string (system, user, assistant, ...)")
        check_content(message.get("content"), f"{label}.content", optional="tool_calls" in message)
    return [dict(message) for message in value]


def check_content(content: Any, label: str, optional: bool = False) -> None:
    if content is None and optional:
        return
    if isinstance(content, str):
        _check_text(content, label)
        return
    if not isinstance(content, list):
        raise LitAdapterError(f"{label} must be a string or a list of text parts, not {type(content).__name__}")
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise LitAdapterError(f'{label}[{index}] must be a text part {{"type": "text", "text": ...}} (only '
                                  "text is supported in messages)")
        _check_text(part["text"], f"{label}[{index}].text")


def _check_text(text: str, label: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LitAdapterError(f"{label} is not valid UTF-8 (character {err.start})") from None


def content_text(content: Any) -> str:
    """A message's content as one string (text parts joined)."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def read_messages(path: Path) -> list[Message]:
    """An OpenAI-style conversation from a JSON file: a list of messages, or an object with a "messages" list."""
    data = read_json(path, "messages file")
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    try:
        return check_messages(data)
    except LitAdapterError as err:
        raise LitAdapterError(f"{path}: {err}") from None
