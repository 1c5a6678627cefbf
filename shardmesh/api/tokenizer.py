"""The gateway's tokenizer: a model's ``tokenizer.json`` and chat template, without transformers.

transformers' tokenizers cost a gateway torch (importing them imports it), yet what a
gateway asks of one is small: render a chat (``chat_template.py``), encode text, decode
ids, and name a few tokens. :class:`Tokenizer` does exactly that over the ``tokenizers``
library that transformers itself wraps, and :func:`load_tokenizer` builds it from a
model's small files as ``AutoTokenizer.from_pretrained`` builds its generic
``TokenizersBackend``: the same pipeline from ``tokenizer.json``, the same special and
added tokens from ``tokenizer_config.json`` (or, in older folders, from
``special_tokens_map.json``, ``added_tokens.json`` and ``tokenizer.json``), the same chat
templates (``chat_template.jinja``, ``additional_chat_templates/``, or the config's
``chat_template``). Its answers are checked against transformers', token for token, in
``tests/test_tokenizer.py``.

Some model types have a tokenizer class of their own in transformers, which rebuilds
the pipeline from the same vocabulary (meant to give what ``tokenizer.json`` gives);
folders with no ``tokenizer.json``, with remote tokenizer code, or asking for
transformers' Mistral regex fix are left to transformers (:func:`load_tokenizer`
returns None).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from .chat_template import control_token_patterns, mark_control_tokens, normalize_messages, render, template_literal_text

__all__ = ["Tokenizer", "load_tokenizer"]

# The named special tokens every tokenizer may have, in transformers' order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """A ``tokenizers`` pipeline with its special tokens and chat templates.

    The backend is only read after construction (``encode_special_tokens`` is set once
    here), so encoding on a worker thread while the event loop decodes is safe.
    """

    def __init__(
        self,
        backend: Backend,
        special: dict[str, str],
        chat_template: str | dict[str, str] | None = None,
        *,
        chat_control_tokens: list[str] | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._backend = backend
        self.special_tokens_map = special  # {"bos_token": "<s>", ...}: also template variables
        self.chat_template = chat_template
        self.chat_control_tokens = chat_control_tokens
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    # ---- the vocabulary

    @property
    def backend_tokenizer(self) -> Backend:
        return self._backend

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._backend.get_added_tokens_decoder()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: i for i, token in sorted(self.added_tokens_decoder.items())}

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, token: str) -> int | None:
        found = self._backend.token_to_id(token)
        return found if found is not None else self.unk_token_id

    def _token_id(self, name: str) -> int | None:
        # Loading adds every named special token to the vocabulary, so each has an id.
        token = self.special_tokens_map.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id("unk_token")

    # ---- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``tokenizer(text)["input_ids"]``, as with transformers."""
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode([ids] if isinstance(ids, int) else list(ids), skip_special_tokens=skip_special_tokens)
        # transformers' clean-up of spaces before punctuation, never for BPE (it would
        # remove spaces the text really has); off unless the config asks for it.
        if self.clean_up_tokenization_spaces and type(self._backend.model).__name__ != "BPE":
            for spaced, tight in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(spaced, tight)
        return text

    def _encode_plain(self, text: str) -> list[int]:
        """``text`` through normalizer, pre-tokenizer and model only: no added token matched."""
        if self._backend.normalizer is not None:
            text = self._backend.normalizer.normalize_str(text)
        pieces = [text]
        if self._backend.pre_tokenizer is not None:
            pieces = [piece for piece, _ in self._backend.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for piece in pieces for token in self._backend.model.tokenize(piece)]

    # ---- chats

    def get_chat_template(self, tools: list[dict] | None = None) -> str:
        """The template to render with (a tool-use one when tools are given and it exists)."""
        template = self.chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(f"This model has several chat templates and no default: {sorted(template)}.")
        if template is None:
            raise ValueError("This model's tokenizer has no chat template.")
        return template

    def apply_chat_template(
        self,
        conversation: list[dict],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        sanitize_control_tokens: bool = False,
        return_dict: bool = True,
        **variables: Any,
    ) -> str | list[int] | dict[str, list[int]]:
        """Render ``conversation`` and (``tokenize``) encode it without adding special
        tokens (the template writes them). ``sanitize_control_tokens``: control tokens
        found in the messages, tools, documents or ``variables`` are encoded as text.
        Extra ``variables`` are passed to the template."""
        source = self.get_chat_template(tools)
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        messages = normalize_messages(conversation)
        if sanitize_control_tokens:
            if not tokenize:
                raise ValueError("`sanitize_control_tokens=True` requires `tokenize=True`.")
            any_token, _ = control_token_patterns(self._control_tokens(source))
            messages, tools, documents, variables = (mark_control_tokens(x, any_token) for x in (messages, tools, documents, variables))
        chat = render(
            source,
            messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            variables={**self.special_tokens_map, **variables},
        )
        if not tokenize:
            return chat
        ids = self._encode_marked(chat) if sanitize_control_tokens else self.encode(chat, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids

    def _control_tokens(self, source: str) -> tuple[str, ...]:
        """Tokens a user may not type into a chat: the special tokens, plus the added
        tokens named in ``chat_control_tokens`` or, without that list, those the
        template itself writes (except whitespace tokens, which templates write as text)."""
        added = self.added_tokens_decoder.values()
        if self.chat_control_tokens is not None:
            named = set(self.chat_control_tokens)
            return tuple(t.content for t in added if t.special or t.content in named)
        literal = template_literal_text(source)
        return tuple(t.content for t in added if t.special or (t.content in literal and not t.content.isspace()))

    def _encode_marked(self, chat: str) -> list[int]:
        """Encode a chat rendered from marked input: a marked token as plain text, the rest
        (the template's own control tokens included) as usual.

        A lone marker (a template string method can split a pair) is dropped but still
        separates the text around it, so the two sides cannot join into a control token.
        Each piece is encoded after a newline that is then removed again, so that a
        SentencePiece tokenizer adds no prefix space inside the chat.
        """
        _, marked = control_token_patterns(tuple(self.added_tokens_encoder))
        pieces = marked.split(chat)  # [text, marked token or None, text, ...]
        newline = self.encode("\n", add_special_tokens=False)
        ids = self.encode(pieces[0], add_special_tokens=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            encode = self._encode_plain if as_text else (lambda s: self.encode(s, add_special_tokens=False))
            piece_ids = encode("\n" + piece)
            piece_ids = piece_ids[len(newline):] if piece_ids[: len(newline)] == newline else encode(piece)
            if as_text and self.convert_tokens_to_ids(piece) in piece_ids:
                raise ValueError(f"Can't sanitize {piece!r}: the tokenizer produces it from plain text")
            ids += piece_ids
        return ids


# --------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _added_token(value: Any, **override: Any) -> Any:
    """A serialized AddedToken (a dict, with or without ``__type``) as one; others as they are."""
    if isinstance(value, dict) and "content" in value:
        fields = {k: v for k, v in value.items() if k != "__type"}
        return AddedToken(**{**fields, **override})
    return value


def _chat_templates(folder: Path, config: dict) -> str | dict[str, str] | None:
    """Template files win over the config's entry; several templates make a dict by name."""
    templates: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return template


def _added_tokens(folder: Path, config: dict) -> dict[int, AddedToken]:
    """The added tokens the config lists; older folders: special_tokens_map.json's named
    tokens (merged into ``config``), added_tokens.json and tokenizer.json's list."""
    if "added_tokens_decoder" in config:
        return {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
    for key, value in (_read_json(folder / "special_tokens_map.json") or {}).items():
        if key == "extra_special_tokens" and isinstance(value, list):
            merged = list(config.get("extra_special_tokens") or [])
            merged += [t for t in (_added_token(v, special=True) for v in value) if t not in merged]
            config[key] = merged
        else:
            config[key] = _added_token(value, special=True)
    decoder: dict[int, AddedToken] = {}
    named = {str(config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k)} | {str(t) for t in config.get("extra_special_tokens") or []}
    for content, i in (_read_json(folder / "added_tokens.json") or {}).items():
        special = content in named
        decoder[i] = AddedToken(content, rstrip=False, lstrip=False, normalized=not special, special=special)
    for token in (_read_json(folder / "tokenizer.json") or {}).get("added_tokens", []):
        fields = dict(token)
        i = fields.pop("id")
        decoder[i] = AddedToken(**fields)
    return decoder


def load_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer of the model in ``folder``, or None where transformers must build it
    (see the module docstring)."""
    config = _read_json(folder / "tokenizer_config.json") or {}
    if not (folder / "tokenizer.json").is_file() or "auto_map" in config or config.get("fix_mistral_regex"):
        return None
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    # transformers encodes without truncation or padding unless asked, whatever the file says.
    backend.no_truncation()
    backend.no_padding()
    # "additional_special_tokens" is the older name of "extra_special_tokens".
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    decoder = _added_tokens(folder, config)
    if "additional_special_tokens" in config and "extra_special_tokens" not in config:  # from special_tokens_map.json
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    by_content = {str(t): t for t in decoder.values()}

    # Named special tokens: the standard names, then model-specific ones ("image_token",
    # or the names of a dict of extra special tokens).
    named: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_NAMES:
        value = _added_token(config.get(key))
        if isinstance(value, (str, AddedToken)):
            named[key] = by_content.get(str(value), value)
    extra = config.get("extra_special_tokens")
    for key, value in [*config.items(), *(extra.items() if isinstance(extra, dict) else ())]:
        value = _added_token(value)
        if key not in SPECIAL_TOKEN_NAMES and key.endswith("_token") and isinstance(value, (str, AddedToken)):
            named[key] = value
    extras = [_added_token(t) for t in extra] if isinstance(extra, list) else []

    # As transformers does: re-add every listed added token, then any special token the
    # vocabulary lacks (as a new special token, at the end of the vocabulary).
    to_add: list[Any] = [token for _, token in sorted(decoder.items())]
    known = [t.content for t in backend.get_added_tokens_decoder().values()] + [str(t) for t in to_add]
    for value in [*named.values(), *extras]:
        if str(value) not in known and value not in to_add:
            to_add.append(value)
    named_strings = {str(v) for v in named.values()}
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in named_strings:
            token.special = True
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)
    if backend.post_processor is None:  # transformers writes an explicit no-op one
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return Tokenizer(
        backend,
        {key: str(value) for key, value in named.items()},
        _chat_templates(folder, config),
        chat_control_tokens=config.get("chat_control_tokens"),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
    )
