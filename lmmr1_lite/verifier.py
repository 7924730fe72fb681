"""Answer equivalence through math-verify (sympy) in worker processes with a hard time limit.

A model's answer is hostile input: `2^{2^{2^{2^{2^{2}}}}}` makes sympy compute for minutes inside C
code that no signal interrupts. So every check runs in a worker process, checks of a batch run in
parallel (one worker per core), and a worker that overruns `timeout` seconds is killed and replaced;
its check scores 0 and is counted as a timeout. A check that raises scores 0 and is counted as an
error. Nothing is ever evaluated as Python.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

MAX_ANSWER_CHARS = 1000  # longer (or brace-unbalanced) answers are not parsed at all: counted as rejected


def _balanced(text: str) -> bool:
    """Braces balance (a malformed LaTeX answer is rejected without parsing)."""
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _wrap(text: str) -> str:
    return text if "$" in text else f"${text}$"


def equivalent(predicted: str, gold: str) -> bool:
    """math-verify equivalence of two answers (runs inside a worker; no time limit of its own)."""
    from math_verify import parse, verify

    gold_parsed = parse(_wrap(gold), parsing_timeout=None)
    pred_parsed = parse(_wrap(predicted), parsing_timeout=None)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))


def serve() -> None:
    """Worker main loop: JSON lines `[predicted, gold]` on stdin -> `["ok"|"error", equal]` on stdout."""
    import math_verify  # noqa: F401  (import cost paid once, before "ready")

    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        try:
            reply = ["ok", equivalent(*json.loads(line))]
        except Exception:  # noqa: BLE001 - malformed input of any kind scores 0
            reply = ["error", False]
        out.write(json.dumps(reply) + "\n")
        out.flush()


@dataclass
class _Worker:
    process: subprocess.Popen
    ready: bool = False
    job: int | None = None
    started: float = 0.0

    @property
    def conn(self):
        return self.process.stdout


@dataclass
class VerifierStats:
    timeouts: int = 0
    errors: int = 0
    rejected: int = 0


class VerifierPool:
    """`check(pairs)` -> list of (equal: bool, status) with status ok / timeout / error / rejected."""

    def __init__(self, workers: int | None = None, timeout: float = 0.8):
        self.size = max(1, workers or os.cpu_count() or 1)
        self.timeout = timeout
        self.stats = VerifierStats()
        self._workers = [self._spawn() for _ in range(self.size)]

    def _spawn(self) -> _Worker:
        # A fresh interpreter per worker (not fork: torch's threads; not multiprocessing's spawn, which
        # re-imports the user's __main__).
        command = [sys.executable, "-c", "from lmmr1_lite.verifier import serve; serve()"]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, bufsize=1)
        return _Worker(process)

    def _receive(self, worker: _Worker):
        line = worker.conn.readline()
        if not line:
            raise EOFError
        return json.loads(line)

    def warm_up(self, limit: float = 120.0) -> None:
        """Block until every worker has imported math-verify (the first start takes seconds)."""
        deadline = time.monotonic() + limit
        for worker in self._workers:
            if not worker.ready and wait([worker.conn], max(0.0, deadline - time.monotonic())):
                worker.ready = self._receive(worker) == "ready"

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.wait(timeout=5)
        self._workers[self._workers.index(worker)] = self._spawn()

    def check(self, pairs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        results: list[tuple[bool, str] | None] = [None] * len(pairs)
        pending = []
        for i, (predicted, gold) in enumerate(pairs):
            if len(predicted) > MAX_ANSWER_CHARS or not _balanced(predicted):
                results[i] = (False, "rejected")
                self.stats.rejected += 1
            else:
                pending.append(i)
        pending.reverse()
        while pending or any(w.job is not None for w in self._workers):
            for worker in self._workers:  # hand jobs to idle, ready workers
                if worker.ready and worker.job is None and pending:
                    worker.job, worker.started = pending.pop(), time.monotonic()
                    worker.process.stdin.write(json.dumps(pairs[worker.job]) + "\n")
                    worker.process.stdin.flush()
            busy = [w for w in self._workers if w.job is not None]
            starting = [w for w in self._workers if not w.ready]
            now = time.monotonic()
            wait_for = min([w.started + self.timeout - now for w in busy] + [0.05 if starting else 1.0])
            ready_conns = wait([w.conn for w in busy + starting], timeout=max(0.0, wait_for))
            for worker in list(self._workers):
                if worker.conn in ready_conns:
                    try:
                        message = self._receive(worker)
                    except (EOFError, OSError, ValueError):  # the worker died (crash in native code): replace it
                        if worker.job is not None:
                            results[worker.job] = (False, "error")
                            self.stats.errors += 1
                        self._replace(worker)
                        continue
                    if not worker.ready:
                        worker.ready = message == "ready"
                        continue
                    results[worker.job] = (bool(message[1]), message[0])
                    self.stats.errors += message[0] == "error"
                    worker.job = None
                elif worker.job is not None and time.monotonic() - worker.started > self.timeout:
                    results[worker.job] = (False, "timeout")
                    self.stats.timeouts += 1
                    self._replace(worker)
            if all(w.process.poll() is not None for w in self._workers):
                raise RuntimeError("every answer-verifier worker died")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            worker.process.kill()
            worker.process.wait(timeout=5)
        self._workers = []


_POOL: VerifierPool | None = None


def pool(timeout: float | None = None) -> VerifierPool:
    """The process-wide pool, started (and warmed up) on first use."""
    global _POOL
    if _POOL is None:
        _POOL = VerifierPool(timeout=timeout or 0.8)
        _POOL.warm_up()
        atexit.register(_POOL.close)
    if timeout is not None:
        _POOL.timeout = timeout
    return _POOL
