"""An exact Gemma tokenizer rebuilt from a GGUF file's own vocabulary.

transformers 4.57's GGUF tokenizer conversion is wrong for Gemma 3: it builds a Unigram model
(Gemma is BPE with byte fallback) and renames the byte token ``<0x09>`` to ``"\\t"``, which
collides with an existing token (262,143 entries instead of 262,144). This module builds the
tokenizer itself instead:

* BPE with byte fallback over the GGUF vocabulary, in GGUF order;
* whitespace-run tokens (stored by llama.cpp with real spaces) respelled with ``▁``;
* merges ranked by token *position* (not by GGUF score) via ``generate_merges``;
* normalizer ``Replace(" ", "▁")``, pre-tokenizer ``Split(" ", "merged_with_previous")``,
  decoder ``Replace("▁", " ") → ByteFallback → Fuse``;
* control tokens (type 3) added as special tokens, user-defined tokens (type 4) added as
  non-special tokens, except the respelled space runs.

Heavy imports (gguf, tokenizers, transformers) stay inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GemmaTokenizerFast

SPIECE_UNDERLINE = "▁"
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclass
class GgufVocab:
    """The tokenizer fields read from a GGUF file (tokens already respelled)."""

    tokens: list[str]
    token_types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    respelled_ids: frozenset[int]


def _field_value(reader, key: str):
    """Return the scalar value of GGUF metadata field ``key``."""
    field = reader.fields[key]
    return field.parts[field.data[0]].tolist()[0]


def _field_strings(reader, key: str) -> list[str]:
    """Return the string array stored in GGUF metadata field ``key``."""
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _field_ints(reader, key: str) -> list[int]:
    """Return the integer array stored in GGUF metadata field ``key``."""
    field = reader.fields[key]
    return [int(field.parts[i][0]) for i in field.data]


def respell_space_run(token: str) -> str | None:
    """Return ``token`` with every space turned into ``▁`` if it is all spaces, else ``None``."""
    if token and token.strip(" ") == "":
        return SPIECE_UNDERLINE * len(token)
    return None


def read_gguf_vocab(gguf_path: str | Path) -> GgufVocab:
    """Read tokens, token types and special ids from a GGUF file, respelling space runs."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    tokens = _field_strings(reader, "tokenizer.ggml.tokens")
    respelled: set[int] = set()
    for index, token in enumerate(tokens):
        new = respell_space_run(token)
        if new is not None:
            tokens[index] = new
            respelled.add(index)
    return GgufVocab(
        tokens=tokens,
        token_types=_field_ints(reader, "tokenizer.ggml.token_type"),
        bos_id=_field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field_value(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=_field_value(reader, "tokenizer.ggml.unknown_token_id"),
        pad_id=_field_value(reader, "tokenizer.ggml.padding_token_id"),
        respelled_ids=frozenset(respelled),
    )


def build_bpe_tokenizer(tokens: list[str]):
    """Build the raw ``tokenizers.Tokenizer`` (BPE + byte fallback, Gemma normalizer/decoder).

    Merge priority is the token's position in the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF vocabulary has duplicate tokens ({len(tokens) - len(vocab)})")
    merges = generate_merges(vocab, {token: -index for token, index in vocab.items()})
    tokenizer = Tokenizer(
        BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def add_gguf_added_tokens(tokenizer, vocab: GgufVocab) -> None:
    """Register control tokens as special and user-defined tokens as non-special added tokens."""
    from tokenizers import AddedToken

    special, plain = [], []
    for index, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == TOKEN_TYPE_CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == TOKEN_TYPE_USER_DEFINED and index not in vocab.respelled_ids:
            plain.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def build_gemma_tokenizer_from_gguf(gguf_path: str | Path) -> "GemmaTokenizerFast":
    """Build the exact Gemma tokenizer for the GGUF at ``gguf_path``.

    Returns a ``transformers.GemmaTokenizerFast`` (BOS added by default, no EOS, no chat
    template) whose vocabulary, ids and merges match the GGUF's own vocabulary.
    """
    from transformers import GemmaTokenizerFast

    vocab = read_gguf_vocab(gguf_path)
    tokenizer = build_bpe_tokenizer(vocab.tokens)
    add_gguf_added_tokens(tokenizer, vocab)
    return GemmaTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=vocab.tokens[vocab.bos_id],
        eos_token=vocab.tokens[vocab.eos_id],
        unk_token=vocab.tokens[vocab.unk_id],
        pad_token=vocab.tokens[vocab.pad_id],
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
    )
