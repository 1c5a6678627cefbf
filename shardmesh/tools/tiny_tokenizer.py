"""The tiny models' tokenizer: a byte-level BPE trained here, on text made here.

Training is deterministic (a seeded corpus, one pass of the ``tokenizers`` trainer), so
the same arguments give the same vocabulary and merges on every machine. The pipeline
is exactly the one transformers' ``Qwen2Tokenizer`` builds, so every tiny architecture
(qwen2 included, which transformers always loads with that class) encodes alike.
"""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Target size of the BPE vocabulary, special tokens included. Small keeps the embedding
# and LM head small; 768 is a multiple of 64, so the default model has no padded rows.
TOKENIZER_VOCAB = 768

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: 0, 1, 2.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2's pre-tokenizer split (GPT-4 style: words, single digits, punctuation runs,
# newlines); see _trained_tokenizer_json for why it must be exactly this.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, as Qwen uses it, with Qwen 2.5's (Hermes) tool calls: with ``tools`` the system
# message lists them and says how to call one (<tool_call> JSON </tool_call>); assistant
# messages write their ``tool_calls`` that way and ``tool`` messages come back as
# <tool_response>. Without tools the chat is plain ChatML. ``enable_thinking`` (a
# chat_template_kwargs variable) as Qwen3's templates read it: false writes an empty
# thinking block into the prompt; true opens one, as Qwen3's thinking-only models do,
# so the answer starts with thinking; left out, neither. Message content may be a
# string, None, or a list of OpenAI style parts ({"type": "text", "text": ...}); only
# text parts are kept.
_CONTENT = (
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- elif message['content'] is none or message['content'] is not defined -%}{%- set content = '' -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
)
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' and messages[0]['content'] is string -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    + _CONTENT +
    "{%- if tools and loop.first and message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content -}}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' + (fn['arguments'] | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- elif enable_thinking is defined and enable_thinking -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


_SUBJECTS = (
    "the node", "a peer", "the router", "this machine", "the scheduler", "every worker",
    "the server", "a client", "the cluster", "our gateway", "the model", "each stage",
    "the network", "a small laptop", "the old desktop", "the first shard", "the last layer",
)
_VERBS = (
    "sends", "receives", "forwards", "stores", "computes", "checks", "drops", "signs",
    "routes", "caches", "streams", "measures", "encrypts", "retries", "loads", "answers",
)
_OBJECTS = (
    "a packet", "the hidden state", "every token", "the weights", "a request", "the reply",
    "one tensor", "the key cache", "a signed record", "the logits", "a heartbeat",
    "the next batch", "a long prompt", "the session id", "a stream of bytes",
)
_TAILS = (
    "over the network", "in under a millisecond", "before the deadline", "to the next peer",
    "when the link is slow", "after a timeout", "on every step", "without a copy",
    "if the hash matches", "while the queue is full", "from the local disk", "at startup",
)
_PARAGRAPHS = (
    "Machines talk to each other by sending messages. A message is a sequence of bytes "
    "with a length in front, so the reader knows where it ends. When a connection breaks, "
    "the sender tries again, but only a few times, and then it reports an error.",
    "A language model reads a prompt, splits it into tokens, and predicts the next token "
    "one step at a time. Each layer turns a hidden state into a new hidden state. When the "
    "layers live on different computers, the hidden state travels between them.",
    "Hello! How are you today? I am fine, thank you. What is the weather like? It is sunny "
    "and warm. Please tell me a short story about a robot who learns to paint.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 65536 3.14 -7 1e-5.",
    "You are a helpful assistant. Answer briefly and clearly. If you do not know, say so.",
)
_CODE = (
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for i in range(10):\n    print(i, i * i)\n",
    "class Peer:\n    def __init__(self, peer_id):\n        self.peer_id = peer_id\n",
    'config = {"hidden_size": 64, "num_layers": 4, "vocab_size": 768}\n',
    "if err != nil {\n\treturn fmt.Errorf(\"dial: %w\", err)\n}\n",
    "$ curl -s http://localhost:8000/v1/models | jq '.data[0].id'\n",
    "async def handler(stream):\n    data = await stream.read()\n    await stream.write(data)\n",
    "x = torch.zeros(2, 3)\ny = x @ w.T + b  # shape (2, 5)\n",
    "SELECT id, name FROM peers WHERE last_seen > NOW() - INTERVAL '5 minutes';\n",
    "<html><body><p>Hello, world!</p></body></html>\n",
)


def tokenizer_corpus(seed: int = 0, sentences: int = 3000) -> list[str]:
    """Plain English about machines and networks, plus code-ish lines, made here.

    ``random.Random(seed)`` composes the sentences, so the corpus (and the tokenizer
    trained on it) is the same on every machine and Python version.
    """
    rng = random.Random(seed)
    lines = list(_PARAGRAPHS) + list(_CODE)
    for _ in range(sentences):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ".", "!", "?")))
    lines.extend(rng.choice(_CODE) for _ in range(sentences // 10))
    return lines


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, seed: int) -> str:
    """Train a byte-level BPE once per process; later calls reuse its JSON."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Exactly the pipeline transformers' Qwen2Tokenizer builds. transformers 5 loads any
    # checkpoint whose model_type is qwen2 with that class, whatever tokenizer_config.json
    # says, and rebuilds the pipeline from vocab and merges; with any other pipeline the
    # qwen2 tiny model would encode differently from the rest. Byte level: every string
    # encodes (no unknown token) and decodes back unchanged.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front, even those absent from the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    return tok.to_str()


def train_tokenizer(
    vocab_size: int = TOKENIZER_VOCAB, *, seed: int = 0, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template.

    Returns a ``PreTrainedTokenizerFast`` (an alias of ``TokenizersBackend`` in
    transformers 5). Ids 0, 1, 2 are ``<|endoftext|>`` (bos and pad), ``<|im_start|>``
    and ``<|im_end|>`` (eos, as in Qwen's chat models). Nothing adds a bos token
    automatically: ChatML prompts do not start with one.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size, seed)),
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
