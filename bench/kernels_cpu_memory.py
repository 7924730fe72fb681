"""Peak extra CPU memory of the log-prob + GRPO loss, forward and backward: naive torch vs lmmr1_kernels.

Each case runs in its own process; "extra" is the peak resident set (VmHWM, reset after the inputs
were allocated) minus the resident set at that point. Naive = full logits + log_softmax + gather, autograd through all of it.
Writes bench/out/kernels_cpu_memory.json and prints a table.

    python bench/kernels_cpu_memory.py                 # N=4096, H=1024, V=151936, fp32 (issue target)
    python bench/kernels_cpu_memory.py --n 512 --v 32000  # quick
    python bench/kernels_cpu_memory.py --objectives    # also GSPO and the high-entropy-token loss
    python bench/kernels_cpu_memory.py --dtype bfloat16  # hidden states and LM head in bf16, as the 3B trains
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Linux: make the peak resident set (VmHWM) start again from the current one."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# the GRPO family through the same kernels (GSPO rescales d logp / d hidden rows once the sequence is known)
OBJECTIVES = {"lmmr1_kernels": {}, "lmmr1 gspo": {"importance_sampling_level": "sequence"},
              "lmmr1 top-ent 0.2": {"top_entropy_quantile": 0.2}}


def run_case(case: str, shape: tuple[int, int, int], head_grad: bool, chunk_bytes: int, dtype: str) -> dict:
    import torch

    from lmmr1_kernels import grpo_loss  # imported (triton and all) before the baseline is read

    n, h, v = shape
    torch.manual_seed(0)
    hidden = torch.randn(n, h, dtype=getattr(torch, dtype)).requires_grad_()
    weight = torch.randn(v, h, dtype=getattr(torch, dtype)).mul_(0.02).requires_grad_(head_grad)
    targets = torch.randint(0, v, (n,))
    advantages = torch.randn(1)
    mask = torch.ones(1, n)
    reset_peak_rss()  # input creation is not part of the measurement
    base = rss_bytes()
    start = time.perf_counter()
    if case == "naive":
        logp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        loss = -(ratio * advantages).mean()
    else:
        loss, _ = grpo_loss(hidden[None], weight, targets[None], mask, advantages, backend="torch",
                            chunk_bytes=chunk_bytes or None, **OBJECTIVES[case])
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"case": case, "extra_bytes": peak - base, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--v", type=int, default=151_936)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "kernels_cpu_memory.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--objectives", action="store_true", help="also GSPO and the top-20 %% entropy tokens")
    parser.add_argument("--head-grad", action="store_true", help="also train the LM head (grad_weight in fp32)")
    parser.add_argument("--chunk-bytes", type=int, default=0,
                        help="bytes of one fp32 logits chunk (0: the kernels' default, 256 MiB; the config's "
                             "logprob_chunk_bytes)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="of the hidden states and the LM head (the logits are fp32 either way)")
    args = parser.parse_args()
    if args.case:  # child process: one case
        print(json.dumps(run_case(args.case, (args.n, args.h, args.v), args.head_grad, args.chunk_bytes, args.dtype)))
        return

    results = []
    for head_grad in (False, True):
        for case in ("naive", *(OBJECTIVES if args.objectives else ["lmmr1_kernels"])):
            cmd = [sys.executable, __file__, "--case", case, "--n", str(args.n), "--h", str(args.h), "--v", str(args.v),
                   "--chunk-bytes", str(args.chunk_bytes), "--dtype", args.dtype]
            out = subprocess.run(cmd + (["--head-grad"] if head_grad else []), check=True, capture_output=True, text=True)
            results.append({**json.loads(out.stdout.strip().splitlines()[-1]), "head_grad": head_grad})
    report = {"benchmark": "kernels_cpu_memory", "date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "shape": {"N": args.n, "H": args.h, "V": args.v, "dtype": args.dtype},
              "chunk_bytes": args.chunk_bytes or "kernel default (256 MiB)", "results": results}
    for head_grad in (False, True):
        naive = next(r for r in results if r["case"] == "naive" and r["head_grad"] == head_grad)
        ours = next(r for r in results if r["case"] == "lmmr1_kernels" and r["head_grad"] == head_grad)
        report[f"ratio_head_grad_{head_grad}"] = ours["extra_bytes"] / naive["extra_bytes"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"N={args.n} H={args.h} V={args.v} {args.dtype}, chunk {report['chunk_bytes']}, forward+backward, peak extra "
          "resident memory")
    print(f"{'LM head':<14}{'case':<19}{'extra MiB':>12}{'seconds':>10}{'vs naive':>10}")
    for r in results:
        naive = next(x for x in results if x["case"] == "naive" and x["head_grad"] == r["head_grad"])
        print(f"{'trained' if r['head_grad'] else 'frozen':<14}{r['case']:<19}{r['extra_bytes'] / 2**20:>12.1f}"
              f"{r['seconds']:>10.2f}{r['extra_bytes'] / naive['extra_bytes']:>10.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
