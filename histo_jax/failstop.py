"""Multi-host fail-stop: when one process of a run fails, every process stops, within a bound.

JAX alone does not do this well. A process whose error is raised in Python waits at exit in
JAX's shutdown barrier (300 s by default) while it keeps sending heartbeats, so the others
wait in their next collective or barrier as long; a process killed outright is noticed when
its heartbeats stop (100 s by default), and the others then abort with a stack trace that
names no process and no cause.

Here every process runs a watchdog thread (:class:`FailStop`). Every ``poll_s`` seconds it
bumps its own counter in the key-value store of JAX's coordination service and reads the
store. It stops its process, printing which process failed and why, with exit status
:data:`EXIT_PEER_FAILED`, when it finds:

- a failure report of another process (:meth:`FailStop.report`: the error's message, made
  before the failing process unwinds, so that no partner waits for it);
- another process's counter unchanged for ``timeout_s`` (killed, out of memory, hung, or its
  machine gone): it reported nothing;
- the coordination service unreachable for ``timeout_s``.

JAX's own heartbeat timeout is set to twice ``timeout_s``, as a backstop behind the
watchdog. One case is JAX's alone: when process 0, which hosts the coordination service, is
killed, JAX stops the other processes at once (status 134); its message says that "the
leader task" (process 0) died.

A failing process prints its own error, waits (process 0: until the others have read its
report, at most ``timeout_s``) and exits with status 1. Errors raised on every process at
once (:func:`mark_raised_everywhere`: a non-finite loss, a refusal by process 0 that
:func:`histo_jax.train.on_primary` shares) need no report: every process exits normally.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
import traceback

from histo_jax.errors import describe

EXIT_PEER_FAILED = 3
DEFAULT_TIMEOUT_S = 30.0
_PREFIX = "histo_jax/failstop/"

# How a collective or barrier fails when its partner is gone (the watchdog then names it).
_LOST_PEER_SIGNS = ("Gloo", "Connection closed by peer", "Connection reset by peer", "NCCL",
                    "UNAVAILABLE", "DEADLINE_EXCEEDED", "Socket closed", "heartbeat",
                    "Barrier timed out", "barrier")

_active: FailStop | None = None


def mark_raised_everywhere(e: BaseException) -> BaseException:
    """Marks an error that every process raises at once (no process waits for another)."""
    with contextlib.suppress(AttributeError):
        e.raised_on_every_process = True
    return e


def raised_everywhere(e: BaseException) -> bool:
    return bool(getattr(e, "raised_on_every_process", False))


def looks_like_lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is what a collective or barrier raises when a partner process is gone."""
    text = f"{type(e).__name__}: {e}"
    return any(sign in text for sign in _LOST_PEER_SIGNS)


class FailStop:
    """The watchdog of one process of a multi-process run (see the module doc).

    ``client`` is JAX's ``DistributedRuntimeClient`` (or anything with its ``key_value_set``
    and ``key_value_dir_get``); ``exit`` is ``os._exit`` except in tests.
    """

    def __init__(self, client, process_index: int, process_count: int, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float | None = None,
                 stream=None, exit=os._exit):
        if timeout_s <= 0:
            raise ValueError(f"failure_timeout_s must be positive, got {timeout_s}.")
        self.client, self.index, self.count = client, process_index, process_count
        self.timeout_s = float(timeout_s)
        self.poll_s = float(poll_s) if poll_s else min(1.0, self.timeout_s / 10)
        self._stream, self._exit = stream, exit
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._stopping = False          # this process is on its way out (any reason)
        self._reported_at: float | None = None
        self._finished = False
        self.peer_failure: tuple[int, str] | None = None
        self._thread = threading.Thread(target=self._watch, name="histo_jax-failstop",
                                        daemon=True)

    # ---- keys ---------------------------------------------------------------------------

    def _key(self, kind: str, index: int | None = None) -> str:
        return f"{_PREFIX}{kind}/{self.index if index is None else index}"

    def _read(self) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for key, value in self.client.key_value_dir_get(_PREFIX):
            kind, _, index = key[len(_PREFIX):].partition("/")
            if index.isdigit():
                out.setdefault(kind, {})[int(index)] = value
        return out

    def _set(self, kind: str, value: str) -> bool:
        try:
            self.client.key_value_set(self._key(kind), value, allow_overwrite=True)
            return True
        except Exception:  # noqa: BLE001 - the service may be gone; nothing more to do
            return False

    # ---- life cycle ---------------------------------------------------------------------

    def start(self) -> FailStop:
        self._set("alive", "0")
        self._thread.start()
        return self

    def finished(self) -> None:
        """This process ended its work normally: its silence from now on is no failure. (The
        watchdog still stops it if another process reports a failure.)"""
        self._finished = True
        self._set("done", "1")

    def close(self) -> None:
        self._halt.set()

    def _print(self, text: str) -> None:
        stream = self._stream or sys.stderr
        with contextlib.suppress(Exception):
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()

    def _wait_for_others(self, gone: int | None = None) -> None:
        """Process 0 hosts the key-value store: it waits (at most ``min(timeout_s, 10 s)``)
        until every other process but ``gone`` has read the news (or ended), so that none
        finds the store gone before it knows why."""
        if self.index != 0:
            return
        deadline = time.monotonic() + min(self.timeout_s, 10.0)
        while time.monotonic() < deadline:
            try:
                table = self._read()
            except Exception:  # noqa: BLE001
                return
            ended: set[int] = set()
            for kind in ("stopping", "failed"):
                ended |= set(table.get(kind, {}))
            if ended >= set(range(1, self.count)) - {gone}:
                return
            time.sleep(self.poll_s / 2)

    def _stop_for_peer(self, index: int, reason: str) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self.peer_failure = (index, reason)
        self._set("stopping", f"{index}")
        self._print(
            f"\nhisto_jax: process {index} of {self.count} failed: {reason}\n"
            f"histo_jax: process {self.index} stops too (exit status {EXIT_PEER_FAILED}). Once "
            "the cause is fixed, the same command on every process resumes the run from its "
            "last complete checkpoint.")
        self._wait_for_others(gone=index)
        _end_children()
        self._exit(EXIT_PEER_FAILED)

    # ---- the watchdog -------------------------------------------------------------------

    def _watch(self) -> None:
        start = last_ok = time.monotonic()
        beats = 0
        seen: dict[int, tuple[str, float]] = {}
        while not self._halt.wait(self.poll_s):
            now = time.monotonic()
            beats += 1
            try:
                self.client.key_value_set(self._key("alive"), str(beats), allow_overwrite=True)
                table = self._read()
                last_ok = now
            except Exception as e:  # noqa: BLE001 - the service (on process 0) unreachable
                if self._finished:
                    return  # JAX's shutdown took the service down after a normal end
                if now - last_ok > self.timeout_s:
                    self._stop_for_peer(0, f"the coordination service it hosts has not answered "
                                           f"for {now - last_ok:.0f} s ({describe(e)})")
                continue
            verdict = self._judge(table, seen, start, now)
            if verdict is not None:
                self._stop_for_peer(*verdict)
            if self._reported_at is not None and now - self._reported_at > self.timeout_s:
                self._print(f"histo_jax: process {self.index} failed (above) and did not end "
                            f"within {self.timeout_s:.0f} s of it: ending now.")
                _end_children()
                self._exit(1)

    def _judge(self, table: dict, seen: dict, start: float, now: float):
        """(failed process, reason), or None while every other process is well."""
        for index, reason in sorted(table.get("failed", {}).items()):
            if index != self.index:
                return index, reason
        quiet = set(table.get("done", {})) | set(table.get("stopping", {}))
        for index in range(self.count):
            if index == self.index or index in quiet:
                continue
            value = table.get("alive", {}).get(index)
            if index not in seen or seen[index][0] != value:
                seen[index] = (value, now if index in seen or value is not None else start)
            elif now - seen[index][1] > self.timeout_s:
                return index, (f"no sign of life for {now - seen[index][1]:.0f} s (killed, out of "
                               "memory, hung, or its machine is down); it reported no error")
        return None

    # ---- failures of this process -------------------------------------------------------

    def report(self, e: BaseException) -> None:
        """Tells every other process that this one failed with ``e`` (first report wins).

        An error that looks like a lost partner (a collective that failed) first waits for
        the watchdog to find the partner that failed, which then stops this process."""
        if raised_everywhere(e) or self._reported_at is not None or self._stopping:
            return
        if looks_like_lost_peer(e):
            deadline = time.monotonic() + self.timeout_s + max(5 * self.poll_s, 2.0)
            while time.monotonic() < deadline and not self._stopping:
                time.sleep(self.poll_s)
            if self._stopping:  # the watchdog is ending this process
                self._halt.wait(self.timeout_s + 10)
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self._reported_at = time.monotonic()
        self._set("failed", describe(e)[:2000])

    def exit_failed(self, status: int = 1) -> None:
        """Ends this failing process (after :meth:`report`), once process 0's partners have
        read the report; without JAX's shutdown barrier, which would wait for them."""
        if self.peer_failure is not None:
            self._halt.wait(self.timeout_s + 10)  # the watchdog is ending this process
        self._wait_for_others()
        _end_children()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        self._exit(status)


def _end_children() -> None:
    """Loader worker processes must not outlive a process that ends without unwinding."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.kill()


# ---- the process's watchdog -----------------------------------------------------------------


def start(client, process_index: int, process_count: int, timeout_s: float) -> FailStop:
    global _active
    _active = FailStop(client, process_index, process_count, timeout_s=timeout_s).start()
    return _active


def active() -> FailStop | None:
    """This process's watchdog; None when the run has one process."""
    return _active


@contextlib.contextmanager
def reporting():
    """Reports an error raised inside to the other processes before it unwinds further (a
    no-op with one process)."""
    try:
        yield
    except BaseException as e:
        if _active is not None and not isinstance(e, SystemExit):
            _active.report(e)
        raise


def exit_after_failure(e: BaseException, message: str | None = None, status: int = 1) -> None:
    """Prints ``message`` (default: the traceback; ``""``: nothing, the caller has said it)
    and ends this process. With one process, or for an error raised on every process, this
    is ``sys.exit(status)``."""
    if message is None:
        message = "".join(traceback.format_exception(e))
    if message:
        print(message, file=sys.stderr)
    if _active is None or raised_everywhere(e):
        sys.exit(status)
    _active.report(e)
    _active.exit_failed(status)
