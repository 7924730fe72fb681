"""The reward time limits under load: hostile answers are rejected before parsing, a worker that times out
or is killed is replaced by a fork of a warm template (no check waits for an interpreter to start), and
answer extraction is linear in the completion. Timed bounds leave margin for a busy 2-core machine."""
import os
import signal
import threading
import time

import pytest

from lmmr1_lite import rewards, verifier
from lmmr1_lite.data import Example
from lmmr1_lite.sokoban import solves

from test_rewards import EQUIVALENCE

SLOW = "(x+1)^{150}"  # accepted by the scan; sympy expands it: 0.15 s (idle 2-core machine) to 0.6 s (busy)
SLOWER = "(x+1)^{199}(x+2)^{199}"  # accepted too: seconds
TRIVIAL = ("\\frac{1}{2}", "0.5")

HOSTILE = [  # 16 answers that stall sympy for seconds to hours
    "9^{9^{9^{9^{9^{9}}}}}", "2^{2^{2^{2^{2^{2}}}}}", "9^{9^{9}}", "9^9^9", "9**9**9", "10^{10^{7}}", "9^{-10^{9}}",
    "\\left(9\\right)^{\\left(9\\right)^{9}}", "{9}^{{9}^{{9}}}", "9^{9 \\cdot 10^{8}}", "\\frac{1}{2}^{10^{9}}",
    "(10^{6})!", "\\binom{10^{9}}{10^{8}}", "(x+1)^{3000}", "x = 9^{9^{9}}", "e^{e^{e^{e^{e}}}}",
]
NORMAL = [  # final answers the scan must let through (besides the equivalence table's)
    "2^{10}", "3^{100}", "10^{18}", "10^{2007}", "2^{2^{3}}", "2^{2^{2^{2}}}", "x^{2024}", "x^{10^{9}}", "e^{x^2}",
    "(x+1)^{2}", "(x+1)^{100}", "5!", "1000!", "10!!", "\\binom{10}{3}", "\\binom{100}{50}", "\\dbinom{2n}{n}",
    "\\frac{1}{2^{10}}", "(2^{3})^{4}", "0.5^{10}", "2^{\\frac{1}{3}}", "4^{1/3}", "\\sqrt[3]{2}", "e^{i\\pi}",
    "x_{1}^{2}+x_{2}^{2}", "12 \\text{ m}^2", "(-\\infty,-2]\\cup[3,\\infty)", "\\left( 3, \\frac{\\pi}{2} \\right)",
    "\\$32,\\!348", "\\boxed{4}.", ".5", "6+9i",
]


@pytest.fixture
def fresh_pool():
    """The process-wide pool (its workers get killed and its limit shortened here), restored afterwards."""
    pool = verifier.pool()
    pool.warm_up()
    timeout, pool.timeout = pool.timeout, 5.0
    yield pool
    pool.timeout = timeout


@pytest.mark.parametrize("answer", HOSTILE)
def test_scan_rejects_answers_that_stall_sympy(answer):
    start = time.perf_counter()
    assert verifier.too_expensive(answer)
    assert time.perf_counter() - start < 0.1  # microseconds when idle; margin for a preempted test


@pytest.mark.parametrize("answer", NORMAL + [p for p, _, e in EQUIVALENCE if e == 1.0])
def test_scan_lets_normal_answers_through(answer):
    assert not verifier.too_expensive(answer)


def test_scan_is_linear_on_deep_junk():
    for junk in ("9^{" * 300 + "}" * 300, "(" * 1000, "x^" * 500, "!" * 1000, "\\frac" * 200, "\\sqrt" * 200):
        start = time.perf_counter()
        verifier.too_expensive(junk)
        assert time.perf_counter() - start < 0.05, junk[:12]


def test_a_batch_of_power_towers_scores_zero_fast_and_is_counted():
    verifier.pool().warm_up()
    completions = [f"<think>x</think><answer>${answer}$</answer>" for answer in HOSTILE]
    start = time.perf_counter()
    golds = [Example(prompt="q", answer="3") for _ in HOSTILE]
    _, parts, counts = rewards.score(completions, golds, {"accuracy": 1.0})
    elapsed = time.perf_counter() - start
    assert parts["accuracy"] == [0.0] * 16
    assert counts["reward_rejected"] == 16 and counts["reward_timeouts"] == 0
    assert elapsed <= 2.0, f"16 hostile answers took {elapsed:.1f} s"


def test_timeouts_are_counted_and_the_next_check_does_not_wait(fresh_pool):
    """Each timed-out worker is replaced by a fork; the check right after the batch finds it ready (an
    interpreter started from scratch would make it wait for math-verify's import, 0.4 s to seconds)."""
    fresh_pool.timeout = 0.05
    try:
        nexts = []
        for _ in range(3):
            before = fresh_pool.stats.timeouts
            start = time.perf_counter()
            results = fresh_pool.check([(SLOWER, "3")] * 4)
            batch = time.perf_counter() - start
            assert results == [(False, "timeout")] * 4 and fresh_pool.stats.timeouts == before + 4
            assert batch < 1.0, f"4 timeouts of 0.05 s on 2 workers took {batch:.2f} s"
            fresh_pool.timeout = 5.0
            start = time.perf_counter()
            assert fresh_pool.check([TRIVIAL]) == [(True, "ok")]
            nexts.append(time.perf_counter() - start)
            fresh_pool.timeout = 0.05
        assert max(nexts) < 0.5 and sum(nexts) < 0.5, f"trivial checks after timeouts took {nexts}"
    finally:
        fresh_pool.timeout = 5.0


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_workers_killed_mid_batch_are_replaced_at_once(fresh_pool):
    """Every worker is killed while it checks; their checks get one more try on fresh forks, and the
    check after the batch is answered, correctly, at once."""
    nexts = []
    for _ in range(3):
        killer = threading.Timer(0.05, _kill, [fresh_pool.pids()])
        killer.start()
        start = time.perf_counter()
        results = fresh_pool.check([(SLOW, "3")] * 2)
        batch = time.perf_counter() - start
        killer.join()
        assert results == [(False, "ok")] * 2, results  # retried after the kill, not scored as errors
        assert batch < 2.5, f"a batch of 2 with its workers killed took {batch:.2f} s"
        start = time.perf_counter()
        assert fresh_pool.check([TRIVIAL]) == [(True, "ok")]
        nexts.append(time.perf_counter() - start)
    assert max(nexts) < 0.5 and sum(nexts) < 1.0, f"checks after the kills took {nexts}"


def test_an_idle_worker_that_died_does_not_cost_a_check(fresh_pool):
    errors = fresh_pool.stats.errors
    _kill(fresh_pool.pids())
    time.sleep(0.1)
    start = time.perf_counter()
    assert fresh_pool.check([TRIVIAL, ("5", "6+9i")]) == [(True, "ok"), (False, "ok")]
    assert time.perf_counter() - start < 1.0
    assert fresh_pool.stats.errors == errors


def test_an_answer_that_kills_its_worker_twice_is_an_error(fresh_pool):
    """One retry only: an answer whose check crashes the worker each time scores 0, counted as an error."""
    errors = fresh_pool.stats.errors
    stop = threading.Event()

    def keep_killing():
        while not stop.is_set():
            _kill(fresh_pool.pids())
            time.sleep(0.02)
    killer = threading.Thread(target=keep_killing)
    killer.start()
    try:
        results = fresh_pool.check([(SLOW, "3")])
    finally:
        stop.set()
        killer.join()
    assert results == [(False, "error")] and fresh_pool.stats.errors == errors + 1
    assert fresh_pool.check([TRIVIAL]) == [(True, "ok")]


def test_pool_size_defaults_to_the_cores_available_and_can_be_set():
    assert verifier.default_workers() == min(len(os.sched_getaffinity(0)), verifier.MAX_WORKERS)
    shared = verifier.pool()
    size = shared.size
    try:
        assert verifier.pool(workers=3) is shared and len(set(shared.pids())) == 3
        assert shared.check([TRIVIAL] * 5) == [(True, "ok")] * 5
    finally:
        verifier.pool(workers=size)
    assert len(shared.pids()) == size


UNCLOSED = ["<answer>" * 50000, "<think>" * 50000, "\\boxed{" * 50000, "<answer>x" * 50000,
            "<think>a</think>" + "\\boxed{" + "{}" * 25000]


@pytest.mark.parametrize("completion", UNCLOSED, ids=["answer", "think", "boxed", "answer_x", "boxed_pairs"])
def test_unclosed_tags_are_extracted_in_linear_time(completion):
    for fn, gold in ((rewards.accuracy_reward, "3"), (solves, "#####/#@$.#/#####")):
        start = time.perf_counter()
        assert fn(completion, gold) == 0.0
        assert time.perf_counter() - start < 1.0, fn.__name__


def test_a_megabyte_of_text_is_extracted_fast():
    import random

    rng = random.Random(0)
    junk = "".join(rng.choice("ab <>/{}\\answerthinkboxed07\n") for _ in range(1_000_000))
    for completion in (junk, "\\boxed{" + "{" * 1_000_000, "<think>" + junk):
        start = time.perf_counter()
        rewards.extract_answer(completion)
        assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("completion,expected", [
    ("<answer>1</answer><answer>7", "1"),              # an unclosed block after a closed one
    ("<answer><answer>7</answer>", "<answer>7"),       # the first opening tag pairs with the first closing one
    ("<answer></answer>", ""),
    ("<think>\\boxed{1}</think>\\boxed{7}", "7"),
    ("\\boxed{7}<think>\\boxed{1}", "7"),                # an unclosed think runs to the end
    ("\\boxed{7}<think>\n", "7"),
    ("\\boxed{a{b}c}", "a{b}c"),
    ("\\boxed{1}\\boxed{2", None),                      # the last box is unbalanced
    ("\\boxed{" + "{}" * 5000 + "}", "{}" * 5000),      # a closing brace far beyond the first chunk
])
def test_extraction_semantics_unchanged(completion, expected):
    assert rewards.extract_answer(completion) == expected
