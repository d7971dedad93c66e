"""The multi-host fail-stop watchdog (histo_jax/failstop.py) on an in-memory key-value store;
tests/test_train.py runs it in real 2-process runs (kill -9, a failed checkpoint write)."""

import io
import threading
import time

import pytest

from histo_jax import failstop
from histo_jax.errors import WriteFailedError


class Store:
    """The key-value store of JAX's coordination service, as FailStop uses it."""

    def __init__(self):
        self.data, self.lock, self.down = {}, threading.Lock(), False

    def client(self):
        store = self

        class Client:
            def key_value_set(self, key, value, allow_overwrite=False):
                store.check()
                with store.lock:
                    assert allow_overwrite or key not in store.data
                    store.data[key] = value

            def key_value_dir_get(self, prefix):
                store.check()
                with store.lock:
                    return [(k, v) for k, v in store.data.items() if k.startswith(prefix)]
        return Client()

    def check(self):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")


class Process:
    """One process's watchdog with a recorded exit (the watchdog then halts)."""

    def __init__(self, store, index, count=2, timeout_s=0.6):
        self.stream, self.status, self.exited = io.StringIO(), None, threading.Event()
        self.fs = failstop.FailStop(store.client(), index, count, timeout_s=timeout_s,
                                    poll_s=0.03, stream=self.stream, exit=self._exit)

    def _exit(self, status):
        self.status = status
        self.fs.close()
        self.exited.set()

    def start(self):
        self.fs.start()
        return self


def _pair(**kw):
    store = Store()
    return store, Process(store, 0, **kw).start(), Process(store, 1, **kw).start()


def test_a_reported_error_stops_the_other_process_naming_the_failed_one_and_why():
    _, p0, p1 = _pair()
    p1.fs.report(WriteFailedError("Could not write the training state checkpoint /w/6: "
                                  "No space left on device."))
    assert p0.exited.wait(5)
    assert p0.status == failstop.EXIT_PEER_FAILED
    text = p0.stream.getvalue()
    assert "histo_jax: process 1 of 2 failed: WriteFailedError: Could not write the training " \
           "state checkpoint /w/6: No space left on device." in text
    assert "process 0 stops too (exit status 3)" in text and "resumes the run" in text
    p1.fs.exit_failed(1)  # the failed process ends with its own status
    assert p1.status == 1
    p1.fs.close()


def test_process_0_failing_waits_until_the_others_have_read_its_report():
    store, p0, p1 = _pair()
    p1.fs.close()  # process 1's watchdog is slow to look
    p0.fs.report(ValueError("bad value"))
    ended = threading.Thread(target=p0.fs.exit_failed, args=(1,))
    ended.start()
    time.sleep(0.3)
    assert p0.status is None  # still serving the store: process 1 has not read it yet
    p1 = Process(store, 1).start()  # looks now
    assert p1.exited.wait(5) and p1.status == failstop.EXIT_PEER_FAILED
    assert "process 0 of 2 failed: ValueError: bad value" in p1.stream.getvalue()
    ended.join(5)
    assert p0.status == 1


def test_a_silent_process_is_a_failed_one_after_the_timeout_but_a_finished_one_is_not():
    _, p0, p1 = _pair()
    time.sleep(0.2)
    p1.fs.close()  # killed: no more heartbeats, nothing reported
    start = time.monotonic()
    assert p0.exited.wait(5)
    assert time.monotonic() - start >= 0.6 - 0.1  # not before the timeout
    assert p0.status == failstop.EXIT_PEER_FAILED
    assert "process 1 of 2 failed: no sign of life for" in p0.stream.getvalue()
    assert "it reported no error" in p0.stream.getvalue()

    _, p0, p1 = _pair()
    p1.fs.finished()
    p1.fs.close()
    assert not p0.exited.wait(2.0)  # 3x the timeout: a finished process may be silent
    p0.fs.close()


def test_a_process_that_never_starts_its_watchdog_is_silent_too():
    store = Store()
    p0 = Process(store, 0).start()
    assert p0.exited.wait(5) and "process 1 of 2 failed: no sign of life" in p0.stream.getvalue()


def test_an_unreachable_coordinator_stops_the_process_naming_process_0():
    store, p0, p1 = _pair()
    p0.fs.close()
    store.down = True  # process 0, which hosts the store, is gone
    assert p1.exited.wait(5) and p1.status == failstop.EXIT_PEER_FAILED
    assert "process 0 of 2 failed: the coordination service it hosts has not answered for" \
           in p1.stream.getvalue()


def test_a_lost_partner_in_a_collective_is_blamed_on_the_partner_not_reported():
    store, p0, p1 = _pair()
    p1.fs.close()  # killed
    lost = RuntimeError("UNKNOWN: Gloo AllGather failed: Connection closed by peer [::1]:5")
    assert failstop.looks_like_lost_peer(lost)
    p0.fs.report(lost)  # returns once the watchdog has stopped this process
    assert p0.status == failstop.EXIT_PEER_FAILED
    assert "process 1 of 2 failed: no sign of life" in p0.stream.getvalue()
    assert "failstop/failed/0" not in store.data  # its own error was a consequence


def test_errors_raised_on_every_process_are_not_reported():
    store, p0, p1 = _pair()
    e = failstop.mark_raised_everywhere(FloatingPointError("loss is nan"))
    assert failstop.raised_everywhere(e) and not failstop.looks_like_lost_peer(e)
    p0.fs.report(e)
    assert not any("failed" in k for k in store.data)
    assert not p1.exited.wait(0.3)
    p0.fs.close()
    p1.fs.close()


def test_one_process_exits_as_before(capsys):
    assert failstop.active() is None
    with pytest.raises(SystemExit) as e:
        failstop.exit_after_failure(ValueError("x"), "histo_jax: the message")
    assert e.value.code == 1 and "histo_jax: the message" in capsys.readouterr().err
    with pytest.raises(ValueError), failstop.reporting():
        raise ValueError("nothing to report to")
    with pytest.raises(ValueError, match="must be positive"):
        failstop.FailStop(Store().client(), 0, 2, timeout_s=0)
