"""The tokenizer files of an exported model, loadable with transformers' AutoTokenizer (a
PreTrainedTokenizerFast over tokenizer.json):

- a run on a Hugging Face tokenizer.json (`prep --tokenizer bpe` or a given file): that file's
  vocabulary, normalizer, pre-tokenizer, model and decoder unchanged;
- a byte-level run: `byte_level_tokenizer()`, a tokenizer.json that reproduces ByteTokenizer exactly:
  token id b is the UTF-8 byte b (a BPE without merges over GPT-2's printable byte alphabet, no
  regex splitting), id 256 is the end-of-document token `<|endoftext|>`. Decoding turns invalid
  UTF-8 into U+FFFD, as ByteTokenizer does. One difference: the literal text "<|endoftext|>"
  encodes to the special token 256, where ByteTokenizer spells it out in bytes.

Both add the end-of-document token in front of a text when special tokens are requested
(transformers' default, `add_special_tokens=True`) as the bos_token, because sessa_scale trains
on documents packed after an EOS and its own evaluation prefixes prompts with it the same way;
`add_special_tokens=False` gives exactly the tokens of sessa_scale's tokenizer. The pad token is
the EOS as well.
"""

from __future__ import annotations

import json
from pathlib import Path

BYTE_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (the alphabet of
    `tokenizers`' ByteLevel pre-tokenizer and decoder)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` equal to sessa_scale's ByteTokenizer (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
    return tok


def _with_eos_prefix(tok, eos_token: str, eos_id: int):
    """tok with the EOS prepended to encodings that ask for special tokens (after any existing
    post-processor, which keeps its own work, e.g. byte-level offset trimming)."""
    from tokenizers import processors

    prefix = processors.TemplateProcessing(
        single=f"{eos_token} $A", pair=f"{eos_token} $A {eos_token} $B", special_tokens=[(eos_token, eos_id)]
    )
    tok.post_processor = prefix if tok.post_processor is None else processors.Sequence([tok.post_processor, prefix])
    return tok


def write_tokenizer(tokenizer, out: Path) -> dict:
    """Write tokenizer.json and tokenizer_config.json for a sessa_scale tokenizer (ByteTokenizer or
    HFTokenizer) into out; returns the tokenizer_config written."""
    from tokenizers import Tokenizer

    if tokenizer.path is None:  # byte-level
        tok, eos_token = byte_level_tokenizer(), BYTE_EOS
    else:
        tok, eos_token = Tokenizer.from_file(str(tokenizer.path)), tokenizer.eos_token
    if tok.token_to_id(eos_token) != tokenizer.eos_id:
        raise ValueError(f"the exported tokenizer maps {eos_token!r} to {tok.token_to_id(eos_token)}, not {tokenizer.eos_id}")
    _with_eos_prefix(tok, eos_token, tokenizer.eos_id).save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_token,
        "eos_token": eos_token,
        "pad_token": eos_token,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return config
