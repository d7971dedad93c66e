"""The errors a user acts on, and turning failed writes into one clear message.

:func:`writing` wraps a write: an ``OSError`` (a full disk, an I/O error, a read-only or
forbidden folder) becomes a :class:`WriteFailedError` naming the file, the reason and, where
the caller says so, what was kept and what to do. The command-line entry points print these
without a traceback and exit with status 1.
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator


class WorkdirError(Exception):
    """A workdir (or output) problem the user has to act on; printed without a traceback."""


class WriteFailedError(WorkdirError):
    """A file could not be written (full disk, I/O error, ...)."""


def describe(e: BaseException) -> str:
    """One line: the error's type and its message's first line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EIO: "an I/O error", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def failure_reason(exc: BaseException) -> str:
    """``'the disk is full ([Errno 28] No space left on device)'`` for an error or its causes."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _REASONS:
            return f"{_REASONS[seen.errno]} ({seen})"
        seen = seen.__cause__ or seen.__context__
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "No space left on device" in str(exc):
        return f"the disk is full ({text})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_write_failure(exc: BaseException) -> bool:
    """A full disk, an exceeded quota, an I/O error, a read-only or forbidden file system,
    as an ``OSError`` or in the message of an error some C++ writers raise instead."""
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        return True
    return "No space left on device" in str(exc) or "Input/output error" in str(exc)


@contextlib.contextmanager
def writing(what: str, path: str, kept: str = "") -> Iterator[None]:
    """Turns an ``OSError`` raised inside into a :class:`WriteFailedError` naming ``path``
    (and, with ``kept``, saying what was kept and what to do)."""
    try:
        yield
    except WriteFailedError:
        raise
    except Exception as e:
        if not (isinstance(e, OSError) or is_write_failure(e)):
            raise
        raise WriteFailedError(f"Could not write {what} ({path}): {failure_reason(e)}."
                               + (f" {kept}" if kept else "")) from e


def write_atomic(path: str, text: str, what: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename (whole or not at all)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with writing(what, path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
