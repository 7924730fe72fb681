"""Answer equivalence through math-verify (sympy) in worker processes with a hard time limit.

A model's answer is hostile input: `2^{2^{2^{2^{2^{2}}}}}` makes sympy compute for minutes inside C
code that no signal interrupts. Two defences:

1. A cheap structural scan (`too_expensive`) rejects, unparsed, answers whose value is astronomically
   large by construction: power towers more than three levels high, numbers of more than
   `MAX_DIGITS` digits built from powers, factorials and binomials of literals, and high powers of
   compound symbolic bases (`(x+1)^{3000}` expands for minutes). They score 0 and count as rejected,
   like answers over `MAX_ANSWER_CHARS` characters or with unbalanced braces.
2. Every other check runs in a worker process, checks of a batch run in parallel (one worker per core
   by default), and a worker that overruns `timeout` seconds is killed and replaced; its check scores 0
   and counts as a timeout. A check that raises scores 0 and counts as an error.

Replacing a worker must not make the checks behind it wait for an interpreter to start and import
math-verify (seconds on a busy machine). So workers are not started from scratch: one template process
(the "zygote", a fresh interpreter that imported math-verify and ran a few dozen checks once) forks each
worker on request, in milliseconds, already warm. The training process itself never forks (its torch
threads make fork unsafe); the zygote is single-threaded. Nothing is ever evaluated as Python.

Modules: `answer_scan` (the structural scan: what is rejected unparsed), `verifier_worker` (the check
itself, the workers and the zygote: what runs in the other processes) and this one (the pool in the
training process, `pool()`). Their public names are importable from here too.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

from .answer_scan import (MAX_ANSWER_CHARS, MAX_COMPOUND_EXPONENT, MAX_DIGITS,  # noqa: F401  (re-exported)
                          MAX_NESTING, MAX_TOWER, rejected, too_expensive)
from .verifier_worker import equivalent, zygote  # noqa: F401  (re-exported)

MAX_WORKERS = 8  # default pool size: the cores this process may use, at most this many


def default_workers() -> int:
    """The cores this process may run on (its affinity mask), capped at MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


# --- the pool (runs in the training process) ------------------------------------------------------

@dataclass
class _Worker:
    conn: socket.socket
    pid: int
    job: int | None = None
    started: float = 0.0
    buffer: bytes = b""


@dataclass
class VerifierStats:
    timeouts: int = 0
    errors: int = 0
    rejected: int = 0


class VerifierPool:
    """`check(pairs)` -> list of (equal: bool, status) with status ok / timeout / error / rejected.

    `workers` worker processes (default: `default_workers()`), forked from a warm zygote; a worker that
    times out or dies is replaced by a fresh fork at once, so no check waits for an interpreter to start."""

    def __init__(self, workers: int | None = None, timeout: float = 0.8):
        self.size = max(1, workers or default_workers())
        self.timeout = timeout
        self.stats = VerifierStats()
        self._workers: list[_Worker] = []
        self._zygote: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._start_zygote()

    # the zygote
    def _start_zygote(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # A fresh interpreter (not fork: torch's threads; not multiprocessing's spawn, which re-imports the
        # user's __main__), started where it imports this very lmmr1_lite (`-c` puts its directory first).
        command = [sys.executable, "-c", f"from lmmr1_lite.verifier_worker import zygote; zygote({child.fileno()})"]
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._zygote = subprocess.Popen(command, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, cwd=here,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        child.close()
        self._control, self._ready = parent, False

    def warm_up(self, limit: float = 120.0) -> None:
        """Block until the zygote has imported math-verify (the first start takes seconds), then fork the workers."""
        if self._control is None:  # closed: start again
            self._start_zygote()
        if not self._ready:
            self._await_zygote(limit)
        while len(self._workers) < self.size:
            worker = self._fork()
            if worker is None:
                raise RuntimeError("could not start answer-verifier workers")
            self._workers.append(worker)
        while len(self._workers) > self.size:
            self._discard(self._workers.pop())

    def _await_zygote(self, limit: float) -> None:
        try:
            ok = bool(wait([self._control], limit)) and self._control.recv(64) == b"ready"
        except OSError:
            ok = False
        if not ok:
            raise RuntimeError("the answer-verifier process did not start (is math-verify installed?)")
        self._ready = True

    def _fork(self) -> _Worker | None:
        """A new worker from the zygote (milliseconds); None if fork failed. A dead zygote is restarted."""
        for _attempt in range(2):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                socket.send_fds(self._control, [b"fork"], [theirs.fileno()])
                reply = self._control.recv(64) if wait([self._control], 30.0) else b""
            except OSError:
                reply = b""
            finally:
                theirs.close()
            if reply.isdigit():
                return _Worker(ours, int(reply))
            ours.close()
            if reply == b"error":  # the zygote could not fork (out of memory?): try again later
                return None
            # no reply: the zygote died. Its replacement is the one start that waits for an import.
            self._stop_zygote()
            self._start_zygote()
            self._await_zygote(120.0)
        return None

    def _stop_zygote(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._zygote is not None:
            try:
                self._zygote.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait(timeout=5)
            self._zygote = None

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker (through its parent, the zygote, which knows whether the pid is still its own)."""
        try:
            self._control.send(b"kill %d" % worker.pid)
        except OSError:
            pass
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._discard(worker)
        index = self._workers.index(worker)
        fresh = self._fork()
        if fresh is None:
            del self._workers[index]
        else:
            self._workers[index] = fresh

    def _sweep(self) -> None:
        """Replace idle workers that died since the last check (an idle worker sends nothing: a readable
        socket means end-of-file)."""
        idle = [w for w in self._workers if w.job is None]
        for conn in wait([w.conn for w in idle], timeout=0) if idle else []:
            self._replace(next(w for w in idle if w.conn is conn))

    def pids(self) -> list[int]:
        """The worker processes' pids (for tests and monitoring)."""
        return [w.pid for w in self._workers]

    def _receive(self, worker: _Worker) -> list | None:
        """The worker's reply once a whole line has arrived; None while partial; EOFError if it died."""
        data = worker.conn.recv(65536)
        if not data:
            raise EOFError
        worker.buffer += data
        if not worker.buffer.endswith(b"\n"):
            return None
        line, worker.buffer = worker.buffer, b""
        return json.loads(line)

    def check(self, pairs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        if not self._ready or len(self._workers) != self.size:
            self.warm_up()
        self._sweep()
        results: list[tuple[bool, str] | None] = [None] * len(pairs)
        retried = [False] * len(pairs)
        pending = []
        for i, (predicted, _gold) in enumerate(pairs):
            if rejected(predicted):
                results[i] = (False, "rejected")
                self.stats.rejected += 1
            else:
                pending.append(i)
        pending.reverse()
        dead_on_arrival = 0  # workers found dead when handed a job: a few are races, many a broken zygote
        while pending or any(w.job is not None for w in self._workers):
            if not self._workers or dead_on_arrival > 2 * self.size + len(pairs):
                raise RuntimeError("every answer-verifier worker died")
            for worker in list(self._workers):  # hand jobs to idle workers
                if worker.job is None and pending:
                    job = pending.pop()
                    worker.job, worker.started = job, time.monotonic()
                    try:
                        worker.conn.sendall((json.dumps(pairs[job]) + "\n").encode())
                    except OSError:  # it died while idle: a fresh one takes the job
                        worker.job = None
                        dead_on_arrival += 1
                        pending.append(job)
                        self._replace(worker)
            busy = [w for w in self._workers if w.job is not None]
            if not busy:  # every idle worker was found dead and replaced: hand the jobs to the new ones
                continue
            now = time.monotonic()
            wait_for = min([w.started + self.timeout - now for w in busy] + [1.0])
            ready = wait([w.conn for w in busy], timeout=max(0.0, wait_for))
            for worker in busy:
                if worker.conn in ready:
                    try:
                        message = self._receive(worker)
                    except (EOFError, OSError, ValueError):  # the worker died (crash in native code, killed)
                        if retried[worker.job]:  # twice: the answer kills workers
                            results[worker.job] = (False, "error")
                            self.stats.errors += 1
                        else:  # maybe it died before this job reached it: one more try, on a fresh fork
                            retried[worker.job] = True
                            pending.append(worker.job)
                        self._replace(worker)
                        continue
                    if message is None:
                        continue
                    results[worker.job] = (bool(message[1]), message[0])
                    self.stats.errors += message[0] == "error"
                    worker.job = None
                elif time.monotonic() - worker.started > self.timeout:
                    results[worker.job] = (False, "timeout")
                    self.stats.timeouts += 1
                    self._replace(worker)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            self._discard(worker)
        self._workers = []
        self._stop_zygote()


_POOL: VerifierPool | None = None


def pool(timeout: float | None = None, workers: int | None = None) -> VerifierPool:
    """The process-wide pool, started (and warmed up) on first use. `workers` (default: the cores this
    process may use, at most MAX_WORKERS) resizes it; `timeout` is each check's limit in seconds."""
    global _POOL
    if _POOL is None:
        _POOL = VerifierPool(workers=workers, timeout=timeout or 0.8)
        _POOL.warm_up()
        atexit.register(_POOL.close)
    if timeout is not None:
        _POOL.timeout = timeout
    if workers is not None and workers != _POOL.size:
        _POOL.size = max(1, workers)
        _POOL.warm_up()
    return _POOL
