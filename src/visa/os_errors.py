"""Operating-system failures the user can fix, said in one line: what happened, where, and what to do.

``visa`` commands turn these into one line on stderr and exit code 2 (the full traceback only with
``visa --debug``). Every run folder is written atomically and resumable, so the advice is always the
same: fix the cause, then rerun the same command.
"""

from __future__ import annotations

import errno
from concurrent.futures.process import BrokenProcessPool

RESUMES = "then rerun the same command: the run resumes where it stopped"

_ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EROFS: ("read-only file system", "choose an --out on a writable file system"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another --out"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another --out"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
    errno.ENFILE: ("too many open files in the system", "close other programs"),
    errno.ENOMEM: ("out of memory", "lower --workers or execution.memory_budget_bytes"),
    errno.EIO: ("input/output error", "check the disk"),
}
_BY_TEXT = (("No space left", errno.ENOSPC), ("Read-only file system", errno.EROFS),
            ("Permission denied", errno.EACCES), ("Disk quota exceeded", errno.EDQUOT))

FIXABLE = (OSError, BrokenProcessPool, MemoryError)
"""The exceptions :func:`describe` has words for."""


def describe(err: BaseException) -> str:
    """One line for an operating-system failure (see :data:`FIXABLE`)."""
    if isinstance(err, BrokenProcessPool):
        return (
            "a worker process died abruptly (killed by the operating system, e.g. the out-of-memory killer); "
            f"what finished is stored: lower --workers or execution.memory_budget_bytes, {RESUMES}"
        )
    if isinstance(err, MemoryError):
        return f"out of memory: lower --workers or execution.memory_budget_bytes, {RESUMES}"
    code = _errno_of(err)
    what, fix = _ADVICE.get(code, (err.strerror or str(err) or type(err).__name__, "fix the cause"))  # type: ignore[union-attr]
    where = getattr(err, "filename", None)
    return f"{what}{f' ({where})' if where else ''}: {fix}, {RESUMES}"


def _errno_of(err: BaseException) -> int | None:
    code = getattr(err, "errno", None)
    if code:
        return code
    text = str(err)
    return next((c for marker, c in _BY_TEXT if marker in text), None)
