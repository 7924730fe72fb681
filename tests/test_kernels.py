"""lmmr1_kernels against a float64 torch reference (full logits), torch and Triton (interpreted) paths.

`LMMR1_TEST_DEVICE=cuda` (with `TRITON_INTERPRET=0`) runs the same tests on a GPU, compiled Triton, with
LMM-R1-sized shapes added at the real vocabulary (bench/gpu_check.py does this; every test here is marked
`device`: conftest.py's `on_test_device` puts its tensors there)."""
import importlib

import pytest
import torch

from conftest import TEST_DEVICE as DEVICE
from conftest import Draws
from lmmr1_kernels import grpo_loss, token_logprobs

pytestmark = pytest.mark.device

# dtype -> max relative error ||out - ref|| / ||ref|| (style.md's numerics note)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
BACKENDS = ["torch", "triton"]
# Qwen2.5's real vocabulary at a tiny shape, and on a GPU also at the 3B's hidden size over 1,024 tokens
REAL_VOCAB_SHAPES = [(1, 3, 8, 151_936)] + ([(2, 512, 2048, 151_936)] if DEVICE.type != "cpu" else [])


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def reference_logprobs(hidden, weight, targets, temperature, bias=None):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)


def reference_grpo(hidden, weight, targets, mask, adv, old, ref, beta, eps_low, eps_high, temperature, loss_agg,
                   logits_dtype=None):
    """Straightforward float64 GRPO loss from full logits, written independently of the kernels.
    `logits_dtype`: the logits rounded to it first, as a GEMM in that dtype writes them (the kernels' bf16 path)."""
    logits = hidden.double() @ weight.double().t()
    if logits_dtype is not None:
        logits = logits + (logits.detach().to(logits_dtype).double() - logits.detach())  # the gradient stays exact
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    old = logp.detach() if old is None else old.double()
    ratio = torch.exp(logp - old)
    a = adv.double()[:, None]
    pg = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    if ref is not None and beta != 0:
        kl = torch.exp(ref.double() - logp) - (ref.double() - logp) - 1
    else:
        kl = torch.zeros_like(logp)
    m = mask.double()
    loss = reference_aggregate(pg + beta * kl, m, loss_agg)
    n = m.sum()
    metrics = {"kl": (kl * m).sum() / n, "ratio": (ratio * m).sum() / n, "entropy": (entropy * m).sum() / n,
               "clip_low": (((a < 0) & (ratio < 1 - eps_low)).double() * m).sum() / n,
               "clip_high": (((a > 0) & (ratio > 1 + eps_high)).double() * m).sum() / n}
    return loss, metrics


def reference_aggregate(per_token, m, loss_agg):
    """The batch loss from per-token losses `[B, T]` and the float mask, by `loss_agg`."""
    if loss_agg == "token_mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if loss_agg == "seq_mean_token_mean":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    return (per_token * m).sum() / (m.shape[0] * m.shape[1])


def make_inputs(B, T, H, V, dtype, seed=0, weight_grad=True):
    g = Draws(seed, DEVICE if V * H > 2**24 else "cpu")  # only a GPU runs a head this large
    hidden = (g.randn(B, T, H) * 1.0).to(dtype).requires_grad_()
    # logits of std ~2 at small H, ~4 at a real model's width (as a trained LM head gives), not sqrt(H) / 2
    weight = (g.randn(V, H) * (0.5 if H <= 64 else 4 / H ** 0.5)).to(dtype).requires_grad_(weight_grad)
    targets = g.randint(0, V, (B, T))
    return hidden, weight, targets


# a grid of small shapes (N not a multiple of the chunk, V not a power of two) x dtype x temperature,
# plus Qwen2.5's real vocabulary once per backend and dtype
GRID = [(shape, dtype, t) for shape in [(2, 7, 16, 1000), (3, 5, 32, 257)]
        for dtype in (torch.float32, torch.bfloat16) for t in (1.0, 0.7)] + [
            (shape, dtype, 1.0) for shape in REAL_VOCAB_SHAPES for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dtype,temperature", GRID, ids=[
    f"{'real_vocab-' if shape[3] == 151_936 else ''}{'x'.join(map(str, shape))}-{str(dtype)[6:]}-t{t}"
    for shape, dtype, t in GRID])
def test_token_logprobs_matches_float64(backend, shape, dtype, temperature):
    B, T, H, V = shape
    hidden, weight, targets = make_inputs(B, T, H, V, dtype)
    logp = token_logprobs(hidden, weight, targets, temperature, backend=backend, chunk_rows=4)
    ref = reference_logprobs(hidden, weight, targets, temperature)
    assert logp.dtype == torch.float32 and logp.shape == (B, T)
    assert rel_err(logp, ref) < TOLERANCE[dtype]
    upstream = Draws(1).randn(B, T, dtype=torch.float64)
    logp.backward(upstream.float())
    ref_hidden, ref_weight = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    reference_logprobs(ref_hidden, ref_weight, targets, temperature).backward(upstream)
    # grad_hidden = W[target] - sum_v p_v W[v]: an fp32 sum over V terms, whose rounding grows like sqrt(V) x
    # fp32's epsilon (measured up to 2.1e-5 at V = 151,936, H = 8, with random upstream gradients)
    grad_tolerance = TOLERANCE[dtype] * 2 + V ** 0.5 * 1.2e-7
    assert rel_err(hidden.grad, ref_hidden.grad) < grad_tolerance
    assert rel_err(weight.grad, ref_weight.grad) < grad_tolerance


def test_token_logprobs_with_bias_and_flat_inputs():
    hidden, weight, targets = make_inputs(1, 9, 16, 300, torch.float32)
    bias = torch.randn(300, requires_grad=True)
    logp = token_logprobs(hidden[0], weight, targets[0], bias=bias, backend="torch", chunk_rows=4)
    ref = reference_logprobs(hidden[0], weight, targets[0], 1.0, bias)
    assert logp.shape == (9,) and rel_err(logp, ref) < 1e-5
    logp.sum().backward()
    bias_ref = bias.detach().double().requires_grad_()
    reference_logprobs(hidden[0].detach(), weight.detach(), targets[0], 1.0, bias_ref).sum().backward()
    assert rel_err(bias.grad, bias_ref.grad) < 1e-5


def test_no_grad_keeps_no_graph_and_frozen_weight_gets_no_grad():
    hidden, weight, targets = make_inputs(2, 4, 8, 50, torch.float32, weight_grad=False)
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets, backend="torch")
    assert logp.grad_fn is None and not logp.requires_grad
    token_logprobs(hidden, weight, targets, backend="torch").sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True])
def test_grpo_loss_matches_float64(backend, loss_agg, beta, with_old):
    B, T, H, V = 4, 6, 16, 333
    hidden, weight, targets = make_inputs(B, T, H, V, torch.float32, seed=1)
    g = Draws(2)
    mask = (g.rand(B, T) > 0.3).long()
    mask[0] = 0  # a fully masked (padded) row
    mask[1, :3] = 1
    adv = torch.tensor([0.5, -1.2, 1.0, -0.3])
    with torch.no_grad():
        base = reference_logprobs(hidden, weight, targets, 0.9).float()
    # old log-probs far enough from the current ones that both clip sides are active
    old = (base + g.randn(B, T) * 0.5) if with_old else None
    ref = base + g.randn(B, T) * 0.3
    loss, metrics = grpo_loss(hidden, weight, targets, mask, adv, old, ref, beta=beta, epsilon_low=0.2,
                              epsilon_high=0.28, temperature=0.9, loss_agg=loss_agg, backend=backend, chunk_rows=5)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_loss, ref_metrics = reference_grpo(h64, w64, targets, mask, adv, old, ref, beta, 0.2, 0.28, 0.9, loss_agg)
    assert rel_err(loss, ref_loss) < 1e-5
    for key, value in ref_metrics.items():
        assert abs(metrics[key].item() - value.item()) < 1e-4 * max(1.0, abs(value.item())), key
    if with_old:
        assert ref_metrics["clip_low"] > 0 and ref_metrics["clip_high"] > 0, "test must exercise both clip sides"
    loss.backward()
    ref_loss.backward()
    assert rel_err(hidden.grad, h64.grad) < 1e-4
    assert rel_err(weight.grad, w64.grad) < 1e-4
    assert hidden.grad[0].abs().sum() == 0, "a fully masked row gets no gradient"


def test_grpo_loss_bf16_close_to_float64():
    hidden, weight, targets = make_inputs(3, 5, 32, 1000, torch.bfloat16, seed=3)
    mask = torch.ones(3, 5, dtype=torch.long)
    adv = torch.tensor([1.0, -0.5, 0.25])
    loss, _ = grpo_loss(hidden, weight, targets, mask, adv, backend="torch")
    ref_loss, _ = reference_grpo(hidden.detach().double().requires_grad_(), weight.detach().double(), targets, mask,
                                 adv, None, None, 0.0, 0.2, 0.2, 1.0, "token_mean")
    assert rel_err(loss, ref_loss) < 1e-2
    loss.backward()
    assert torch.isfinite(hidden.grad.float()).all() and hidden.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", REAL_VOCAB_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grpo_loss_at_real_vocab(backend, shape, dtype):
    """The GRPO loss with old and reference log-probs (beta > 0) at Qwen's vocabulary, forward and backward, against
    the float64 reference from the logits the kernels' GEMM writes (rounded to `dtype`): the clip is discontinuous,
    and in bf16 at 2 x 512 tokens, H = 2,048 the unrounded reference's clip decisions differ on enough tokens that
    the hidden gradient's error was 0.176 on the H200, both paths alike (2026-12-04)."""
    B, T, H, V = shape
    hidden, weight, targets = make_inputs(B, T, H, V, dtype, seed=8, weight_grad=False)  # a frozen head (LoRA)
    g = Draws(9)
    mask = (g.rand(B, T) > 0.2).long()
    adv = g.randn(B)
    with torch.no_grad():
        base = reference_logprobs(hidden, weight, targets, 1.0).float()
    old, ref = base + 0.3 * g.randn(B, T), base + 0.3 * g.randn(B, T)
    loss, _ = grpo_loss(hidden, weight, targets, mask, adv, old, ref, beta=0.04, backend=backend)
    h64 = hidden.detach().double().requires_grad_()
    ref_loss, _ = reference_grpo(h64, weight.detach().double(), targets, mask, adv, old, ref, 0.04, 0.2, 0.2, 1.0,
                                 "token_mean", logits_dtype=dtype)
    assert rel_err(loss, ref_loss) < TOLERANCE[dtype]
    loss.backward()
    ref_loss.backward()
    assert hidden.grad.dtype == dtype and rel_err(hidden.grad, h64.grad) < TOLERANCE[dtype] * 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", [{}, {"importance_sampling_level": "sequence", "top_entropy_quantile": 0.5}],
                         ids=["token", "gspo-top-entropy"])
def test_every_output_element_is_written(backend, objective, monkeypatch):
    """Poison every buffer the kernels allocate (NaN) and check that no element is left unwritten."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def poisoned_like(t, **kwargs):
        out = real_empty_like(t, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    hidden, weight, targets = make_inputs(3, 7, 16, 301, torch.float32, seed=4)
    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "empty_like", poisoned_like)
    logp = token_logprobs(hidden, weight, targets, 1.3, backend=backend, chunk_rows=4)
    logp.sum().backward()
    loss, metrics = grpo_loss(hidden, weight, targets, torch.ones_like(targets), torch.randn(3, device=DEVICE),
                              beta=0.1,
                              ref_logprobs=logp.detach(), backend=backend, chunk_rows=4, **objective)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(logp).all() and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert rel_err(logp, reference_logprobs(hidden, weight, targets, 1.3)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_loss_under_no_grad_computes_the_loss_without_the_gradient(backend, monkeypatch):
    """Under `torch.no_grad()` no backward can follow, so the pass writes no gradient (the chunks' softmax
    gradient and the grad-hidden GEMM are skipped) and gives the same loss and metrics."""
    grpo_module = importlib.import_module("lmmr1_kernels.grpo_loss")
    hidden, weight, targets = make_inputs(2, 6, 16, 300, torch.float32, seed=13)
    mask, adv = torch.ones(2, 6, dtype=torch.long), torch.tensor([1.0, -1.0])
    calls = []
    real = grpo_module.softmax_grad_
    monkeypatch.setattr(grpo_module, "softmax_grad_", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_grad = grpo_loss(hidden, weight, targets, mask, adv, beta=0.04, ref_logprobs=torch.zeros(2, 6),
                          backend=backend, chunk_rows=4)
    assert calls, "a pass that can be differentiated writes the gradient"
    calls.clear()
    with torch.no_grad():
        without = grpo_loss(hidden, weight, targets, mask, adv, beta=0.04, ref_logprobs=torch.zeros(2, 6),
                            backend=backend, chunk_rows=4)
    assert not calls and not without[0].requires_grad
    assert torch.equal(without[0], with_grad[0].detach())
    assert all(torch.equal(without[1][k], with_grad[1][k]) for k in with_grad[1])


def test_shape_errors_are_clear():
    hidden, weight, targets = make_inputs(2, 4, 8, 50, torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(hidden, weight, targets[:, :3])
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(hidden, weight, targets, torch.ones_like(targets), torch.ones(3))


def test_grpo_loss_backward_scales_by_upstream_gradient():
    hidden, weight, targets = make_inputs(2, 5, 16, 200, torch.float32, seed=5)
    mask, adv = torch.ones(2, 5), torch.tensor([1.0, -2.0])
    grpo_loss(hidden, weight, targets, mask, adv, backend="torch")[0].backward()
    unit = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (grpo_loss(hidden, weight, targets, mask, adv, backend="torch")[0] * -3.0).backward()
    assert torch.allclose(hidden.grad, -3 * unit[0]) and torch.allclose(weight.grad, -3 * unit[1])


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_bf16_chunk_is_widened_into_the_reused_buffer(with_bias):
    """chunk_logits with `out`: a bf16 chunk's logits are the bf16 GEMM widened into the fp32 buffer itself (its
    storage, its first n rows), so a chunk holds one fp32 block, not a second one beside an unused buffer
    (bench/kernels_cpu_memory.py --dtype bfloat16: 534.5 -> 386.0 MiB at N=512, H=896, V=151,936)."""
    from lmmr1_kernels.logprobs import chunk_logits

    draws = Draws(5)
    hidden, weight = draws.randn(6, 16).bfloat16(), draws.randn(40, 16).bfloat16()
    bias = draws.randn(40).bfloat16() if with_bias else None
    buffer = torch.full((8, 40), float("nan"))
    logits = chunk_logits(hidden, weight, bias, out=buffer)
    assert logits.dtype == torch.float32 and logits.shape == (6, 40)
    assert logits.data_ptr() == buffer.data_ptr()
    expected = (hidden @ weight.t()).float() + (bias.float() if with_bias else 0)
    assert torch.equal(logits, expected)
    unbuffered = chunk_logits(hidden, weight, bias)  # without a buffer: a new tensor (a bias added in bf16 there)
    assert unbuffered.data_ptr() != buffer.data_ptr()
    assert torch.allclose(unbuffered, expected, rtol=1e-2, atol=1e-2)


def test_the_logits_block_is_fp32_unless_a_frozen_half_precision_head_runs_on_triton():
    from lmmr1_kernels.logprobs import logits_block_dtype

    frozen = torch.zeros(4, 2, dtype=torch.bfloat16)
    assert logits_block_dtype("triton", frozen, None) == torch.bfloat16
    assert logits_block_dtype("triton", frozen.half(), None) == torch.float16
    assert logits_block_dtype("torch", frozen, None) == torch.float32, "the torch path computes in the block"
    assert logits_block_dtype("triton", frozen.float(), None) == torch.float32
    assert logits_block_dtype("triton", frozen.clone().requires_grad_(), None) == torch.float32, "a trained head"
    assert logits_block_dtype("triton", frozen, torch.zeros(4, dtype=torch.bfloat16)) == torch.float32, "a bias"


@pytest.mark.parametrize("objective", [{}, {"importance_sampling_level": "sequence", "top_entropy_quantile": 0.5}],
                         ids=["token", "gspo-top-entropy"])
def test_a_frozen_bf16_head_on_triton_keeps_its_block_in_bf16_with_the_fp32_blocks_numbers(objective, monkeypatch):
    """On the Triton path a frozen bf16 head's logits block is the GEMM's bf16 output, read into fp32 by the
    kernels and overwritten in place by the gradient in bf16: no fp32 block and no bf16 copy of the gradient,
    and the log-probs, loss, metrics and hidden gradient are exactly those of the fp32 block (the GEMM's bf16
    widened, the gradient computed in fp32 and rounded to bf16 for the grad-hidden GEMM either way)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    grpo_module = importlib.import_module("lmmr1_kernels.grpo_loss")  # the package's `grpo_loss` is the function
    logprobs_module = importlib.import_module("lmmr1_kernels.logprobs")

    B, T, H, V, chunk = 2, 5, 16, 1000, 4
    hidden, weight, targets = make_inputs(B, T, H, V, torch.bfloat16, seed=11, weight_grad=False)
    g = Draws(12)
    mask, adv = (g.rand(B, T) > 0.2).long(), g.randn(B)
    old = reference_logprobs(hidden, weight, targets, 0.8).float().detach() + 0.3 * g.randn(B, T)

    class BlockSized(TorchDispatchMode):  # the dtypes of the tensors of a logits block's size the call makes
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel() >= chunk * V:
                    self.dtypes.append(tensor.dtype)
            return out

    def run():
        h = hidden.detach().clone().requires_grad_()
        with BlockSized() as seen:
            logp = token_logprobs(h, weight, targets, 0.8, backend="triton", chunk_rows=chunk)
            logp.sum().backward()
            grad_logprobs = h.grad.clone()
            h.grad = None
            loss, metrics = grpo_loss(h, weight, targets, mask, adv, old, logp.detach() - 0.1, beta=0.04,
                                      temperature=0.8, backend="triton", chunk_rows=chunk, **objective)
            loss.backward()
        return [logp, grad_logprobs, loss, *metrics.values(), h.grad], seen.dtypes

    bf16_block, bf16_dtypes = run()
    assert bf16_dtypes and set(bf16_dtypes) == {torch.bfloat16}, "no fp32 block, no second bf16 copy"
    fp32 = lambda *args: torch.float32  # noqa: E731  the path before: an fp32 block
    monkeypatch.setattr(logprobs_module, "logits_block_dtype", fp32)
    monkeypatch.setattr(grpo_module, "logits_block_dtype", fp32)
    fp32_block, fp32_dtypes = run()
    assert torch.float32 in fp32_dtypes and len(fp32_dtypes) > len(bf16_dtypes)
    for ours, before in zip(bf16_block, fp32_block):
        assert torch.equal(ours, before)
    assert bf16_block[-1].abs().sum() > 0


AHEAD_OF_TIME = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lmmr1_kernels import logprobs

common = {"targets_ptr": "*i64", "stride_row": "i32", "vocab_size": "i32", "inv_temperature": "fp32"}
kernels = {"_row_stats_kernel": ({"logp_ptr": "*fp32", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                                  "WITH_ENTROPY": "constexpr", "BLOCK_V": "constexpr"},
                                 {"WITH_ENTROPY": True, "BLOCK_V": 4096}),
           "_softmax_grad_kernel": ({"lse_ptr": "*fp32", "grad_logp_ptr": "*fp32", "BLOCK_V": "constexpr"},
                                    {"BLOCK_V": 4096})}
done = []
for name, (extra, constexprs) in kernels.items():
    fn = getattr(logprobs, name)
    for block in ("*fp32", "*bf16", "*fp16"):  # the logits block's dtypes (logprobs.logits_block_dtype)
        signature = {arg: {"logits_ptr": block, **common, **extra}[arg] for arg in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        done.append([name, block, "cubin" in compiled.asm])
print(json.dumps(done))
"""


def test_the_triton_kernels_compile_for_the_h200_without_a_gpu():
    """Triton's compiler, ahead of time for sm_90 (the H200's Hopper), on each kernel and each logits block dtype:
    the interpreter the other tests run under takes code the GPU compiler refuses (a bad cast, a dtype test that is
    not a compile-time constant), and a failure found on the lent GPU costs its minutes (tests/test_kernels.py
    runs there in bench/gpu_check.py's kernels part)."""
    import json
    import os
    import subprocess
    import sys

    from lmmr1_lite.config import REPO_ROOT

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", AHEAD_OF_TIME], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode and "ptxas" in out.stderr.lower() and "not found" in out.stderr.lower():
        pytest.skip("this triton has no CUDA toolchain (ptxas) to compile with")
    assert out.returncode == 0, out.stderr[-2000:]
    done = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(done) == 6 and all(cubin for *_, cubin in done), done


def test_chunk_rows_follow_the_byte_budget():
    from lmmr1_kernels.logprobs import DEFAULT_CHUNK_BYTES, chunk_rows_for_bytes

    vocab = 151_936
    assert chunk_rows_for_bytes(4096, vocab, 256 * 2**20) == 256  # 441 rows fit: rounded down to a power of two
    assert chunk_rows_for_bytes(4096, vocab, 16 * 2**20) == 16
    assert chunk_rows_for_bytes(4096, vocab, 1) == 1
    assert chunk_rows_for_bytes(100, 71, 256 * 2**20) == 100, "never more rows than there are"
    assert chunk_rows_for_bytes(4096, vocab) == chunk_rows_for_bytes(4096, vocab, DEFAULT_CHUNK_BYTES["cpu"])
    assert chunk_rows_for_bytes(4096, vocab, device="cuda") * vocab * 4 <= DEFAULT_CHUNK_BYTES["cuda"]
    assert chunk_rows_for_bytes(4096, vocab, 256 * 2**20, bytes_per_logit=2) == 512, "a bf16 block: twice the rows"
    with pytest.raises(ValueError):
        chunk_rows_for_bytes(10, vocab, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_bytes_do_not_change_results(backend):
    """Log-probs, loss, metrics and gradients are the same whatever the chunk budget."""
    hidden, weight, targets = make_inputs(3, 11, 16, 257, torch.float32, seed=7)
    mask = (Draws(1).rand(3, 11) > 0.2).long()
    adv = torch.tensor([0.5, -1.0, 2.0])
    results = []
    for budget in (257 * 4, 257 * 4 * 5, 257 * 4 * 64, None):  # 1 row, 4 rows, all 33 rows, the default
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        logp = token_logprobs(h, w, targets, 0.9, backend=backend, chunk_bytes=budget)
        loss, metrics = grpo_loss(h, w, targets, mask, adv, ref_logprobs=logp.detach() - 0.1, beta=0.04,
                                  temperature=0.9, backend=backend, chunk_bytes=budget)
        loss.backward()
        results.append((logp.detach(), loss.detach(), torch.stack(list(metrics.values())), h.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
