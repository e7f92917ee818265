"""Byte-level tokenizer: token i < 256 is byte i, token 256 is end-of-document (EOS)."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as tokens; needs no vocabulary file. vocab_size = 257 (256 bytes + EOS)."""

    eos_id = 256
    vocab_size = 257
    name = "byte"

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
