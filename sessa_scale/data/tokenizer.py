"""Tokenizers: byte-level (nothing to download) and Hugging Face `tokenizer.json` files (through
the `tokenizers` library). Both expose name, vocab_size, eos_id, encode, decode and identity()
(the dict stored in a dataset manifest)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sessa_scale.errors import UserError

# Tried in order when a tokenizer.json does not say which token ends a document.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[EOS]")


class ByteTokenizer:
    """UTF-8 bytes as tokens; needs no vocabulary file. vocab_size = 257 (256 bytes + EOS)."""

    eos_id = 256
    vocab_size = 257
    name = "byte"
    path = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int]) -> str:
        """Decode, stopping at the first EOS; invalid UTF-8 is shown as U+FFFD."""
        out = bytearray()
        for t in tokens:
            if t == self.eos_id:
                break
            if 0 <= t < 256:
                out.append(t)
        return out.decode("utf-8", errors="replace")

    def identity(self) -> dict:
        return {"kind": "byte", "name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face tokenizer.json. eos_token: the token appended to each document (default:
    the first of EOS_CANDIDATES in the vocabulary)."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("reading tokenizer.json needs the `tokenizers` package: pip install tokenizers") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"tokenizer file {self.path} does not exist; pass byte, bpe or the path of a tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the Rust library raises plain Exceptions for bad files
            raise UserError(f"{self.path} is not a valid Hugging Face tokenizer.json: {exc}") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        names = [eos_token] if eos_token else [c for c in EOS_CANDIDATES if c in vocab]
        if not names or names[0] not in vocab:
            raise UserError(
                f"{self.path}: no end-of-document token {'(' + eos_token + ') ' if eos_token else ''}in the vocabulary; "
                f"pass --eos-token with one of its special tokens (tried {', '.join(EOS_CANDIDATES)})"
            )
        self.eos_token, self.eos_id = names[0], vocab[names[0]]
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.name = f"tokenizer.json:{self.sha256[:12]}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, tokens: list[int]) -> str:
        """Decode, stopping at the first EOS."""
        tokens = list(tokens)
        if self.eos_id in tokens:
            tokens = tokens[: tokens.index(self.eos_id)]
        return self._tok.decode(tokens)

    def identity(self) -> dict:
        return {
            "kind": "hf",
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
            "sha256": self.sha256,
        }
