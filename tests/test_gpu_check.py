"""bench/gpu_check.py: its --dry-run (every part at tiny shapes on the CPU), budgets, timeouts and carry check."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmmr1_lite.config import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"
PARTS = ["install", "kernels", "loss", "decode", "e2e_fre", "e2e_mgt"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_part_and_reports_it(tmp_path):
    """The whole script on the CPU, as the device would run it but at tiny shapes: each part's numbers land
    in summary.json, the table in summary.md is the last thing printed, and --out gets at most 8 files."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "kernels")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["decode.json", "e2e_fre.json", "e2e_mgt.json", "loss_kernels.json", "parts.log", "summary.json",
                     "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), "names the device tool brings back"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    parts = summary["parts"]
    assert list(parts) == PARTS and all(parts[p]["status"] == "ok" and parts[p]["seconds"] > 0 for p in PARTS)
    environment = parts["install"]["environment"]
    assert environment["lmmr1_lite"].startswith(str(REPO_ROOT)) and environment["torch"]
    assert parts["install"]["wheels_installed"] == []  # a dry run installs nothing
    # test_kernels.py's 4 real-vocabulary torch tests and test_objectives.py's 10 (5 objectives x fp32, bf16)
    assert parts["kernels"]["counts"] == {"passed": 14, "deselected": parts["kernels"]["counts"]["deselected"]}
    assert parts["kernels"]["failures"] == []

    loss = parts["loss"]["report"]["rows"]
    objectives = ["lmmr1 cispo", "lmmr1 gspo", "lmmr1 top-ent 0.2"]  # each timed beside the token-level loss
    assert [row["impl"] for row in loss] == ["naive", "liger", "lmmr1_kernels", *objectives]
    assert all(row["fwd_bwd_ms"] > 0 and row["gemm_floor_fwd_bwd_ms"] > 0 for row in loss)
    token_level = loss[2]["fwd_bwd_ms"]
    for row in loss[3:]:
        assert row["vs_token_level"] == pytest.approx(row["fwd_bwd_ms"] / token_level)
    assert all("vs_token_level" not in row for row in loss[:3])

    decode = parts["decode"]["report"]
    assert decode["decode_only"] is True and list(decode["phases"]) == ["load"]  # no step
    # the LoRA's side path and merge_for_rollouts; compiled: CUDA only (inductor on a CPU takes a minute)
    assert list(decode["decode"]) == ["dynamic", "dynamic+merged"]
    for mode in decode["decode"].values():
        assert mode["rows"] == 8 and 0 < mode["tokens_decoded"] <= 8 * 4 and mode["tokens_per_second"] > 0
    fastest = max(decode["decode"], key=lambda mode: decode["decode"][mode]["tokens_per_second"])
    explained = decode["decode_explain"]  # the static step traced first, in the merged weights: whole
    assert explained["mode"] == "compiled+merged" and explained["graphs"] == 1
    assert explained["graph_breaks"] == 0 and explained["break_reasons"] == [] and explained["ops"] > 0
    profile = decode["decode_profile"]  # where a short merged dynamic-cache generation's time went
    assert profile["mode"] == "dynamic+merged" and profile["device_busy_seconds"] is None  # CUDA only
    assert 0 < profile["ops_cpu_seconds"] and 0 < profile["wall_seconds"] and len(profile["top"]) == 15
    assert any(row["op"] == "aten::mm" and row["calls"] > 0 for row in profile["top"])  # the linear layers
    assert [row["self_cpu_ms"] for row in profile["top"]] == sorted((row["self_cpu_ms"] for row in profile["top"]),
                                                                   reverse=True)

    fre, mgt = parts["e2e_fre"]["report"], parts["e2e_mgt"]["report"]
    assert fre["has_images"] is False and mgt["has_images"] is True
    for report in (fre, mgt):
        assert report["phases"]["generate"]["seconds"] > 0 and report["planner_peak_gib"] > 0
        assert report["device_memory"] == {}  # CUDA only
        assert report["decode_mode"] == fastest and report["decode"] == {}  # the steps use what the decode part found
        assert report["max_new_tokens_cut_from"] is None  # the tiny step fits its part's time
        assert report["progress"]["generate"]["forward_calls"] > 0
    backward = fre["backward_profile"]  # the FRE step profiles one more gradient pass; MGT does not
    assert mgt["backward_profile"] is None and backward["wall_seconds"] > 0 and len(backward["top"]) == 15
    # and times three more on its rollouts: as configured (the tiny config: all 2 x 4 rows at once), then with
    # each change alone (the prompts unshared keeps the configured micro-batches)
    assert mgt["backward_ab"] is None and list(fre["backward_ab"]) == ["as configured", "micro_batch_size=2",
                                                                        "share_prompt=false"]
    configured, changed, unshared = fre["backward_ab"].values()
    assert all(run["seconds"] > 0 and isinstance(run["working_set_gib"], float)
               for run in (configured, changed, unshared))
    assert configured["rows_trained"] == changed["rows_trained"] == unshared["rows_trained"] == 8  # beta > 0
    assert configured["rows_per_micro_batch"] == unshared["rows_per_micro_batch"] == 8
    assert changed["rows_per_micro_batch"] == 2
    assert any(row["op"].startswith("aten::") and row["calls"] > 0 for row in backward["top"])

    table = (out / "summary.md").read_text()
    assert table.startswith("## DRY RUN on the CPU at tiny shapes: not GPU numbers: cpu, ")
    for part in PARTS:
        assert re.search(rf"^\| {part} \| ok \| [\d.]+ \| .+ \|$", table, re.M), part
    assert "| 14 passed, 0 failed (tests/test_kernels.py, tests/test_objectives.py) |" in table
    assert "| dynamic+merged | 8 | 4 |" in table and "| lmmr1_kernels |" in table
    assert "its compile counted; the compiled+merged step traces as 1 graph(s) with 0 graph break(s) |" in table
    assert re.search(r"^Decode profile, dynamic\+merged mode, 8 new tokens: [\d.]+ s wall, [\d.]+ s of CPU in torch's ops; "
                     r"top ops by self CPU time:$", table, re.M)
    assert re.search(r"^e2e_fre: a profiled gradient pass after the step: [\d.]+ s wall, ", table, re.M)
    assert re.search(r"^\| micro_batch_size=2 \| 8 \| 2 \| [\d.]+ \| -?[\d.]+ \|$", table, re.M)
    assert f"generated in decode mode {fastest}" in table
    assert re.search(r"^\| 64 \| 32 \| 1000 \| torch.float32 \| lmmr1 gspo \|( [\d.]* \|){4} [\d.]+ \|$", table, re.M)
    assert proc.stdout.rstrip().endswith(table.rstrip()), "the table is printed last"
    assert "===== e2e_mgt" in (out / "parts.log").read_text()


def test_parts_are_skipped_with_a_line_when_the_budget_is_spent(gpu_check, tmp_path, capsys):
    status = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0.5", "--parts", "e2e_mgt,loss"])
    assert status == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["parts"]) == ["install", "e2e_mgt", "loss"]  # the install first, then the order given
    for part in summary["parts"].values():
        assert part["status"] == "skipped" and re.fullmatch(r"-?\d+ s of the 0 s budget left; it needs at least 1 s",
                                                            part["note"])
    assert "[gpu-check] loss: skipped (" in capsys.readouterr().out
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "loss,kernel"]) == 2


def test_a_rerun_of_the_steps_takes_the_fastest_cache_from_an_earlier_decode_report(gpu_check, tmp_path, monkeypatch):
    """--decode-report: the steps of a second call generate with what the first call's decode part found."""
    decode = {"dynamic": {"rows": 64, "new_tokens": 32, "first_run_seconds": 9.0, "seconds": 8.0,
                          "tokens_per_second": 256.0},
              "static": {"rows": 64, "new_tokens": 32, "first_run_seconds": 9.0, "seconds": 4.0,
                         "tokens_per_second": 512.0}}
    (tmp_path / "decode.json").write_text(json.dumps({"decode_only": True, "decode": decode}))
    commands, real_command_for = [], gpu_check.command_for

    def command_for(name, args, learned, budget):  # records the step's command, runs nothing
        commands.append(real_command_for(name, args, learned, budget))
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(gpu_check, "command_for", command_for)
    out = tmp_path / "out"
    gpu_check.main(["--dry-run", "--out", str(out), "--parts", "e2e_fre", "--decode-report", str(tmp_path / "decode.json")])
    (fre,) = [c for c in commands if "bench/e2e_step.py" in c]
    assert fre[fre.index("--decode-mode") + 1] == "static"
    assert fre[fre.index("--tokens-per-second") + 1] == "512.0"

    (tmp_path / "empty.json").write_text(json.dumps({"decode_only": True, "decode": {"compiled": {"error": "x"}}}))
    for bad in ("empty.json", "missing.json"):
        assert gpu_check.main(["--dry-run", "--out", str(out), "--parts", "e2e_fre",
                               "--decode-report", str(tmp_path / bad)]) == 2


def test_a_hung_part_is_stopped_with_its_children(gpu_check, tmp_path, monkeypatch):
    """A part past its budget is ended with everything it started, and the next part still gets its time."""
    pid_file = tmp_path / "child.pid"
    hang = (f"import subprocess, time; child = subprocess.Popen(['sleep', '60']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    monkeypatch.setattr(gpu_check, "command_for", lambda name, args, learned, budget: [sys.executable, "-c", hang])
    part = gpu_check.Part("loss", budget_s=3, min_s=0)
    args = gpu_check.argparse.Namespace(budget_s=100, out=str(tmp_path), dry_run=True, generation_share=0.5)
    log_path = tmp_path / "parts.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        gpu_check.run_part(part, args, os.environ.copy(), log, log_path, start, {})
    assert part.result["status"] == "timeout" and 3 <= part.result["seconds"] < 15
    child = int(pid_file.read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert "[exit timeout after" in log_path.read_text()


def test_only_missing_wheels_are_installed(gpu_check, tmp_path):
    from importlib.metadata import version

    names = [f"pytest-{version('pytest')}-py3-none-any.whl", "pytest-0.1-py3-none-any.whl",
             "setuptools-84.2.1-py3-none-any.whl", "no_such_dist_here-1.0-py3-none-any.whl"]
    wheels = [tmp_path / name for name in names]
    assert [w.name for w in gpu_check.wheels_to_install(wheels)] == names[1:2] + names[3:]
    # an earlier call's site on a warm machine: what it holds at the wheel's version is not installed again
    site = tmp_path / "site"
    info = site / "no_such_dist_here-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: no_such_dist_here\nVersion: 1.0\n")
    assert [w.name for w in gpu_check.wheels_to_install(wheels, site)] == names[1:2]
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: no_such_dist_here\nVersion: 0.9\n")
    assert [w.name for w in gpu_check.wheels_to_install(wheels, site)] == names[1:2] + names[3:]
    assert gpu_check.wheels_to_install(wheels, tmp_path / "none") == gpu_check.wheels_to_install(wheels)


def test_check_carry_counts_the_tree_and_refuses_what_would_break(gpu_check, tmp_path, capsys):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"x" * 2**20)
    assert gpu_check.check_carry(wheels) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    wheel_mib, tree_mib, total = map(float, re.findall(r"([\d.]+) MiB", line)[:3])
    assert wheel_mib == 1.0 and tree_mib > 0.5 and total == pytest.approx(wheel_mib + tree_mib, abs=0.11)
    (wheels / "liger_kernel-0.8.4-py3-none-any.whl").write_bytes(b"x")
    (wheels / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    assert gpu_check.check_carry(wheels) == 2
    errors = capsys.readouterr().err
    assert "liger-kernel: 2 versions (keep one)" in errors and "torch is among the wheels" in errors
    for name in wheels.iterdir():
        name.unlink()
    with open(wheels / "big-1.0-py3-none-any.whl", "wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: no real disk use
    assert gpu_check.check_carry(wheels) == 2
    assert "over the 64 MiB limit" in capsys.readouterr().err


def test_device_memory_is_the_peak_reserved_plus_the_cuda_context(monkeypatch):
    """The 'fits 24 GiB' verdict of bench/e2e_step.py (CUDA only), from made-up allocator readings."""
    import torch

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import GIB, cuda_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (60 * GIB, 80 * GIB))  # 20 GiB in use on the card
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 19 * GIB)  # 1 GiB of it is the context
    phases = {"generate": {"peak_allocated_gib": 20.0, "peak_reserved_gib": 22.5},
              "train": {"peak_allocated_gib": 18.0, "peak_reserved_gib": 21.0, "peak_extra_gib": 3.0,
                        "left_behind_gib": 1.0}}
    parts = {"optimizer step scratch": 1.5 * GIB, "CUDA context and workspaces": 0.6 * GIB}
    components = {}
    memory = cuda_memory(components, phases, parts, 24.0)
    assert memory == {"peak_allocated_gib": 20.0, "peak_reserved_gib": 22.5, "cuda_context_gib": 1.0,
                      "device_peak_gib": 23.5, "live_peak_gib": 21.0, "gpu_gib": 24.0, "fits": True}
    assert components == {"optimizer step scratch": {"planner_gib": 1.5, "measured_gib": 2.0},
                          "CUDA context and workspaces": {"planner_gib": 0.6, "measured_gib": 1.0}}
    assert cuda_memory({}, phases, parts, 23.0)["fits"] is False


def test_a_cuda_phase_counts_the_allocators_cudamalloc_calls_and_retries(monkeypatch):
    """bench/e2e_step.py's PhaseMeter on CUDA (made-up allocator readings): each phase reports the cudaMalloc calls
    and out-of-memory retries the allocator made during it (a KV cache that grows by a new tensor at every step
    makes one cudaMalloc per layer per step)."""
    import torch

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import GIB, PhaseMeter

    stats = {"num_device_alloc": 10, "num_alloc_retries": 1}
    for name, value in {"synchronize": None, "reset_peak_memory_stats": None, "memory_allocated": 2 * GIB,
                        "max_memory_allocated": 5 * GIB, "max_memory_reserved": 7 * GIB}.items():
        monkeypatch.setattr(torch.cuda, name, lambda value=value: value)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: dict(stats))

    def generate():
        stats["num_device_alloc"] += 72
        stats["num_alloc_retries"] += 2

    meter = PhaseMeter(cuda=True)
    meter.measure("generate", generate)
    assert meter.phases["generate"] == {"seconds": meter.phases["generate"]["seconds"], "peak_extra_gib": 3.0,
                                        "left_behind_gib": 0.0, "peak_allocated_gib": 5.0, "peak_reserved_gib": 7.0,
                                        "device_mallocs": 72, "alloc_retries": 2}


def test_the_table_shows_what_a_stopped_or_failed_part_finished(gpu_check):
    """A step stopped mid-way (its partial report), a decode mode that failed, a CUDA step that does not fit."""
    Part = gpu_check.Part
    phase = {"seconds": 12.5, "peak_extra_gib": 3.25, "peak_reserved_gib": 20.0, "device_mallocs": 72, "alloc_retries": 0}
    step = {"model": "3b", "tokenizer": None, "quantization": "nf4", "dtype": "bfloat16", "prompts": 8,
            "generations": 8, "max_new_tokens": 1024, "prompt_tokens": 110, "has_images": False, "device": "H200",
            "phases": {"generate": phase}, "planner_peak_gib": 9.4, "planner_fits": True,
            "components": {"weights": {"planner_gib": 2.0, "measured_gib": 2.1, "measured_vs_planner": 1.05}},
            "device_memory": {"device_peak_gib": 24.5, "live_peak_gib": 22.25, "fits": False, "gpu_gib": 24.0},
            "decode": {"dynamic": {"rows": 64, "new_tokens": 128, "first_run_seconds": 6.0, "seconds": 5.0,
                                   "tokens_per_second": 1638.4},
                       "compiled": {"error": "BackendCompilerFailed: boom"}}}
    parts = [Part("e2e_fre", 1, 1, {"status": "ok", "seconds": 150.0, "report": step}),
             Part("e2e_mgt", 1, 1, {"status": "timeout", "seconds": 100.0,
                                    "report": {"partial": True, "phases": {"load": phase}, "progress": {
                                        "generate": {"forward_calls": 640, "seconds": 96.0}}}})]
    table = gpu_check.tables(parts, "## head")
    assert ("| e2e_fre | ok | 150.0 | planner peak 9.40 GiB (fits); measured device peak (reserved + context) "
            "24.50 GiB: does not fit 24 GiB (live tensors + context 22.25); decode timed: dynamic, compiled |") in table
    assert ("| e2e_mgt | timeout | 100.0 | stopped during the step; phases measured: load; generate had made 640 "
            "forward calls in 96 s (150 ms each) |") in table
    assert "e2e_mgt: the step was stopped; the phases it finished:" in table
    assert "| load | 12.50 | 3.250 | 20.000 | 72 | 0 |" in table and "| generate | 12.50 | 3.250 | 20.000 | 72 | 0 |" in table
    assert "| weights | 2.000 | 2.100 | 1.05 |" in table
    assert "| dynamic | 64 | 128 | 6.00 | 5.00 | 1638.4 |" in table
    assert "| compiled | BackendCompilerFailed: boom | | | | |" in table


def test_the_steps_generate_with_the_cache_that_decodes_most_in_their_time(gpu_check):
    """The decode part's report picks each step's decode mode: the most tokens in the step's generation time
    (GENERATION_SHARE of its part) once the compile its process pays first is taken off, a mode that failed never;
    with no mode timed the steps keep their configs' decode_cache and merge_for_rollouts; the table says so."""
    decode = {"dynamic": {"rows": 64, "new_tokens": 32, "first_run_seconds": 9.0, "seconds": 8.0,
                          "tokens_per_second": 256.0},
              "static": {"rows": 64, "new_tokens": 32, "first_run_seconds": 9.0, "seconds": 4.0,
                         "tokens_per_second": 512.0},
              "compiled": {"rows": 64, "new_tokens": 32, "first_run_seconds": 90.0, "seconds": 2.0,
                           "tokens_per_second": 1024.0},
              "broken": {"error": "BackendCompilerFailed: boom"}}
    report = {"decode": decode}
    assert gpu_check.best_decode(report) == {"decode_mode": "compiled", "tokens_per_second": 1024.0,
                                             "first_run_extra_seconds": 88.0}
    # 120 s: compiled decodes (120 - 88) x 1024 = 32,768 tokens, static (120 - 5) x 512 = 58,880
    assert gpu_check.best_decode(report, 120.0)["decode_mode"] == "static"
    assert gpu_check.best_decode(report, 300.0)["decode_mode"] == "compiled"  # 217,088 against 151,040
    assert gpu_check.best_decode({"decode": {"broken": decode["broken"]}}) == {}
    assert gpu_check.best_decode(None) == {}
    args = gpu_check.argparse.Namespace(out="o", dry_run=False, generation_share=0.5)
    default = gpu_check.command_for("e2e_fre", args, {}, 240)
    assert "--decode-mode" not in default and "--tokens-per-second" not in default
    command = gpu_check.command_for("e2e_mgt", args, {"decode_report": report}, 240)
    assert command[command.index("--decode-mode") + 1] == "static"
    assert command[command.index("--tokens-per-second") + 1] == "512.0"
    # GENERATION_SHARE of the part's time, less the compile (the first run's extra seconds) its process pays again
    assert command[command.index("--generation-budget-s") + 1] == "115"
    # and the decode stops at the whole share, the compile included, whatever the prediction missed
    assert command[command.index("--generation-deadline-s") + 1] == "120"
    command = gpu_check.command_for("e2e_fre", args, {"decode_report": report}, 600)
    assert command[command.index("--decode-mode") + 1] == "compiled" and command[command.index("--generation-budget-s") + 1] == "212"
    assert command[command.index("--generation-deadline-s") + 1] == "300"
    # --generation-share: a short part leaves its passes and update (at the config's length) more of its time
    args.generation_share = 0.3
    command = gpu_check.command_for("e2e_mgt", args, {"decode_report": report}, 240)
    assert command[command.index("--generation-deadline-s") + 1] == "72"
    assert command[command.index("--decode-mode") + 1] == "static"  # 72 s: (72 - 5) x 512 against (72 - 88) x 1024
    for bad in ("0", "1", "1.5", "-0.2"):  # refused before any part runs
        with pytest.raises(SystemExit) as exit_:
            gpu_check.main(["--generation-share", bad, "--dry-run", "--out", "/nonexistent/never-written"])
        assert exit_.value.code == 2
    report = {"decode_only": True, "model": "3b", "quantization": "nf4", "dtype": "bfloat16", "prompts": 8,
              "generations": 8, "device": "H200", "phases": {}, "decode": decode}
    part = gpu_check.Part("decode", 1, 1, {"status": "ok", "seconds": 90.0, "report": report})
    table = gpu_check.tables([part], "## head")
    assert ("| decode | ok | 90.0 | dynamic 256 tokens/s, static 512 tokens/s, compiled 1024 tokens/s, broken error; "
            "the steps generate with the one that decodes most in their time, its compile counted; no CUDA-graph skip "
            "logged |") in table
    assert "Decode, 3b, nf4, bfloat16, 8 prompts x 8 (H200):" in table and "| static | 64 | 32 | 9.00 | 4.00 | 512.0 |" in table
    report["decode"] = {"broken": decode["broken"]}
    assert gpu_check.part_line(part).endswith("broken error; the steps keep their configs' decode_cache and "
                                              "merge_for_rollouts")
    report["decode_explain"] = {"mode": "compiled+merged", "graphs": 2, "graph_breaks": 1, "ops": 9,
                                "break_reasons": ["call_method requires_grad_"]}
    assert gpu_check.part_line(part).endswith("merge_for_rollouts; the compiled+merged step traces as 2 graph(s) "
                                              "with 1 graph break(s): call_method requires_grad_")
    assert gpu_check.explain_line({"mode": "compiled", "error": "Unsupported: x"}) == \
        "; the compiled step's trace failed: Unsupported: x"


def test_the_summary_says_whether_inductor_skipped_cuda_graphs(gpu_check, tmp_path):
    """Inductor's "skipping cudagraphs due to ..." lines in a part's share of parts.log (run 3's, verbatim) become
    the part's cudagraph_skips and its summary says so; a compiled mode with no such line says none was logged."""
    log = tmp_path / "parts.log"
    earlier = "W1204 18:00:00.000000 515 torch/_inductor/cudagraph_utils.py:207] [__cudagraphs] skipping " \
              "cudagraphs due to cpu device (arg0_1). Found from : \n"
    log.write_text(earlier)
    start = log.stat().st_size
    with log.open("a") as handle:
        handle.write("W1204 18:06:35.353000 515 torch/_inductor/cudagraph_utils.py:207] [__cudagraphs] skipping "
                     "cudagraphs due to mutated inputs (1 instances). Found from : \n" * 2 + "decode compiled: {}\n")
    args = gpu_check.argparse.Namespace(out=str(tmp_path))
    part = gpu_check.Part("decode", 1, 1, {"status": "ok"})
    gpu_check.collect(part, args, log, start)
    assert part.result["cudagraph_skips"] == ["mutated inputs"]  # once, and not the earlier part's
    part.result["report"] = {"decode": {"compiled+merged": {"rows": 64, "new_tokens": 32, "first_run_seconds": 90.0,
                                                            "seconds": 2.0, "tokens_per_second": 1024.0}}}
    assert gpu_check.part_line(part).endswith("; inductor skipped CUDA graphs: mutated inputs")
    part.result["cudagraph_skips"] = []
    assert gpu_check.part_line(part).endswith("its compile counted; no CUDA-graph skip logged")
    part.result["report"]["decode"] = {"dynamic": part.result["report"]["decode"]["compiled+merged"]}
    assert gpu_check.part_line(part).endswith("its compile counted")


def test_a_decode_mode_is_a_cache_and_whether_the_lora_is_merged(capsys):
    """e2e_step's decode modes: 'CACHE' generates through the LoRA's side path, 'CACHE+merged' with
    merge_for_rollouts; anything else, or a --backward-ab change no config takes, is one line and exit 2 before
    a model loads."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import decode_mode, decode_settings, main

    assert decode_settings("dynamic") == {"decode_cache": "dynamic", "merge_for_rollouts": False}
    assert decode_settings("compiled+merged") == {"decode_cache": "compiled", "merge_for_rollouts": True}
    assert decode_mode(SimpleNamespace(decode_cache="static", merge_for_rollouts=True)) == "static+merged"
    for bad in ("fast", "dynamic+", "dynamic+fused", "+merged", "merged"):
        with pytest.raises(ValueError, match="expected one of dynamic, static, compiled, optionally with '.merged'"):
            decode_settings(bad)
    for argv, says in ((["--decode-modes", "dynamic,dynamic+fused"], "decode mode"),
                       (["--decode-mode", "quick"], "decode mode"), (["--decode-profile", "static+"], "decode mode"),
                       (["--backward-ab", "micro_batch_size"], "expected KEY=VALUE"),
                       (["--backward-ab", "micro_batch_sise=8"], "unknown config field 'micro_batch_sise'"),
                       (["--backward-ab", "micro_batch_size=0"], "micro_batch_size must be >= 1"),
                       (["--backward-ab", "micro_batch_size=64,max_tokens_per_micro_batch"], "expected KEY=VALUE"),
                       (["--backward-ab", "share_prompt=false", "--backward-ab", "micro_batch_size=0"],
                        "--backward-ab micro_batch_size=0: micro_batch_size must be >= 1"),
                       (["--explain-decode", "compiled+merged"], "add --decode-only"),
                       (["--layers", "4"], "needs --model"),
                       (["--model", "configs", "--layers", "4"], "its config.json"),
                       (["--model", "configs/models/qwen2_5_vl_3b", "--layers", "0"], "N >= 1")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]


def test_layers_keeps_the_first_decoder_layers_of_an_architecture(tmp_path):
    """e2e_step --layers: the architecture's copy keeps its widths, vocabulary and chat template, with its
    language model cut to the first N layers (what a CPU measures per layer of the 3B)."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import first_layers_of

    source = REPO_ROOT / "configs" / "models" / "qwen2_5_vl_3b"
    cut = Path(first_layers_of(str(source), 4, str(tmp_path)))
    full, short = (json.loads((d / "config.json").read_text()) for d in (source, cut))
    assert short["text_config"]["num_hidden_layers"] == 4 and len(short["text_config"]["layer_types"]) == 4
    for key in ("num_hidden_layers", "layer_types"):
        full["text_config"].pop(key), short["text_config"].pop(key)
    assert short == full, "every other setting as it was"
    assert (cut / "chat_template.jinja").read_text() == (source / "chat_template.jinja").read_text()
    assert json.loads((source / "config.json").read_text())["text_config"]["num_hidden_layers"] == 36


def test_a_slow_decode_cuts_the_steps_completions_to_fit(gpu_check):
    """e2e_step's cap: every row runs to it (random weights), so rows x cap / tokens-per-second must fit the
    seconds given; a multiple of 64, at least 64, never above the config's; the table says when it cut."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import new_tokens_within

    assert new_tokens_within(1024, 64, 512.0, 120) == 960  # 120 s x 512 tokens/s / 64 rows = 960
    assert new_tokens_within(1024, 64, 200.0, 120) == 320  # 375 rounded down to a multiple of 64
    assert new_tokens_within(1024, 64, 5000.0, 120) == 1024  # fits: the config's cap stays
    assert new_tokens_within(1024, 64, 1.0, 120) == 64 and new_tokens_within(12, 8, 1.0, 1) == 12
    step = {"model": "3b", "tokenizer": None, "quantization": "nf4", "dtype": "bfloat16", "prompts": 8,
            "generations": 8, "max_new_tokens": 320, "max_new_tokens_cut_from": 1024, "prompt_tokens": 110,
            "has_images": False, "device": "H200", "phases": {}, "planner_peak_gib": 7.0, "planner_fits": True,
            "components": {}, "device_memory": {}, "decode_mode": "static+merged", "decode": {}}
    line = gpu_check.part_line(gpu_check.Part("e2e_fre", 1, 1, {"status": "ok", "report": step}))
    assert line.endswith("generated in decode mode static+merged, completions cut to 320 tokens (from 1024) to fit the "
                         "part's time")
    step["generation_stopped_at"] = 201  # the deadline's cut, when the prediction missed
    line = gpu_check.part_line(gpu_check.Part("e2e_fre", 1, 1, {"status": "ok", "report": step}))
    assert line.endswith("(from 1024) to fit the part's time, the decode stopped at 201 tokens by its deadline")
    # --extend-completions: the passes at the config's length, the generation's cut and stop still said
    step.update(max_new_tokens=1024, generation_max_new_tokens=320, completions_extended_from=201,
                planner_peak_as_run_gib=6.5, generation_cache_room_tokens=430)
    line = gpu_check.part_line(gpu_check.Part("e2e_fre", 1, 1, {"status": "ok", "report": step}))
    assert line.endswith("completions cut to 320 tokens (from 1024) to fit the part's time, the decode stopped at 201 "
                         "tokens by its deadline (its cache had room for 430 tokens); the passes and the update at "
                         "1024 tokens (completions extended from 201 with drawn tokens), the planner's peak for what "
                         "ran 6.50 GiB")
    table = gpu_check.tables([gpu_check.Part("e2e_fre", 1, 1, {"status": "ok", "report": step})], "## head")
    assert "8 prompts x 8 x 201 tokens generated (extended to 1024 for the passes) (prompt 110 tokens" in table
    args = gpu_check.argparse.Namespace(out="o", dry_run=False, generation_share=0.5)
    assert "--extend-completions" in gpu_check.command_for("e2e_mgt", args, {}, 200)
    assert "--extend-completions" not in gpu_check.command_for("decode", args, {}, 200)


def test_the_step_reports_each_phase_as_it_ends(tmp_path):
    """bench/e2e_step.py's meter writes the phases so far after each one, so a stopped step keeps them."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import PhaseMeter

    out = tmp_path / "step.json"
    meter = PhaseMeter(False, out)
    assert meter.measure("load", lambda: bytearray(32 * 2**20)) is not None
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and list(partial["phases"]) == ["load"]
    assert partial["phases"]["load"]["seconds"] > 0 and partial["phases"]["load"]["peak_extra_gib"] > 0.02


def test_a_step_stopped_in_its_extras_keeps_its_whole_report(tmp_path, monkeypatch):
    """bench/e2e_step.py writes the step's full report (phases, planner components) before its extra passes
    (--profile-backward, then each --backward-ab) and again after each, so a budget that stops it in one keeps the
    rest: here it stops in the A/B's second pass, after the profile and the pass as configured."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import e2e_step

    from lmmr1_lite import step

    passes, gradients = [], step.compute_gradients

    def stopped_at_the_fifth(*args):  # the backward phase, the train phase's, the profile's, the A/B's first
        passes.append(1)
        if len(passes) == 5:
            raise KeyboardInterrupt  # as the part's budget would stop the process here
        return gradients(*args)
    monkeypatch.setattr(step, "compute_gradients", stopped_at_the_fifth)
    out = tmp_path / "step.json"
    with pytest.raises(KeyboardInterrupt):
        e2e_step.main(["--set", "prompts_per_step=2", "--set", "num_generations=4", "--set", "max_new_tokens=8",
                       "--backward-ab", "micro_batch_size=8,max_tokens_per_micro_batch=1",
                       "--backward-ab", "share_prompt=false", "--profile-backward", "--out", str(out)])
    report = json.loads(out.read_text())
    assert "partial" not in report and list(report["phases"]) == [
        "load", "generate", "score_and_reference", "reference_pass", "old_pass", "backward", "train"]
    assert report["components"] and report["planner_peak_gib"] > 0
    assert report["backward_profile"]["wall_seconds"] > 0 and report["backward_profile"]["aten_calls"] > 0
    assert list(report["backward_ab"]) == ["as configured"]
    # a change of several fields applies them all: 8 rows a micro-batch alone, 1 under a 1-token budget
    finished = e2e_step.main(["--set", "prompts_per_step=2", "--set", "num_generations=4", "--set", "max_new_tokens=8",
                              "--backward-ab", "micro_batch_size=8,max_tokens_per_micro_batch=1",
                              "--out", str(tmp_path / "ab.json")])
    assert finished["backward_ab"]["as configured"]["rows_per_micro_batch"] == 8
    assert finished["backward_ab"]["micro_batch_size=8,max_tokens_per_micro_batch=1"]["rows_per_micro_batch"] == 1


def test_a_step_stopped_while_generating_says_how_far_it_got(tmp_path):
    """bench/e2e_step.py's forward_progress: every `every` forward calls of the module the count and the seconds
    so far go into the partial report, and the final count when the phase ends."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import PhaseMeter, forward_progress

    out = tmp_path / "step.json"
    meter = PhaseMeter(False, out)
    module = torch.nn.Linear(2, 2)
    with forward_progress(meter, "generate", module, every=4):
        for _ in range(9):
            module(torch.zeros(1, 2))
        progress = json.loads(out.read_text())["progress"]["generate"]  # as a run stopped here would leave it
    assert progress["forward_calls"] == 8 and progress["seconds"] >= 0
    assert meter.progress["generate"]["forward_calls"] == 9
    module(torch.zeros(1, 2))  # the hook is gone after the phase
    assert meter.progress["generate"]["forward_calls"] == 9


def test_slim_wheels_drop_only_the_native_builds_the_device_never_loads(gpu_check, tmp_path):
    """A bitsandbytes-shaped wheel loses its CUDA 11/12 and ROCm libraries and their RECORD rows; the CUDA 13
    builds, the CPU build and the Python files stay byte for byte, and a wheel with nothing to drop is untouched."""
    import zipfile

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    keep = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so",
            "bitsandbytes/libbitsandbytes_cuda132.so"]
    drop = ["bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_cuda128.so",
            "bitsandbytes/libbitsandbytes_rocm72.so"]
    record = "bitsandbytes-0.50.2.dist-info/RECORD"
    with zipfile.ZipFile(wheel, "w") as z:
        for i, name in enumerate(keep + drop):
            z.writestr(name, bytes([i]) * 4096)
        z.writestr(record, "".join(f"{name},sha256=x,4096\n" for name in keep + drop) + f"{record},,\n")
    assert gpu_check.slim_wheel(wheel) > 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == sorted(keep + [record])
        assert all(z.read(name) == bytes([i]) * 4096 for i, name in enumerate(keep))
        assert [line.split(",")[0] for line in z.read(record).decode().splitlines()] == keep + [record]
    other = tmp_path / "liger_kernel-0.8.5-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("liger_kernel/__init__.py", "")
    before = other.read_bytes()
    assert gpu_check.slim_wheel(other) == 0 and other.read_bytes() == before


def test_a_steps_decode_pace_is_kept_and_shown(gpu_check):
    """e2e_step's progress holds a checkpoint every 32 forward calls and the pace over the first and the last
    interval (what longer rows cost a decode step), and the GPU check's table says it."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from e2e_step import progress_entry

    assert progress_entry(20, 2.0, []) == {"forward_calls": 20, "seconds": 2.0, "checkpoints": []}
    entry = progress_entry(100, 19.0, [[32, 8.0], [64, 12.0], [96, 18.4]])
    assert entry["first_ms_per_forward"] == pytest.approx(250.0)  # 8 s over the first 32 calls
    assert entry["last_ms_per_forward"] == pytest.approx(200.0)  # 6.4 s over calls 65-96
    assert gpu_check.pace_lines({"generate": entry}) == [
        "", "generate: 100 forward calls in 19.0 s; 250 ms each over calls 1-32 (the prefill and any compile among "
            "them), 200 ms over calls 65-96"]
    assert gpu_check.pace_lines({"generate": progress_entry(20, 2.0, [])}) == []


def test_a_part_can_be_given_its_own_budget(gpu_check, tmp_path, monkeypatch):
    """--part-budget e2e_fre=420: the part runs with that budget (a step at the configs' whole length in a call of
    its own); a part not in the call or a value that is not a number is a one-line error, exit 2."""
    budgets = {}

    def run_part(part, args, env, log, log_path, start, learned):
        budgets[part.name] = part.budget_s
        part.result["status"] = "ok"

    monkeypatch.setattr(gpu_check, "run_part", run_part)
    out = str(tmp_path / "out")
    assert gpu_check.main(["--out", out, "--parts", "e2e_fre", "--part-budget", "e2e_fre=420"]) == 0
    assert budgets == {"install": 60, "e2e_fre": 420.0}
    for bad in ("e2e_mgt=100", "e2e_fre=long", "e2e_fre=-5", "e2e_fre=nan", "e2e_fre=inf"):
        assert gpu_check.main(["--out", out, "--parts", "e2e_fre", "--part-budget", bad]) == 2


def test_the_loss_part_can_be_cut_to_some_shapes_and_implementations(gpu_check):
    """--loss-shapes / --loss-impls reach bench/loss_kernels.py (the logits block's A/B at one shape without the
    compiles of torch.compile's and Liger's losses fits a short second call); by default every shape and case."""
    parse = lambda *extra: gpu_check.argparse.Namespace(**{"out": "o", "dry_run": False, "loss_shapes": None,  # noqa: E731
                                                           "loss_impls": None, **dict(extra)})
    default = gpu_check.command_for("loss", parse(), {})
    assert default[default.index("--shapes") + 1] == gpu_check.LOSS_SHAPES and "--impls" not in default
    cut = gpu_check.command_for("loss", parse(("loss_shapes", "8192x2048"),
                                              ("loss_impls", "naive,lmmr1_kernels,lmmr1_fp32_block")), {})
    assert cut[cut.index("--shapes") + 1] == "8192x2048"
    assert cut[cut.index("--impls") + 1] == "naive,lmmr1_kernels,lmmr1_fp32_block"
    # a malformed shape is refused here, in one line, not by the loss part on the device after the install
    assert gpu_check.main(["--dry-run", "--out", "o", "--parts", "loss", "--loss-shapes", "8192,2048"]) == 2
