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
"""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

MAX_ANSWER_CHARS = 1000  # longer (or brace-unbalanced) answers are not parsed at all: counted as rejected
MAX_DIGITS = 100_000  # a power / factorial / binomial of literals larger than 10^MAX_DIGITS is rejected unparsed
MAX_TOWER = 3  # `a^{b^{c^{d}}}` (three carets) passes the scan, a fourth level is rejected
MAX_COMPOUND_EXPONENT = 200  # `(x+1)^{n}`: sympy expands it (n = 1,000: seconds); larger n is rejected
MAX_NESTING = 50  # brackets nested deeper than this are rejected
MAX_WORKERS = 8  # default pool size: the cores this process may use, at most this many


def default_workers() -> int:
    """The cores this process may run on (its affinity mask), capped at MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def _balanced(text: str) -> bool:
    """Braces balance (a malformed LaTeX answer is rejected without parsing)."""
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


# --- the structural scan ------------------------------------------------------------------------

class _Reject(Exception):
    pass


_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+|\\[A-Za-z]+|\\.|\*\*|\s+|.", re.DOTALL)
_NUMBER = re.compile(r"\.?[0-9]")
_OPEN = {"{", "(", "[", "\\{", "\\lbrace", "\\langle", "\\lfloor", "\\lceil"}
_CLOSE = {"}", ")", "]", "\\}", "\\rbrace", "\\rangle", "\\rfloor", "\\rceil"}
_IGNORED = {"\\left", "\\right", "\\,", "\\;", "\\:", "\\!", "\\ ", "$", "\\displaystyle", "\\textstyle",
            "\\quad", "\\qquad", "\\limits", "\\nolimits"}
_OPERATORS = {"\\cdot", "\\times", "\\div", "\\pm", "\\mp", "\\%", "\\ast"}  # between units: no size of their own
_ONE_ARG = {"\\sqrt", "\\overline", "\\mathrm", "\\mathbf", "\\operatorname", "\\text", "\\textbf", "\\mbox"}
_TWO_ARGS = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}
_BINOMS = {"\\binom", "\\dbinom", "\\tbinom"}
_LOG2 = math.log10(2)


def _power_of_ten(log: float) -> float:
    return 10.0 ** log if log < 300 else math.inf


class _Scanner:
    """Recursive descent over LaTeX-ish tokens that bounds how big each literal subexpression can get.

    Each unit gets a size: an upper bound on log10 of its value (of numerator and denominator alike for
    a fraction; at least log10 2), or None when it involves a symbol. A group's size is the sum of its
    units' (a bound for their sums, products and quotients alike); a power's is 10^size(exponent) x
    size(base); a factorial's n log10 n. Over-estimates are fine: only sizes over MAX_DIGITS are rejected,
    and no sensible final answer has a hundred thousand digits. Carets nested deeper than MAX_TOWER, and
    a compound symbolic base (`(x+1)`, not `x`) raised past MAX_COMPOUND_EXPONENT, are rejected too."""

    def __init__(self, text: str):
        self.tokens = [t for t in _TOKEN.findall(text) if not t.isspace() and t not in _IGNORED]
        self.i = 0
        self.depth = 0  # brackets
        self.tower = 0  # carets around the current token

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def scan(self) -> None:
        while self.i < len(self.tokens):
            self.group()  # a stray closing bracket at the top level ends a "group": carry on after it

    def group(self) -> float | None:
        """Units up to the closing bracket (or the end); the opening one is already consumed."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _Reject
        total: float | None = 0.0
        while (tok := self.peek()) is not None and tok not in _CLOSE:
            if tok in _OPERATORS or not (tok[0].isalnum() or tok[0] == "\\" or tok in _OPEN or _NUMBER.match(tok)):
                self.i += 1  # an operator, punctuation, or a stray ^ _ !: nothing to bound
                continue
            size = self.unit()
            total = None if total is None or size is None else total + size
        self.i += 1  # the closing bracket (past the end: harmless)
        self.depth -= 1
        return None if total is None else max(total, _LOG2)

    def unit(self) -> float | None:
        """A power with its factorials: `atom (_ atom)* (^ unit)? !*`."""
        size, compound = self.atom()
        while self.peek() == "_":  # a subscript names a symbol: scanned for rejects, not for size
            self.i += 1
            self.atom()
        if self.peek() in ("^", "**"):
            self.i += 1
            self.tower += 1
            if self.tower > MAX_TOWER:
                raise _Reject
            exponent = self.unit()  # right-associative: a^b^c = a^(b^c)
            self.tower -= 1
            if exponent is None:
                size = None
            elif size is not None:
                size = _power_of_ten(exponent) * size
            elif compound and _power_of_ten(exponent) > MAX_COMPOUND_EXPONENT:
                raise _Reject
        while self.peek() == "!":
            while self.peek() == "!":  # n!! <= n!
                self.i += 1
            if size is not None:
                value = _power_of_ten(size)
                size = max(_LOG2, value * math.log10(value))
        if size is not None and size > MAX_DIGITS:
            raise _Reject
        return size

    def atom(self) -> tuple[float | None, bool]:
        """(size, compound) of a number, a bracketed group, a command with its arguments, or a symbol."""
        tok = self.peek()
        if tok is None or tok in _CLOSE:
            return None, False
        self.i += 1
        if _NUMBER.match(tok):
            digits = tok.split(".")[0].lstrip("0")
            return (math.log10(max(float(tok), 2.0)) if len(digits) < 15 else float(len(digits))), False
        if tok in _OPEN:
            return self.group(), True
        if tok in _TWO_ARGS:
            first, second = self.argument(), self.argument()
            return (None if first is None or second is None else first + second), True
        if tok in _BINOMS:
            n, k = self.argument(), self.argument()
            if n is None or k is None:
                return None, True
            return max(_LOG2, min(_power_of_ten(n) * _LOG2, _power_of_ten(k) * n)), True  # C(n,k) <= 2^n, n^k
        if tok in _ONE_ARG:
            if self.peek() == "[":  # \sqrt[n]{...}
                self.i += 1
                self.group()
            return self.argument(), True
        if tok == "\\pi":
            return math.log10(math.pi), False
        return None, False  # a letter or any other command: a symbol

    def argument(self) -> float | None:
        if self.peek() in _OPEN:
            self.i += 1
            return self.group()
        return self.atom()[0]


def too_expensive(answer: str) -> bool:
    """Whether an answer's structure makes it astronomically expensive to parse or compare (see _Scanner):
    a power tower more than MAX_TOWER high, a power/factorial/binomial of literals over MAX_DIGITS digits,
    a compound symbolic base raised past MAX_COMPOUND_EXPONENT, brackets nested past MAX_NESTING.
    Linear in the answer's length."""
    try:
        _Scanner(answer).scan()
    except (_Reject, RecursionError):
        return True
    return False


def _reject(answer: str) -> bool:
    return len(answer) > MAX_ANSWER_CHARS or not _balanced(answer) or too_expensive(answer)


# --- the check itself (runs in a worker) ----------------------------------------------------------

def _wrap(text: str) -> str:
    return text if "$" in text else f"${text}$"


def equivalent(predicted: str, gold: str) -> bool:
    """math-verify equivalence of two answers (runs inside a worker; no time limit of its own)."""
    from math_verify import parse, verify

    gold_parsed = parse(_wrap(gold), parsing_timeout=None)
    pred_parsed = parse(_wrap(predicted), parsing_timeout=None)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _answer(line: bytes) -> bytes:
    try:
        reply = ["ok", equivalent(*json.loads(line))]
    except Exception:  # noqa: BLE001 - malformed input of any kind scores 0
        reply = ["error", False]
    return (json.dumps(reply) + "\n").encode()


# Answers the zygote checks once before forking anything: every lazily imported module is loaded, and the
# LaTeX parser's prediction cache (ANTLR's DFA, built per construct; a construct seen for the first time
# costs a fresh process up to a few hundred ms) holds the usual forms, so a forked worker is warm at once.
_WARM_UP = ["7", "-3", "0.5", "\\frac{1}{2}", "\\dfrac{3}{4}", "-\\frac{7}{3}", "\\sqrt{2}", "2\\sqrt{3}",
            "\\frac{\\sqrt{2}}{2}", "\\sqrt[3]{2}", "3\\pi", "\\frac{\\pi}{4}", "6+9i", "2-3i", "(1,2)",
            "(-\\infty,3]", "[0,1)", "(-\\infty,-2]\\cup[3,\\infty)", "\\{1,2\\}", "x=3", "y=2x+1", "x^2-1",
            "(x-1)(x+1)", "2x^{3}+\\frac{x}{2}", "30^\\circ", "50\\%", "3\\text{ cm}", "12 \\text{ m}^2",
            "1{,}000", "12,345", "(A)", "\\text{(B)}", "\\pm 2", "x<3", "x \\geq 2", "2^{10}", "\\log_2 3",
            "\\sin x", "e^{2}", "5!", "\\binom{5}{2}", "\\infty", "3, 5, 7", "\\$32", "\\text{yes}",
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\left(3, \\frac{\\pi}{2}\\right)", "a+b"]


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (no orphaned workers spinning)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the EOF on the parent's socket still ends an idle worker
        pass


def _worker_main(conn: socket.socket) -> None:
    """A forked worker: one JSON line in, one out, until the pool closes its end."""
    reader = conn.makefile("rb")
    for line in reader:
        conn.sendall(_answer(line))


def zygote(fd: int) -> None:
    """The template process: imports math-verify, warms it up, then forks a worker for each `fork`
    request on the control socket (a SOCK_SEQPACKET socket; the request carries the worker's end of a
    socket pair) and replies with the worker's pid. `kill <pid>` kills one of its workers. When the pool
    closes the control socket (or its process dies), the zygote kills its workers and exits."""
    import gc
    import logging

    logging.disable(logging.WARNING)  # math-verify warns that its own timeouts are off: ours are outside
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle; it closes us
    control = socket.socket(fileno=fd)
    for pair in zip(_WARM_UP, _WARM_UP[1:] + _WARM_UP[:1]):
        try:
            equivalent(*pair)
        except Exception:  # noqa: BLE001
            pass
    gc.collect()
    gc.freeze()  # keep the collector off the template's objects: children share those pages copy-on-write
    children: set[int] = set()
    me = os.getpid()
    control.sendall(b"ready")
    while True:
        while children:  # reap finished workers (a killed one is a zombie until then, its pid not reused)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
        if not wait([control], timeout=1.0):
            continue
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 64, 1)
        except OSError:
            message, fds = b"", []
        if not message:
            break
        if message == b"fork" and fds:
            try:
                pid = os.fork()
            except OSError:
                os.close(fds[0])
                control.sendall(b"error")
                continue
            if pid == 0:  # the worker
                code = 0
                try:
                    control.close()
                    _die_with_parent()  # the zygote: if it dies, a worker stuck in sympy goes with it
                    if os.getppid() != me:  # it died before the line above
                        raise SystemExit
                    _worker_main(socket.socket(fileno=fds[0]))
                except BaseException:  # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            os.close(fds[0])
            children.add(pid)
            control.sendall(str(pid).encode())
        elif message.startswith(b"kill "):
            pid = int(message[5:])
            if pid in children:  # only its own, not yet reaped workers: a pid that cannot have been reused
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for fd_ in fds if message != b"fork" else []:
            os.close(fd_)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


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
        command = [sys.executable, "-c", f"from lmmr1_lite.verifier import zygote; zygote({child.fileno()})"]
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
            if _reject(predicted):
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
