"""Per-token log-probabilities straight from hidden states and the LM head.

    logp[n] = log_softmax(hidden[n] @ weight.T / temperature + bias)[targets[n]]

The `[tokens, vocab]` logits (vocab 151,936 for Qwen2.5) are never materialised
whole: token rows are processed in chunks whose logits block fits a byte budget
(`chunk_bytes`, default `DEFAULT_CHUNK_BYTES`), so peak extra memory is that
budget (twice it on the torch path, which keeps a scratch block), not
O(tokens * vocab). The block is fp32, except on the Triton path with a frozen
bf16/fp16 head and no bias, where it stays in the GEMM's own dtype
(`logits_block_dtype`): the kernels widen each tile in registers and write the
gradient back in place in that dtype, which is what the grad-hidden GEMM takes.
Every chunk reads the whole LM head weight, so chunks of a few hundred rows run
much faster than a few dozen. Backward recomputes each chunk's logits (one extra GEMM)
instead of keeping them; under `torch.no_grad()` nothing is saved at all, which
is what the old-policy and reference passes need.

This file holds the pure-torch chunk kernels (the CPU path, and the reference
the Triton kernels are tested against) and the autograd Function; see
`grpo_loss.py` for the fused loss.
"""
from __future__ import annotations


import torch

from .backend import resolve_backend


# Bytes of one `[rows, vocab]` logits block (`logits_block_dtype`). CPU: `token_logprobs` of 1,024 rows, vocab 151,936,
# hidden 256, torch path, on the shared 2-core machine (2026-11-25, wall, median of 3, loaded by other
# jobs): 16-row chunks 11.2 s, 64 rows 4.5 s, 128 rows 3.3 s, 256 rows (148 MiB) 2.6 s, 512 rows
# 2.4-2.6 s, 1,024 rows 2.8 s; every chunk reads the whole LM head, so few large chunks win.
# CUDA: small next to the activations of a 3B/7B step, large enough for a compute-bound GEMM (H200, bf16,
# 2026-12-04: the GRPO loss at 8,192-16,384 tokens in 1.6-3.1x the LM head's bare GEMMs, 520 MiB extra).
DEFAULT_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 256 * 2**20}


def chunk_rows_for_bytes(num_rows: int, vocab_size: int, chunk_bytes: int | None = None,
                         device: torch.device | str | None = None, bytes_per_logit: int = 4) -> int:
    """Rows per chunk so that one `[rows, vocab]` block of `bytes_per_logit`-byte logits (4: fp32; 2: a
    bf16 block, `logits_block_dtype`) takes at most `chunk_bytes` (default: DEFAULT_CHUNK_BYTES for the
    device type): a power of two (fewer distinct GEMM shapes), at least 1, and no more than `num_rows` needs."""
    if chunk_bytes is None:
        kind = torch.device(device).type if device is not None else "cpu"
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(kind, DEFAULT_CHUNK_BYTES["cuda"])
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    rows = max(1, chunk_bytes // (bytes_per_logit * max(1, vocab_size)))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    return max(1, min(rows, num_rows))


def logits_block_dtype(backend: str, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """dtype of a call's logits block. fp32, except on the Triton path with a frozen bf16/fp16 head and no
    bias (a LoRA policy's LM head): there the block is the GEMM's own output, which the kernels read into
    fp32 registers, and the gradient they write back in place is rounded to that dtype, as the grad-hidden
    GEMM takes it anyway. So the numbers are those of an fp32 block, with a quarter of the bytes moved per
    logit beside the two GEMMs' own (2 read twice, 2 written: 6, where widening into fp32, reading it twice,
    writing the fp32 gradient and casting it back moved 24).
    A trained head keeps fp32 (its weight gradient sums the logits' gradient over tokens), and a bias is
    added after the widening as before."""
    half = weight.dtype in (torch.bfloat16, torch.float16)
    return weight.dtype if backend == "triton" and half and not weight.requires_grad and bias is None else torch.float32


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of one chunk: `hidden [n, H] @ weight[V, H].T (+ bias)` -> `[n, V]`, in float32 unless `out`
    is a block in the GEMM's own dtype (`logits_block_dtype`).

    The GEMM runs in the input dtype (bf16 tensor cores on GPU, fp32 accumulate). With `out` (a block
    reused across chunks) the result is written there: straight when the dtypes agree, else (a bf16 GEMM,
    an fp32 block) widened into it, so a call allocates its chunk blocks once, and a widened chunk adds
    only its GEMM's own half-size result while it is copied. Without `out`, a new fp32 tensor."""
    if out is None:
        logits = hidden @ weight.t()
        if bias is not None:
            logits = logits + bias
        return logits.float()
    out = out[: hidden.shape[0]]
    if hidden.dtype == weight.dtype == out.dtype:
        if bias is None:
            return torch.matmul(hidden, weight.t(), out=out)
        return torch.addmm(bias.to(out.dtype), hidden, weight.t(), out=out)
    out.copy_(hidden @ weight.t())
    if bias is not None:
        out.add_(bias)
    return out


def logits_block(rows: int, vocab: int, hidden: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A `[rows, vocab]` logits block on `hidden`'s device, reused by every chunk of a call."""
    return torch.empty(rows, vocab, dtype=dtype, device=hidden.device)


def chunk_buffers(rows: int, vocab: int, hidden: torch.Tensor, backend: str, dtype: torch.dtype = torch.float32):
    """The chunk-sized buffers a call reuses: the logits block in `dtype`, and an fp32 scratch block for the
    torch path (else None)."""
    return logits_block(rows, vocab, hidden, dtype), (logits_block(rows, vocab, hidden) if backend == "torch" else None)


def row_stats_torch(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                    with_entropy: bool = False, scratch: torch.Tensor | None = None):
    """Row statistics of one logits chunk `[n, V]` (fp32), `logits` left unchanged.

    Returns `(logp [n], lse [n], entropy [n] or None)` where `lse` is the log-sum-exp of the
    temperature-scaled row and `entropy` that of its softmax. Works in one scratch buffer."""
    inv_t = 1.0 / temperature
    shifted = torch.mul(logits, inv_t, out=scratch[: logits.shape[0]]) if scratch is not None else logits * inv_t
    row_max = shifted.amax(-1)  # [n]
    shifted.sub_(row_max[:, None])
    logp_unnormalised = shifted.gather(1, targets[:, None]).squeeze(1)  # z_target/T - max
    sum_exp = shifted.exp_().sum(-1)  # [n]
    log_sum = torch.log(sum_exp)
    lse = row_max + log_sum
    logp = logp_unnormalised - log_sum
    entropy = None
    if with_entropy:  # H = lse - sum_v p_v z_v / T
        expected = shifted.mul_(logits).sum(-1) * inv_t / sum_exp
        entropy = lse - expected
    return logp, lse, entropy


def softmax_grad_torch_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        grad_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Overwrite a logits chunk `[n, V]` with d(sum_n grad_logp[n] * logp[n]) / d logits.

    d logp / d z = (onehot(target) - softmax(z / T)) / T, so the chunk becomes
    `grad_logp[:, None] * (onehot - softmax) / T`. Written in place to keep one buffer."""
    scale = grad_logp / temperature  # [n]
    if temperature != 1.0:
        logits.div_(temperature)
    logits.sub_(lse[:, None]).exp_()  # softmax
    logits.mul_(-scale[:, None])
    logits.scatter_add_(1, targets[:, None], scale[:, None])
    return logits


# ----------------------------------------------------------------------------------------------
# Triton chunk kernels (CUDA; CPU only under TRITON_INTERPRET=1 in tests). One program per token
# row streams the row's V logits in BLOCK_V tiles, so a row is read once for the statistics and
# once more for the gradient, and nothing of size V is ever allocated besides the chunk itself.
# ----------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # torch path only
    triton = None

if triton is not None:
    @triton.jit
    def _row_stats_kernel(logits_ptr, targets_ptr, logp_ptr, lse_ptr, entropy_ptr,
                          stride_row, vocab_size, inv_temperature,
                          WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        # Online max / sum-exp (and sum of p*z for the entropy) over this row's vocab tiles.
        running_max = -float("inf")
        running_sum = 0.0
        running_dot = 0.0
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < vocab_size, other=-float("inf")).to(tl.float32)
            z = z * inv_temperature
            new_max = tl.maximum(running_max, tl.max(z, 0))
            rescale = tl.exp(running_max - new_max)
            e = tl.exp(z - new_max)
            running_sum = running_sum * rescale + tl.sum(e, 0)
            if WITH_ENTROPY:
                running_dot = running_dot * rescale + tl.sum(e * tl.where(cols < vocab_size, z, 0.0), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target = tl.load(targets_ptr + row)
        target_logit = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
        tl.store(logp_ptr + row, target_logit - lse)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, lse - running_dot / running_sum)

    @triton.jit
    def _rounded_for(x, ptr):
        """fp32 `x` in the dtype `ptr` points to, rounded to nearest (ties to even) as torch's `.to()` rounds.
        bf16 is rounded on the bits first: the GPU's conversion rounds to nearest even, but Triton's
        interpreter (the CPU tests) truncates, so this keeps the two paths equal to torch's."""
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _softmax_grad_kernel(logits_ptr, targets_ptr, lse_ptr, grad_logp_ptr,
                             stride_row, vocab_size, inv_temperature, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        lse = tl.load(lse_ptr + row)
        scale = tl.load(grad_logp_ptr + row) * inv_temperature
        target = tl.load(targets_ptr + row)
        # Overwrite this row with scale * (onehot(target) - softmax), tile by tile.
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < vocab_size
            z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
            grad = -scale * tl.exp(z - lse)
            grad = tl.where(cols == target, grad + scale, grad)
            tl.store(row_ptr + cols, _rounded_for(grad, logits_ptr), mask=valid)


def _block_v(vocab_size: int) -> int:
    return min(4096, triton.next_power_of_2(vocab_size))


def row_stats_triton(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     with_entropy: bool = False):
    """Triton twin of `row_stats_torch` for a chunk `[n, V]` (fp32, or the GEMM's bf16/fp16: read into fp32)."""
    num_rows, vocab_size = logits.shape
    logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else lse  # dummy pointer when unused
    if num_rows:
        _row_stats_kernel[(num_rows,)](logits, targets, logp, lse, entropy, logits.stride(0), vocab_size,
                                       1.0 / temperature, WITH_ENTROPY=with_entropy,
                                       BLOCK_V=_block_v(vocab_size))
    return logp, lse, (entropy if with_entropy else None)


def softmax_grad_triton_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                         grad_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Triton twin of `softmax_grad_torch_`: overwrites the chunk with its gradient, computed in fp32 and
    stored in the chunk's dtype."""
    num_rows, vocab_size = logits.shape
    if num_rows:
        _softmax_grad_kernel[(num_rows,)](logits, targets, lse.contiguous(), grad_logp.contiguous(),
                                          logits.stride(0), vocab_size, 1.0 / temperature,
                                          BLOCK_V=_block_v(vocab_size))
    return logits


def row_stats(backend: str, logits, targets, temperature: float, with_entropy: bool = False, scratch=None):
    """Dispatch `row_stats` to the torch or Triton chunk kernel (Triton needs no scratch)."""
    if backend == "triton":
        return row_stats_triton(logits, targets, temperature, with_entropy)
    return row_stats_torch(logits, targets, temperature, with_entropy, scratch)


def softmax_grad_(backend: str, logits, targets, lse, grad_logp, temperature: float):
    """Dispatch `softmax_grad_` to the torch or Triton chunk kernel."""
    if backend == "triton":
        return softmax_grad_triton_(logits, targets, lse, grad_logp, temperature)
    return softmax_grad_torch_(logits, targets, lse, grad_logp, temperature)


def accumulate_input_grads(grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                           grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None,
                           grad_bias: torch.Tensor | None, rows: slice) -> None:
    """Chain one chunk's logits gradient `[n, V]` into hidden, weight and bias gradients."""
    if grad_hidden is not None:
        grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(grad_hidden.dtype)
    if grad_weight is not None:  # fp32 accumulation, only when the LM head is trained
        grad_weight.addmm_(grad_logits.t(), hidden[rows].float())
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, backend):
        num_rows = hidden.shape[0]
        logp = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        logits_buffer, scratch = chunk_buffers(min(chunk_rows, num_rows), weight.shape[0], hidden, backend,
                                               logits_block_dtype(backend, weight, bias))
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_rows))
            logits = chunk_logits(hidden[rows], weight, bias, out=logits_buffer)
            logp[rows], lse[rows], _ = row_stats(backend, logits, targets[rows], temperature, scratch=scratch)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_rows, ctx.backend = temperature, chunk_rows, backend
        ctx.mark_non_differentiable(lse)
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_logp = grad_logp.float().contiguous()
        logits_buffer = logits_block(min(ctx.chunk_rows, hidden.shape[0]), weight.shape[0], hidden,
                                     logits_block_dtype(ctx.backend, weight, bias))
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, hidden.shape[0]))
            logits = chunk_logits(hidden[rows], weight, bias, out=logits_buffer)
            grad_logits = softmax_grad_(ctx.backend, logits, targets[rows], lse[rows], grad_logp[rows],
                                        ctx.temperature)
            accumulate_input_grads(grad_logits, hidden, weight, grad_hidden, grad_weight, grad_bias, rows)
        return (grad_hidden,
                grad_weight.to(weight.dtype) if need_w else None,
                grad_bias.to(bias.dtype) if need_b else None,
                None, None, None, None)


def flatten_inputs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor):
    """`hidden [B, T, H]` or `[N, H]`, `targets [B, T]` or `[N]` -> contiguous 2-D/1-D views."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on the token dims")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != weight's {weight.shape[1]}")
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), targets.reshape(-1).long().contiguous()


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, bias: torch.Tensor | None = None, *,
                   backend: str = "auto", chunk_rows: int | None = None,
                   chunk_bytes: int | None = None) -> torch.Tensor:
    """log_softmax(hidden @ weight.T / temperature)[targets] as float32, shaped like `targets`.

    hidden [B, T, H] or [N, H]; weight [V, H]; targets [B, T] or [N] (int64).
    Differentiable w.r.t. `hidden`, and `weight`/`bias` when they require grad.
    backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    Chunks: `chunk_rows` rows if given, else as many as one `[rows, V]` block (`logits_block_dtype`) of
    `chunk_bytes` holds (default DEFAULT_CHUNK_BYTES for the device). Chunking never changes the result."""
    flat_hidden, flat_targets = flatten_inputs(hidden, targets, weight)
    backend = resolve_backend(backend, flat_hidden)
    rows = chunk_rows or chunk_rows_for_bytes(flat_hidden.shape[0], weight.shape[0], chunk_bytes, flat_hidden.device,
                                              logits_block_dtype(backend, weight, bias).itemsize)
    logp, _ = TokenLogprobsFunction.apply(flat_hidden, weight, bias, flat_targets, float(temperature), rows, backend)
    return logp.view(targets.shape)
