"""File-system faults as user errors: an unwritable, read-only or full output location becomes one
paragraph that names the path and the cause (exit status 2), never a traceback.

`cause_of` turns an OSError into words; `writable_dir` checks an output directory before any work
is done; `write_failure_cause` tells a failed write caused by the file system (no space, read-only,
permission; also when the writer reports no errno, as torch.save's zip writer does) from a bug.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from sessa_scale.errors import UserError

# errno -> what it means for a user writing files
_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EEXIST: "a file of that name is in the way",
    errno.EIO: "an input/output error of the device",
}
FILE_SYSTEM_ERRNOS = frozenset(_CAUSES)
_PROBE_BYTES = 1 << 16
# what torch.save's zip writer says when the OS refused a write (it drops the errno)
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def cause_of(exc: OSError) -> str:
    """'no space left on the device (ENOSPC)' and the like; the OS's own text for other errnos."""
    name = errno.errorcode.get(exc.errno or 0)
    text = _CAUSES.get(exc.errno, exc.strerror or str(exc))
    return f"{text} ({name})" if name else text


def is_file_system_fault(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FILE_SYSTEM_ERRNOS


def file_system_error(path: str | Path, doing: str, cause: str, advice: str = "") -> UserError:
    """UserError 'cannot DOING PATH: CAUSE. ADVICE'."""
    return UserError(f"cannot {doing} {path}: {cause}." + (f" {advice}" if advice else ""))


def writable_dir(path: str | Path, what: str) -> Path:
    """Create directory `path` (with its parents) if needed and check that a file can be written in
    it; raises a UserError naming `what` (e.g. "run.dir /x/y"), the cause and where it arose."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        existing = next((p for p in path.absolute().parents if p.is_dir()), Path("/"))
        raise UserError(
            f"cannot create {what} (in {existing}): {cause_of(exc)}. Choose a writable location."
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to {what}: {cause_of(exc)}. Choose a writable location.") from None
    return path


def free_bytes(path: str | Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_failure_cause(directory: str | Path, exc: BaseException) -> str | None:
    """Why writing under `directory` failed with `exc`, when the file system is the reason (call it
    before freeing what the failed write left, so that a full disk is still full); None otherwise."""
    if isinstance(exc, OSError) and exc.errno in FILE_SYSTEM_ERRNOS:
        return cause_of(exc)
    try:  # errno-less failures (torch's zip writer): does a plain write fail now?
        with tempfile.NamedTemporaryFile(prefix=".write-probe-", dir=directory) as fh:
            fh.write(b"\0" * _PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as probe:
        return cause_of(probe)
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILURES):
        free = free_bytes(directory)
        said = str(exc).splitlines()[0]
        return f"the write failed ({said}); {free:,} bytes are free there" if free is not None else said
    return None
