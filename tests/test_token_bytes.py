"""``api/token_bytes.py``: the raw bytes behind each token, for logprobs' ``bytes``.

Byte-level BPE (the tiny model's tokenizer, GPT-2's alphabet) and SentencePiece with
byte fallback (Llama 2, Mistral) must both give back the exact UTF-8 of the text.
"""

from __future__ import annotations

from typing import Any

pytest_plugins = ["api_fixtures"]


def test_token_bytes_rebuild_utf8(tokenizer: Any) -> None:
    from shardmesh.api.token_bytes import token_bytes

    text = "héllo wörld, naïve café: 世界你好 😀🎉 – “quoted” Ωμέγα\n\tend"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # decode alone loses bytes here
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == text.encode("utf-8")
    # Special tokens are skipped in the completion text, so their bytes are empty too.
    assert [token_bytes(tokenizer, i) for i in tokenizer.all_special_ids] == [b""] * len(tokenizer.all_special_ids)


def test_byte_level_alphabet_is_gpt2s() -> None:
    from tokenizers import pre_tokenizers

    from shardmesh.api.token_bytes import byte_level_alphabet

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet["Ġ"] == ord(" ") and alphabet["A"] == ord("A")


def test_token_bytes_sentencepiece_byte_fallback() -> None:
    """Llama 2 / Mistral style: ``▁`` is a space and ``<0xNN>`` one raw byte."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from shardmesh.api.token_bytes import token_bytes

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate("▁hicaf")})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sp = PreTrainedTokenizerFast(tokenizer_object=backend)
    text = "hi café 世"
    ids = sp(text, add_special_tokens=False)["input_ids"]
    assert "<0xC3>" in sp.convert_ids_to_tokens(ids)
    # The decoder strips the space SentencePiece puts in front of the first word; the
    # first token's bytes keep it.
    assert b"".join(token_bytes(sp, i) for i in ids) == b" " + text.encode("utf-8")
