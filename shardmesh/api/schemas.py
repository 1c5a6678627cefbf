"""OpenAI's requests: the schemas of the two endpoints, checked and turned into work.

This module knows what a body sent to ``/v1/chat/completions`` or ``/v1/completions``
may hold and nothing about HTTP servers. It validates a parsed JSON body into a request
model and, once ``prompts.py`` has tokenized its prompt, turns it into a
:class:`~shardmesh.api.generate.GenerationRequest`. ``response_json.py`` writes the answers;
``app.py`` does the HTTP part.

Decisions worth knowing (where OpenAI's own behaviour is not the obvious choice):

* Validation is *strict*: ``"temperature": "0.5"`` or ``"max_tokens": 16.0`` is a 400,
  not silently coerced. Integers are accepted where a float is expected (JSON writes
  ``1`` for ``1.0``). A top-level field the request models do not know is a 400 naming
  it, unless it is one that cannot change an answer (:data:`NO_EFFECT_FIELDS`: ``user``,
  ``metadata``, ...): a client must not believe a knob worked when it was dropped.
* Sampling ranges (temperature in [0, 2], top_p in (0, 1], penalties in [-2, 2], ...)
  are checked by :meth:`SamplingParams.validate`, the one place that defines them; its
  ``ValueError`` becomes a 400 naming the parameter.
* ``n`` is 1 to 8 (choices.py) and ``stop`` holds at most 4 non-empty strings.
  ``response_format`` (JSON, JSON schemas) becomes a grammar (structured_output.py).
  ``tools`` and ``tool_choice`` are tool_calls.py's. Features that would change the
  output and that we do not implement (the legacy ``functions``, ``echo``, ``suffix``,
  ``best_of`` > 1) are a 400 rather than silently
  ignored: a client that relies on them must learn it at once. ``logit_bias`` (token ids
  below the tokenizer's size, checked where the prompt is) and ``min_p`` are honoured.
* A message (messages.py) may hold a string or a list of ``{"type": "text", "text": ...}``
  parts; the parts are concatenated as they are. The ``developer`` role (OpenAI's new
  name for ``system``) is passed to the chat template as ``system``, which every
  template knows.
* Prompts become token ids in ``prompts.py``: chat prompts through the tokenizer's
  chat template, with control tokens typed by a user kept as text.
* ``max_tokens`` (or its newer name ``max_completion_tokens``, which wins when both are
  given) defaults to whatever the context window has left after the prompt. A prompt
  that fills the window, or a prompt plus ``max_tokens`` that overflows it, is a 400
  with code ``context_length_exceeded`` (OpenAI's behaviour), never a silent clamp.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

from pydantic import Field, ValidationError, field_validator

from ..contract import SamplingParams
from ..contract.sampling import MAX_LOGIT_BIASES
from .errors import bad_request
from .generate import GenerationRequest
from .messages import ChatMessage, Strict
from .structured_output import response_format_grammar

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "check_request",
    "generation_request",
    "parse_request",
]

#: OpenAI's limit on stop sequences per request.
MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8  # n: the choices one request may ask for (choices.py)
#: OpenAI's limit on ``logprobs`` for the legacy completions endpoint.
MAX_COMPLETION_LOGPROBS = 5


# --------------------------------------------------------------------------- requests


class StreamOptions(Strict):
    """``stream_options``: only ``include_usage`` means something to us."""

    include_usage: bool | None = None


def _normalize_stop(value: Any) -> Any:
    """``"x"`` -> ``["x"]``; lists are checked for length and non-empty strings."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("stop must be a string or a list of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise ValueError(f"stop may hold at most {MAX_STOP_SEQUENCES} sequences")
    if any(s == "" for s in value):
        raise ValueError("stop sequences must not be empty strings")
    return value


class _SamplingFields(Strict):
    """The fields both endpoints share. Ranges are left to ``SamplingParams.validate``."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM, llama.cpp); 0 or -1 disables it
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (transformers' meaning)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, Any] | None = None
    min_p: float | None = None  # extension (vLLM, llama.cpp): 0 disables it
    speculative: bool | None = None  # extension: false turns speculative decoding off for this request

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        return _normalize_stop(value)

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage-only chunk."""
        return self.streaming and self.stream_options is not None and bool(self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None  # checked against the model's template (tool_calls.py)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM): variables for the template (reasoning.py)
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    """The body of ``POST /v1/completions``. ``prompt`` is normalised to text or ids."""

    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """Accept ``"text"``, ``["text"]``, ``[1, 2, 3]`` or ``[[1, 2, 3]]``: one prompt."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("prompt must be a string, a list of one string, or a list of token ids")
        if all(type(t) is int for t in value):
            return value
        if len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        (only,) = value
        if isinstance(only, str):
            return only
        if isinstance(only, list) and only and all(type(t) is int for t in only):
            return only
        raise ValueError("prompt must be a string, a list of one string, or a list of token ids")


RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


#: Top-level fields OpenAI clients send that cannot change an answer here: accepted and
#: ignored. Any other field the request models do not know is a 400 that names it.
NO_EFFECT_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
})


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate a decoded JSON body into ``model``; any problem becomes a 400.

    The message names the first offending field the way OpenAI does
    (``messages[0].content``) and says what was wrong with it.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - set(model.model_fields) - NO_EFFECT_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(repr(u[:40]) for u in unknown[:5])}: this "
            f"gateway does not implement {'them' if len(unknown) > 1 else 'it'}, and refuses rather than ignore "
            f"what could change the answer", param=unknown[0][:40],
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param_path(first["loc"])
        message = first["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        raise bad_request(f"Invalid value for '{param}': {message}" if param else message, param=param or None) from None


def _param_path(loc: Sequence[int | str]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _reject_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 for parameters we understand but do not implement (see module docstring)."""
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise bad_request(f"n must be 1 to {MAX_CHOICES}", param="n")
    if isinstance(req, ChatCompletionRequest):
        if req.functions:
            raise bad_request("the legacy 'functions' are not supported: send them as 'tools'", param="functions")
        if not req.messages:
            raise bad_request("messages must hold at least one message", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    else:
        if req.echo:
            raise bad_request("echo is not supported", param="echo")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != 1:
            raise bad_request("only best_of=1 is supported", param="best_of")


# --------------------------------------------------------------------------- conversion


def sampling_params(req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    """The request's sampling knobs as validated :class:`SamplingParams`.

    Fields the client left out keep SamplingParams' defaults (OpenAI's: temperature 1,
    top_p 1, no penalties). Logprobs: chat asks with ``logprobs: true`` plus
    ``top_logprobs: k``; completions with ``logprobs: k`` (k alternatives, 0 = only the
    chosen token's logprob).
    """
    kwargs: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = float(value)
    if req.logit_bias:
        kwargs["logit_bias"] = logit_bias_pairs(req.logit_bias)
    if req.top_k is not None:
        kwargs["top_k"] = 0 if req.top_k == -1 else req.top_k  # -1 is vLLM's "disabled"
    if req.seed is not None:
        kwargs["seed"] = req.seed
    if isinstance(req, ChatCompletionRequest):
        grammar = response_format_grammar(req.response_format)
        if grammar is not None:
            kwargs["grammar"] = grammar
        if req.logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = req.top_logprobs or 0
    elif req.logprobs is not None:
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = req.logprobs
    params = SamplingParams(**kwargs)
    try:
        params.validate()
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=name if name in kwargs else None) from None
    return params


def logit_bias_pairs(bias: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted ``(id, bias)`` pairs; a 400 naming
    ``logit_bias`` for a key that is not a token id or a bias that is not a number
    (the ranges are :meth:`SamplingParams.validate`'s)."""
    if len(bias) > MAX_LOGIT_BIASES:
        raise bad_request(f"logit_bias may hold at most {MAX_LOGIT_BIASES} tokens, got {len(bias)}", param="logit_bias")
    pairs: dict[int, float] = {}
    for key, value in bias.items():
        if not key.isdigit() or len(key) > 10:
            raise bad_request(f"logit_bias keys must be token ids, got {key[:20]!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"logit_bias values must be numbers, got {type(value).__name__}", param="logit_bias")
        pairs[int(key)] = float(value)
    return tuple(sorted(pairs.items()))


def resolve_max_tokens(requested: int | None, prompt_tokens: int, context_length: int, *, prompt_param: str = "messages") -> int:
    """How many tokens to generate, or a 400 when the context window cannot hold them."""
    if prompt_tokens >= context_length:
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens, and the prompt has "
            f"{prompt_tokens} tokens: no room is left to generate.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return context_length - prompt_tokens
    if prompt_tokens + requested > context_length:
        raise bad_request(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def requested_max_tokens(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """``max_completion_tokens`` (chat's newer name) wins over ``max_tokens``."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def check_request(req: ChatCompletionRequest | CompletionRequest, vocab_size: int | None = None) -> SamplingParams:
    """Every check that needs no tokenizer: unsupported features and sampling ranges;
    with ``vocab_size``, also that ``logit_bias`` names tokens the tokenizer has."""
    _reject_unsupported(req)
    params = sampling_params(req)
    if vocab_size is not None and params.logit_bias and params.logit_bias[-1][0] >= vocab_size:
        raise bad_request(f"logit_bias names token {params.logit_bias[-1][0]}, outside the vocabulary [0, {vocab_size})",
                          param="logit_bias")
    return params


def generation_request(
    req: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    context_length: int,
    sampling: SamplingParams,
) -> GenerationRequest:
    """Everything the generator needs, with ``max_tokens`` resolved against the context."""
    prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    max_tokens = resolve_max_tokens(requested_max_tokens(req), len(prompt_ids), context_length, prompt_param=prompt_param)
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=tuple(req.stop or ()),
        speculative=req.speculative is not False,
    )
