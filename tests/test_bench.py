"""The benchmark scripts run and write their JSON (tiny shapes on CPU; real numbers come from bench/)."""
import json
import subprocess
import sys

from lmmr1_lite.config import REPO_ROOT


def test_kernel_bench_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "loss_kernels.py"), "--smoke", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    impls = {row["impl"] for row in report["rows"]}
    assert {"naive", "liger", "lmmr1_kernels"} <= impls
    assert all(row["fwd_bwd_ms"] > 0 and row["vs_gemm_floor"] > 0 for row in report["rows"])


def test_cpu_memory_bench_ours_uses_less(tmp_path):
    out = tmp_path / "mem.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "kernels_cpu_memory.py"), "--n", "512", "--h", "64",
                    "--v", "50000", "--chunk-bytes", str(8 * 2**20), "--out", str(out)], check=True, capture_output=True,
                   text=True)
    report = json.loads(out.read_text())
    # naive keeps ~3 copies of the 512 x 50,000 fp32 logits (~300 MiB); ours an 8 MiB chunk and its scratch
    assert report["ratio_head_grad_False"] < 0.2, report


def test_e2e_step_bench_on_the_tiny_model(tmp_path):
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "e2e_step.py"), "--out", str(out),
                    "--set", "prompts_per_step=4", "--set", "beta=0.01"], check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert set(phases) == {"load", "generate", "score_and_reference", "reference_pass", "old_pass", "backward", "train"}
    assert all(p["seconds"] > 0 and p["peak_extra_gib"] >= 0 for p in phases.values())
    assert phases["load"]["left_behind_gib"] > 0, "the model's weights stay resident"
    for row in report["components"].values():
        assert row["planner_gib"] > 0 and row["measured_vs_planner"] == row["measured_gib"] / row["planner_gib"]
    assert report["completion_tokens_mean"] > 0 and report["prompt_tokens"] > 0 and report["planner_peak_gib"] > 0
