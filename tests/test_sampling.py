"""The sampler of `rollout.next_tokens`: its draws follow the (filtered) temperature softmax, top-k /
top-p remove what HF's warpers remove, suppressed tokens never come out, log-probs are the full
softmax's."""
import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lmmr1_lite.rollout import filter_top_k_top_p_, inverse_cdf_sample, next_tokens

LOGITS = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, -3.0, 1.0, 2.2, -0.5, 0.7])
DRAWS = 200_000
# chi-square critical value for p = 1e-4 by degrees of freedom (a deterministic seed: a false
# alarm would be a fixed, reproducible 1-in-10,000 event, not a flake)
CHI2_CRITICAL = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88, 8: 31.83, 9: 33.72}


def chi2_critical(dof: int) -> float:
    """The p = 1e-4 critical value: the table, or Wilson-Hilferty's approximation past 9 dof."""
    if dof in CHI2_CRITICAL:
        return CHI2_CRITICAL[dof]
    return dof * (1 - 2 / (9 * dof) + 3.719 * math.sqrt(2 / (9 * dof))) ** 3


def hf_probs(logits, temperature=1.0, top_k=0, top_p=1.0, suppress=()):
    """The distribution HF's processors sample from: suppress, temperature, top-k, top-p, softmax."""
    scores = logits.clone()[None].float()
    scores[:, list(suppress)] = float("-inf")
    scores = scores / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0].double()


def chi_square(counts, probs, draws):
    support = probs > 0
    expected = probs[support] * draws
    stat = ((counts[support].double() - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum()) - 1


@pytest.mark.parametrize("case", [
    dict(temperature=1.0),
    dict(temperature=0.6, block=4),        # blocks of 4 over 10 tokens: two full blocks and a tail
    dict(temperature=1.3, block=3, suppress=(0, 7)),  # the two most likely tokens never come out
    dict(temperature=1.0, top_k=4, block=4),
    dict(temperature=0.8, top_p=0.7),
    dict(temperature=1.0, top_k=6, top_p=0.9, suppress=(3,), block=2),
])
def test_sampled_frequencies_match_the_softmax(case):
    case = dict(case)
    block = case.pop("block", 1024)
    suppress = case.get("suppress", ())
    probs = hf_probs(LOGITS, **case)
    generator = torch.Generator().manual_seed(1234)
    tokens, logp = next_tokens(LOGITS.expand(DRAWS, -1), temperature=case["temperature"],
                               top_k=case.get("top_k", 0), top_p=case.get("top_p", 1.0),
                               suppress=list(suppress) or None, generator=generator, block=block, chunk_rows=50_000)
    counts = torch.bincount(tokens, minlength=LOGITS.numel())
    assert (counts[probs == 0] == 0).all(), f"a token outside the support was drawn: {counts.tolist()}"
    stat, dof = chi_square(counts, probs, DRAWS)
    assert stat < chi2_critical(dof), (stat, dof, counts.tolist(), (probs * DRAWS).tolist())
    full = torch.log_softmax(LOGITS / case["temperature"], -1)  # unfiltered, unsuppressed
    torch.testing.assert_close(logp, full[tokens], rtol=0, atol=1e-6)


def test_inverse_cdf_never_draws_a_zero_weight_token_even_at_the_edges():
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0],
                            [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    for u in (0.0, 1e-300, 1 / 3, 0.5, 1 - 2**-53):
        for block in (1, 2, 3, 1024):
            tokens, total = inverse_cdf_sample(weights, torch.full((3,), u, dtype=torch.float64), block)
            assert (weights.gather(1, tokens[:, None]) > 0).all(), (u, block, tokens)
            assert total.tolist() == [3.0, 5.0, 3.0]
    tokens, _ = inverse_cdf_sample(weights[:1], torch.tensor([0.34], dtype=torch.float64), 2)
    assert tokens.item() == 4, "u past the first third of the mass lands on the second token"


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.3), (50, 1.0), (50, 0.95), (0, 0.999999)])
def test_filters_keep_what_hf_warpers_keep(top_k, top_p):
    generator = torch.Generator().manual_seed(0)
    # peaked rows (top-p's 1024-token fast path) and flat rows (its full-sort path)
    scores = torch.cat([torch.randn(4, 5000, generator=generator) * 6, torch.randn(4, 5000, generator=generator) * 0.1])
    ours = filter_top_k_top_p_(scores.clone(), top_k, top_p)
    theirs = scores.clone()
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], scores[~torch.isinf(ours)])


def test_greedy_is_the_suppressed_argmax_and_logp_the_full_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=generator)
    winners = logits.argmax(-1)
    tokens, logp = next_tokens(logits, greedy=True, temperature=0.7, suppress=winners[:2].tolist())
    masked = logits.clone()
    masked[:, winners[:2]] = float("-inf")
    assert torch.equal(tokens, masked.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits / 0.7, -1).gather(1, tokens[:, None]).squeeze(1),
                               rtol=0, atol=1e-6)


def test_rows_chunking_does_not_change_draws():
    logits = torch.randn(37, 2000, generator=torch.Generator().manual_seed(3)) * 2
    a = next_tokens(logits, temperature=0.9, generator=torch.Generator().manual_seed(5), chunk_rows=5)
    b = next_tokens(logits, temperature=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_real_vocabulary_cost_is_a_softmax_not_a_multinomial():
    """At V = 151,936 the draw costs about a softmax; not a benchmark, a guard against a regression
    to a V-sized random draw (bench/sampling.py has the numbers)."""
    import time

    logits = torch.randn(16, 151_936, generator=torch.Generator().manual_seed(0)) * 3

    def best(fn, repeat=5):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda: next_tokens(logits, temperature=1.0))
    multinomial = best(lambda: torch.multinomial(torch.softmax(logits, -1), 1), 3)
    assert ours < multinomial, (ours, multinomial)
    assert math.isfinite(ours)


def test_a_dominant_suppressed_token_and_underflowing_logprobs():
    """When a suppressed token takes all the fp32 mass, the draw renormalises over the allowed ones,
    and log-probs below fp32's normal range are still exact."""
    logits = torch.zeros(4, 50)
    logits[:, 7] = 1000.0  # suppressed: every other token's softmax probability underflows to 0
    logits[:, 3] = 1.0
    tokens, logp = next_tokens(logits, temperature=1.0, suppress=[7], generator=torch.Generator().manual_seed(0))
    assert (tokens != 7).all()
    exact = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None]).squeeze(1).float()
    torch.testing.assert_close(logp, exact, rtol=1e-6, atol=1e-4)
    counts = torch.bincount(next_tokens(logits[:1].expand(20_000, -1), suppress=[7],
                                        generator=torch.Generator().manual_seed(1))[0], minlength=50)
    expected = torch.softmax(logits[0].index_fill(0, torch.tensor([7]), float("-inf")).double(), -1) * 20_000
    stat, dof = chi_square(counts, expected / 20_000, 20_000)
    assert stat < chi2_critical(dof), (stat, dof)


MEASURE_SCRATCH = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from e2e_step import map_large_blocks_directly, release_free_heap
from kernels_cpu_memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from lmmr1_lite.sampling import next_tokens
map_large_blocks_directly()  # every large block mapped and unmapped: the peak counts live tensors
rows, vocab, out = 64, 151936, []
for temperature, top_k, top_p in json.loads(sys.argv[2]):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).mul_(3).bfloat16()
    peaks = []
    for _ in range(2):  # the second call: nothing first-time (allocator, thread pools) in it
        release_free_heap()
        before = rss_bytes()
        reset_peak_rss()
        next_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, chunk_rows=rows)
        peaks.append(peak_rss_bytes() - before)
    out.append(peaks[-1] / (rows * vocab))
print(json.dumps(out))
"""


def test_the_planners_sampling_scratch_is_what_the_sampler_allocates():
    """`scratch_bytes_per_logit` (the planner's decode-step term) against the peak resident set of one
    `next_tokens` call over 64 rows of Qwen's vocabulary in one chunk, as on CUDA, measured in a process of
    its own: within 10 % for the plain softmax, a temperature, top-k, and top-p through the whole-row sort
    (random logits: the 1,024 likeliest tokens hold less than top_p)."""
    import json
    import subprocess
    import sys

    from lmmr1_lite.config import REPO_ROOT
    from lmmr1_lite.sampling import scratch_bytes_per_logit

    settings = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 50, 1.0), (1.0, 0, 0.9)]
    done = subprocess.run([sys.executable, "-c", MEASURE_SCRATCH, str(REPO_ROOT / "bench"), json.dumps(settings)],
                          check=True, capture_output=True, text=True)
    measured = json.loads(done.stdout.splitlines()[-1])
    planned = [scratch_bytes_per_logit(*setting) for setting in settings]
    assert planned == [8, 12, 16, 36]
    for setting, got, plan in zip(settings, measured, planned):
        assert 0.9 * plan <= got <= 1.1 * plan, (setting, got, plan)
