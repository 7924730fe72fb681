"""Speed and peak memory of the GRPO loss from hidden states: naive torch, torch.compile, Liger, ours
(the token-level loss, and CISPO, GSPO and the top-20 % entropy tokens through the same kernels; on CUDA also
the token-level loss through an fp32 logits block, the path before 2026-12-05, for an A/B in one process).

For each shape (N tokens, H hidden, V vocab; bf16) and each implementation, measures forward,
backward and forward+backward time (`triton.testing.do_bench`, median) and the peak CUDA memory of
forward+backward beyond the inputs, plus the bare LM-head GEMMs (forward: 1 GEMM; backward for
hidden: 1 more) as the floor. The LM head is frozen (LoRA training), so no grad_weight anywhere.
Writes bench/out/loss_kernels.json and prints a table. (Not named kernels.py: a module `kernels` on
sys.path is taken by transformers and bitsandbytes for the Hugging Face `kernels` package.)

    python bench/loss_kernels.py                       # CUDA: Qwen2.5-VL-3B (H=2048) and 7B (H=3584), N=2K/8K/16K
    python bench/loss_kernels.py --smoke               # CPU: tiny shapes, perf_counter timing (checks the script runs)
    python bench/loss_kernels.py --shapes 8192x2048    # CUDA: chosen N x H (bench/gpu_check.py picks LMM-R1's)
    python bench/loss_kernels.py --shapes 8192x2048 --impls naive,lmmr1_kernels,lmmr1_fp32_block  # no compiles
    python bench/loss_kernels.py --shape 1024 256 32000  # CPU: one shape, perf_counter timing, fp32
The report is rewritten after each case, so a run stopped part-way keeps the cases it finished.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

from lmmr1_kernels import grpo_loss

V_QWEN = 151_936


def naive_loss(hidden, weight, targets, advantages, beta=0.0):
    logp = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    return -(torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)).mean()


def make_cases(device: str):
    cases = {"naive": lambda h, w, t, a, m: naive_loss(h, w, t, a[0])}
    if device == "cuda":
        compiled = torch.compile(naive_loss)
        cases["torch.compile"] = lambda h, w, t, a, m: compiled(h, w, t, a[0])
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=device == "cuda", loss_type="dapo")
        cases["liger"] = lambda h, w, t, a, m: liger(h[None], w, t[None], m, a)[0]
    except ImportError:
        pass
    backend = "triton" if device == "cuda" else "torch"
    for name, objective in OBJECTIVES.items():  # the GRPO family: same kernels, other coefficients
        cases[name] = lambda h, w, t, a, m, o=objective: grpo_loss(h[None], w, t[None], m, a, backend=backend, **o)[0]
    if device == "cuda":  # the token-level loss as it ran until 2026-12-05, the same numbers (tests/test_kernels.py)
        def fp32_block_loss(h, w, t, a, m):
            with fp32_logits_block():
                return grpo_loss(h[None], w, t[None], m, a, backend=backend)[0]
        cases[FP32_BLOCK] = fp32_block_loss
    return cases


@contextmanager
def fp32_logits_block():
    """The kernels with an fp32 logits block whatever the head (the path before 2026-12-05: a frozen bf16 head's
    GEMM result widened into it, the gradient cast back to bf16 for the grad-hidden GEMM), for an A/B in one
    process. The loss's gradient is computed in its forward, so the forward is all this must wrap."""
    modules = [importlib.import_module("lmmr1_kernels.logprobs"), importlib.import_module("lmmr1_kernels.grpo_loss")]
    saved = [module.logits_block_dtype for module in modules]
    for module in modules:
        module.logits_block_dtype = lambda *args: torch.float32
    try:
        yield
    finally:
        for module, rule in zip(modules, saved):
            module.logits_block_dtype = rule


# lmmr1_kernels' objectives, each timed beside the token-level loss from the same inputs (bench/gpu_check.py runs
# them at LMM-R1's shapes; GSPO and the entropy quantile rescale d logp / d hidden rows after the pass; each row's
# `vs_token_level` is its forward + backward time over the token-level loss's); their correctness against the
# float64 reference is tests/test_objectives.py's (on CUDA in gpu_check's kernels part). name -> grpo_loss kwargs.
TOKEN_LEVEL = "lmmr1_kernels"
OBJECTIVES = {TOKEN_LEVEL: {}, "lmmr1 cispo": {"loss_type": "cispo"},
              "lmmr1 gspo": {"importance_sampling_level": "sequence"}, "lmmr1 top-ent 0.2": {"top_entropy_quantile": 0.2}}
FP32_BLOCK = "lmmr1 fp32 block"  # CUDA: the token-level loss through an fp32 logits block (`fp32_logits_block`)


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=5, rep=30, return_mode="median")

    def cpu_bench(fn, reps: int = 3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return cpu_bench


def measure(name, fn, hidden, weight, targets, adv, mask, device, bench):
    def fwd():
        with torch.no_grad():
            return fn(hidden, weight, targets, adv, mask)

    def fwd_bwd():
        hidden.grad = None
        fn(hidden, weight, targets, adv, mask).backward()

    row = {"impl": name}
    try:
        row["fwd_ms"] = bench(fwd)
        row["fwd_bwd_ms"] = bench(fwd_bwd)
        try:  # the backward alone, again and again on one graph: torch.compile's backward donates its buffers
            # and refuses to run twice (torch 2.11 on the H200, 2026-12-04): then only f+b is timed
            loss = fn(hidden, weight, targets, adv, mask)
            row["bwd_ms"] = bench(lambda: loss.backward(retain_graph=True))
        except RuntimeError as err:
            row["bwd_note"] = f"backward alone not timed: {str(err).splitlines()[0][:120]}"
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as err:  # one implementation failing (an API change, a compile error) must not cost the rest
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}".splitlines()[0]
    return row


def gemm_floor(hidden, weight, bench) -> tuple[float, float]:
    """The LM head's bare GEMMs: forward (hidden @ W.T) and the backward one for hidden (dlogits @ W)."""
    grad_logits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)
    return bench(lambda: hidden @ weight.t()), bench(lambda: grad_logits @ weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script runs")
    parser.add_argument("--shapes", default=None, metavar="NxH,...",
                        help="tokens x hidden sizes at Qwen's vocabulary (default: 3B and 7B at N = 2K/8K/16K)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("N", "H", "V"),
                        help="one shape instead of the default grid; on CPU (no GPU, or with --smoke) timed with "
                             "perf_counter, fp32")
    parser.add_argument("--impls", default=None, metavar="NAME,...",
                        help="only these implementations (names as in the table, spaces or underscores alike), e.g. "
                             "'naive,lmmr1_kernels,lmmr1_fp32_block' for the logits block's A/B without the compiles")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "loss_kernels.json"))
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not (args.smoke or args.shape):
        raise SystemExit("bench/loss_kernels.py needs CUDA (use --smoke or --shape on CPU; bench/kernels_cpu_memory.py "
                         "measures CPU memory)")
    if args.shape:
        shapes = [tuple(args.shape)]
    elif args.shapes:
        if not re.fullmatch(r"\d+x\d+(,\d+x\d+)*", args.shapes.lower()):
            parser.error(f"--shapes {args.shapes!r}: expected tokens x hidden sizes, e.g. 8192x2048,16384x2048")
        shapes = [(*map(int, shape.lower().split("x")), V_QWEN if not args.smoke else 1000)
                  for shape in args.shapes.split(",")]
    else:
        shapes = [(64, 32, 1000)] if args.smoke else [(n, h, V_QWEN) for h in (2048, 3584) for n in (2048, 8192, 16384)]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    key = lambda name: name.strip().lower().replace(" ", "_")  # noqa: E731
    wanted = {key(name) for name in args.impls.split(",")} if args.impls else None
    # every implementation there is; those this device lacks are not run
    every = [key(name) for name in ("naive", "torch.compile", "liger", *OBJECTIVES, FP32_BLOCK)]
    unknown = sorted(wanted - set(every)) if wanted else []
    if unknown:  # before anything is built
        parser.error(f"--impls: no implementation {', '.join(unknown)}; there are {', '.join(every)}")
    bench, cases = timer(device), make_cases(device)
    if wanted:
        cases = {name: fn for name, fn in cases.items() if key(name) in wanted}
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)" if args.smoke else "cpu"
    report = {"benchmark": "kernels", "date": str(date.today()), "device": device_name, "rows": []}
    rows = report["rows"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for n, h, v in shapes:
        if device == "cuda":  # each shape compiled afresh: Liger's compiled loss failed at the second shape
            torch._dynamo.reset()  # (an IndexError inside dynamo, torch 2.11, 2026-12-04)
        torch.manual_seed(0)
        hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(v, h, device=device, dtype=dtype) * 0.02
        targets = torch.randint(0, v, (n,), device=device)
        adv, mask = torch.randn(1, device=device), torch.ones(1, n, device=device)
        floor_fwd, floor_bwd = gemm_floor(hidden.detach(), weight, bench)
        for name, fn in cases.items():
            row = {"N": n, "H": h, "V": v, "dtype": str(dtype), "device": device,
                   **measure(name, fn, hidden, weight, targets, adv, mask, device, bench),
                   "gemm_floor_fwd_ms": floor_fwd, "gemm_floor_fwd_bwd_ms": floor_fwd + floor_bwd}
            if "fwd_bwd_ms" in row:
                row["vs_gemm_floor"] = row["fwd_bwd_ms"] / row["gemm_floor_fwd_bwd_ms"]
            token_level = next((r for r in rows if r["impl"] == TOKEN_LEVEL and (r["N"], r["H"]) == (n, h)), {})
            if (name in OBJECTIVES or name == FP32_BLOCK) and "fwd_bwd_ms" in row and "fwd_bwd_ms" in token_level:
                row["vs_token_level"] = row["fwd_bwd_ms"] / token_level["fwd_bwd_ms"]
            rows.append(row)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(row), flush=True)
    print(f"device: {device_name}")
    print(f"{'N':>6}{'H':>6}  {'impl':<19}{'fwd ms':>9}{'bwd ms':>9}{'f+b ms':>9}{'peak MiB':>10}{'x floor':>9}"
          f"{'x token':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['N']:>6}{r['H']:>6}  {r['impl']:<19}{r['error']}")
            continue
        print(f"{r['N']:>6}{r['H']:>6}  {r['impl']:<19}{r['fwd_ms']:>9.2f}{r.get('bwd_ms', float('nan')):>9.2f}{r['fwd_bwd_ms']:>9.2f}"
              f"{r.get('peak_extra_mib', float('nan')):>10.1f}{r['vs_gemm_floor']:>9.2f}"
              f"{r.get('vs_token_level', float('nan')):>9.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
