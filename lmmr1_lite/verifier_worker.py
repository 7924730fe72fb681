"""What runs outside the training process: the math-verify check itself (`equivalent`), the worker that
answers one JSON line per check, and the zygote, the warm template process that forks the workers
(see `verifier` for why). It imports no other module of lmmr1_lite: the zygote loads math-verify and
little else."""
from __future__ import annotations

import json
import os
import signal
import socket
from multiprocessing.connection import wait

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
