"""Which checkpoints of a run are complete, and which one `latest` stands for.

A checkpoint directory `step_N` is complete when its meta.json (written last, once every rank's
files are on disk) reads back and every file it lists has the size it was saved with; checkpoints
saved before meta.json listed its files need at least one model-state file. The `latest` pointer
names the newest complete checkpoint. When the pointer is missing, unreadable, or names a missing or
incomplete checkpoint, the newest complete `step_N` found by scanning stands in, and the choice
says why (nothing is ever a silent fresh start).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

LATEST = "latest"
META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_of(checkpoint: Path) -> int:
    """N of a `step_N` directory."""
    return int(STEP_DIR.match(checkpoint.name).group(1))


def step_dirs(checkpoints_dir: Path) -> list[Path]:
    """The `step_N` directories under checkpoints_dir (not `.partial` or `.old` debris), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted((p for p in checkpoints_dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def file_sizes(directory: Path) -> dict[str, int]:
    """{path relative to directory: size in bytes} of every file under it, sorted by path."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def incomplete_reason(checkpoint: Path) -> str | None:
    """None when `checkpoint` is complete, else what is missing or wrong (for messages)."""
    try:
        meta = json.loads((checkpoint / META).read_text())
    except FileNotFoundError:
        return f"no {META}"
    except (OSError, ValueError) as exc:
        return f"{META} is unreadable ({exc})"
    if not isinstance(meta, dict) or "step" not in meta:
        return f"{META} holds no step"
    files = meta.get("files")
    if files is None:  # saved before meta.json listed the files
        return None if any(checkpoint.glob("*model_states.pt")) else "no model states (*model_states.pt)"
    for name, size in files.items():
        try:
            actual = (checkpoint / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual:,} bytes, {size:,} when saved"
    return None


@dataclass
class Choice:
    """The checkpoint a run directory's checkpoints stand for, and why when `latest` was not used."""

    checkpoint: Path | None  # None: no complete checkpoint
    note: str | None  # set when `latest` was missing or unusable (what was wrong, what was used)


def _read_pointer(checkpoints_dir: Path) -> tuple[Path | None, str | None, str | None]:
    """(the complete checkpoint `latest` names or None, the name it holds or None, what is wrong or None)."""
    pointer = checkpoints_dir / LATEST
    try:
        tag = pointer.read_text().strip()
    except FileNotFoundError:
        return None, None, f"{pointer} is missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, None, f"{pointer} is unreadable ({exc})"
    if not STEP_DIR.match(tag):
        return None, None, f"{pointer} holds {tag[:40]!r}, not a checkpoint name"
    target = checkpoints_dir / tag
    if not target.is_dir():
        return None, tag, f"{pointer} names {tag}, which does not exist"
    reason = incomplete_reason(target)
    if reason is not None:
        return None, tag, f"{pointer} names {tag}, which is incomplete ({reason})"
    return target, tag, None


def newest_complete(checkpoints_dir: Path) -> Choice:
    """What RUN_DIR/checkpoints stands for: the checkpoint `latest` names if it is complete, else
    the newest complete step_N (with a note saying why). Choice(None, None): no checkpoints at all."""
    target, named, problem = _read_pointer(checkpoints_dir)
    if target is not None:
        return Choice(target, None)
    candidates = step_dirs(checkpoints_dir)
    if not candidates and not (checkpoints_dir / LATEST).exists():
        return Choice(None, None)
    skipped = []
    for candidate in reversed(candidates):
        reason = incomplete_reason(candidate)
        if reason is not None and candidate.name == named:
            continue  # the problem with the pointer already says what is wrong with it
        if reason is None:
            newer = f" (newer but incomplete: {'; '.join(skipped)})" if skipped else ""
            used = f"using the newest complete checkpoint found by scanning, {candidate.name}{newer}"
            return Choice(candidate, f"{problem}; {used}")
        skipped.append(f"{candidate.name}: {reason}")
    found = f" ({'; '.join(skipped)})" if skipped else ""
    return Choice(None, f"{problem}, and no complete checkpoint was found in {checkpoints_dir}{found}")
