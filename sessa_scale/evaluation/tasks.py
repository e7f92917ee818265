"""Prompt -> answer tasks: records read from any JSONL file, and two built-in synthetic
long-context tasks with seeds and lengths as parameters.

- MQAR (multi-query associative recall, as in Zoology): a context of key:value pairs, then queries
  of keys whose values must be recalled, e.g. ``a:3 x:9 m:1 k:4|x:9 a:3 k:4``. Every query is one
  record: its prompt is the context plus the earlier queries answered (``a:3 x:9 m:1 k:4|x:9 a:``)
  and its answer the value (``3``). Keys are distinct lowercase strings, values random digits.
- Passkey retrieval: a number hidden at a controlled depth of repetitive filler text, asked for at
  the end (``... What is the pass key? The pass key is`` -> `` 71432``).

Every example is a pure function of (seed, its parameters, its index): the same arguments give the
same text on any machine, and example i does not depend on how many were asked for. Lengths are
in characters, which are byte-level tokens (all task text is ASCII).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

from sessa_scale.errors import UserError

KEY_ALPHABET = string.ascii_lowercase
VALUE_ALPHABET = string.digits
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class Record:
    """One prompt -> answer pair. `length` is the context length it probes (characters; None when
    unknown) and `meta` whatever else identifies it (task parameters, query index, depth)."""

    prompt: str
    answer: str
    length: int | None = None
    meta: dict = field(default_factory=dict)


def _rng(task: str, seed: int, *params) -> random.Random:
    """A generator seeded from the task, the seed and the example's parameters (str seeds hash
    with SHA-512: identical on every platform and Python version)."""
    return random.Random(":".join(str(p) for p in (task, seed, *params)))


@dataclass(frozen=True)
class MQARInstance:
    """One MQAR sequence: `pairs` [(key, value)] in context order, `queries` indices into pairs."""

    pairs: tuple[tuple[str, str], ...]
    queries: tuple[int, ...]

    @property
    def context(self) -> str:
        return " ".join(f"{k}:{v}" for k, v in self.pairs) + "|"

    @property
    def text(self) -> str:
        """The whole sequence, as written into training data."""
        return self.context + " ".join(f"{self.pairs[q][0]}:{self.pairs[q][1]}" for q in self.queries)

    def records(self) -> list[Record]:
        """One record per query; the earlier queries appear answered in its prompt."""
        out, answered = [], []
        for i, q in enumerate(self.queries):
            key, value = self.pairs[q]
            prompt = self.context + "".join(a + " " for a in answered) + f"{key}:"
            meta = {"num_pairs": len(self.pairs), "query": i}
            out.append(Record(prompt, value, length=len(self.context), meta=meta))
            answered.append(f"{key}:{value}")
        return out


def mqar_instance(seed: int, index: int, num_pairs: int, num_queries: int, key_len: int = 1, value_len: int = 1) -> MQARInstance:
    """Instance `index` of the MQAR setting: num_pairs distinct keys of key_len letters with values
    of value_len digits; num_queries distinct keys are queried (in random order)."""
    if num_pairs < 1 or num_queries < 1 or key_len < 1 or value_len < 1:
        raise UserError(
            f"MQAR: num_pairs ({num_pairs}), num_queries ({num_queries}), key_len ({key_len}) and value_len "
            f"({value_len}) must all be >= 1"
        )
    if num_pairs > len(KEY_ALPHABET) ** key_len:
        raise UserError(
            f"MQAR: {num_pairs} distinct keys do not exist with key_len={key_len} ({len(KEY_ALPHABET) ** key_len} "
            "possible); raise --key-len or lower --num-pairs"
        )
    if num_queries > num_pairs:
        raise UserError(f"MQAR: --num-queries ({num_queries}) cannot exceed --num-pairs ({num_pairs})")
    rng = _rng("mqar", seed, num_pairs, num_queries, key_len, value_len, index)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < num_pairs:
        key = "".join(rng.choice(KEY_ALPHABET) for _ in range(key_len))
        if key not in seen:
            seen.add(key)
            keys.append(key)
    values = ["".join(rng.choice(VALUE_ALPHABET) for _ in range(value_len)) for _ in keys]
    return MQARInstance(tuple(zip(keys, values)), tuple(rng.sample(range(num_pairs), num_queries)))


def mqar_chance(value_len: int = 1) -> float:
    """Exact-match accuracy of guessing a value uniformly."""
    return float(len(VALUE_ALPHABET)) ** -value_len


def passkey_record(seed: int, index: int, length: int, depth: float, digits: int = 5) -> Record:
    """Passkey example `index`: a prompt of exactly `length` characters whose needle sentence starts
    at the filler sentence boundary nearest below `depth` (0 = start, 1 = just before the question);
    the answer is " " + the key (the prompt ends with "The pass key is")."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"passkey: depth {depth} is outside [0, 1] (0 = start of the context, 1 = its end)")
    if digits < 1:
        raise UserError(f"passkey: --digits must be >= 1, got {digits}")
    key = str(_rng("passkey", seed, length, depth, digits, index).randrange(10 ** (digits - 1), 10**digits))
    needle = PASSKEY_NEEDLE.format(key=key)
    filler_len = length - len(needle) - len(PASSKEY_QUESTION)
    if filler_len < 0:
        raise UserError(
            f"passkey: length {length} is too short for the needle and question "
            f"({len(needle) + len(PASSKEY_QUESTION)} characters with {digits} digits); raise --lengths"
        )
    filler = PASSKEY_FILLER * (filler_len // len(PASSKEY_FILLER) + 2)
    sentence_starts = [0] + [i + 2 for i in range(len(filler) - 1) if filler[i : i + 2] == ". "]
    before = max(s for s in sentence_starts if s <= round(depth * filler_len))
    prompt = filler[:before] + needle + filler[before : filler_len] + PASSKEY_QUESTION
    return Record(prompt, " " + key, length=len(prompt), meta={"depth": depth, "needle_at": before})


def passkey_chance(digits: int = 5) -> float:
    return 1.0 / (9 * 10 ** (digits - 1))


def read_records(path: str | Path) -> list[Record]:
    """Records from a JSONL file of {"prompt": str, "answer": str} objects (optional "length": int;
    other keys are kept as meta). Every bad line is reported at once."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt/answer records from {path}: {exc}") from None
    records, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            problems.append(f"{path}:{n}: not JSON ({exc})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("answer"), str):
            problems.append(f'{path}:{n}: expected an object with string "prompt" and "answer"')
            continue
        if not obj["answer"]:
            problems.append(f"{path}:{n}: empty answer")
            continue
        length = obj.get("length")
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "answer", "length")}
        records.append(Record(obj["prompt"], obj["answer"], length if isinstance(length, int) else None, meta))
    if problems:
        raise UserError("invalid prompt/answer file:\n" + "\n".join(problems[:20]) + ("\n..." if len(problems) > 20 else ""))
    if not records:
        raise UserError(f'{path} holds no records; expected one {{"prompt": ..., "answer": ...}} object per line')
    return records


def write_records(records: list[Record], path: str | Path) -> None:
    """Write records as JSONL that read_records reads back."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps({"prompt": r.prompt, "answer": r.answer, "length": r.length, **r.meta}) + "\n")


@dataclass
class TaskSet:
    """A generated task: records to evaluate, the same examples as whole training documents, the
    exact-match accuracy of guessing (None when unknown) and the parameters that produced it."""

    records: list[Record]
    documents: list[str]
    chance: float | None
    params: dict


def mqar_set(
    seed: int, n: int, num_pairs: list[int], num_queries: int | None = None, key_len: int = 1, value_len: int = 1
) -> TaskSet:
    """n instances for each context size in num_pairs; num_queries None queries every key. The
    settings are interleaved (instance i of each, then i + 1), so that any stretch of the documents,
    e.g. one shuffle buffer of the training loader, mixes them all."""
    instances = [
        mqar_instance(seed, i, p, p if num_queries is None else min(num_queries, p), key_len, value_len)
        for i in range(n)
        for p in num_pairs
    ]
    params = {"seed": seed, "n": n, "num_pairs": num_pairs, "num_queries": num_queries, "key_len": key_len, "value_len": value_len}
    return TaskSet([r for inst in instances for r in inst.records()], [inst.text for inst in instances], mqar_chance(value_len), params)


def passkey_set(seed: int, n: int, lengths: list[int], depths: list[float], digits: int = 5) -> TaskSet:
    """n examples for every (length, depth) pair, interleaved as in mqar_set."""
    records = [passkey_record(seed, i, L, d, digits) for i in range(n) for L in lengths for d in depths]
    params = {"seed": seed, "n": n, "lengths": lengths, "depths": depths, "digits": digits}
    return TaskSet(records, [r.prompt + r.answer for r in records], passkey_chance(digits), params)
