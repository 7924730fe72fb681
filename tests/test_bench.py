"""The benchmark scripts run and write their JSON (tiny shapes on CPU; real numbers come from bench/)."""
import json
import subprocess
import sys

import pytest
import torch

from lmmr1_lite.config import REPO_ROOT


def test_kernel_bench_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "loss_kernels.py"), "--smoke", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    impls = {row["impl"] for row in report["rows"]}
    assert {"naive", "liger", "lmmr1_kernels"} <= impls
    assert all(row["fwd_bwd_ms"] > 0 and row["vs_gemm_floor"] > 0 for row in report["rows"])


def test_kernel_bench_runs_only_the_implementations_asked_for(tmp_path):
    out = tmp_path / "kernels.json"
    run = lambda impls: subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "loss_kernels.py"), "--smoke",  # noqa: E731
                                        "--impls", impls, "--out", str(out)], capture_output=True, text=True)
    assert run("naive,LMMR1_kernels,lmmr1_fp32_block").returncode == 0  # the fp32 block's A/B runs on CUDA only
    assert [row["impl"] for row in json.loads(out.read_text())["rows"]] == ["naive", "lmmr1_kernels"]
    refused = run("naive,no_such_loss")
    assert refused.returncode == 2 and "no implementation no_such_loss" in refused.stderr.splitlines()[-1]
    bad_shape = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "loss_kernels.py"), "--smoke", "--shapes",
                                "8192,2048", "--out", str(out)], capture_output=True, text=True)
    assert bad_shape.returncode == 2 and "--shapes '8192,2048'" in bad_shape.stderr.splitlines()[-1]


def test_the_kernel_bench_fp32_block_case_is_the_path_before_and_puts_the_rule_back():
    """bench/loss_kernels.py's CUDA A/B case: inside `fp32_logits_block` the kernels take an fp32 block for a frozen
    bf16 head on the Triton path (the logits widened, as until 2026-12-05), and the rule is theirs again after."""
    import importlib

    from lmmr1_kernels.logprobs import logits_block_dtype

    bench = _bench_module("loss_kernels")
    modules = [importlib.import_module("lmmr1_kernels.logprobs"), importlib.import_module("lmmr1_kernels.grpo_loss")]
    frozen = torch.zeros(3, 2, dtype=torch.bfloat16)
    with bench.fp32_logits_block():
        assert [m.logits_block_dtype("triton", frozen, None) for m in modules] == [torch.float32] * 2
    assert all(m.logits_block_dtype is logits_block_dtype for m in modules)
    assert logits_block_dtype("triton", frozen, None) == torch.bfloat16


def test_decode_cache_bench_compares_both_caches_on_the_same_tokens(tmp_path):
    """bench/decode_cache.py, a short generation: HF's concatenating cache and ours give the same tokens, and ours
    allocates less over the generation (the cat allocates the whole cache again at every step)."""
    out = tmp_path / "decode_cache.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "decode_cache.py"), "--cases", "qwen05b_cache_32x400",
                    "--repeats", "1", "--max-new-tokens", "8", "--out", str(out)], check=True, capture_output=True,
                   text=True)
    case = json.loads(out.read_text())["cases"]["qwen05b_cache_32x400"]
    assert case["same_tokens"]
    assert 0 < case["in_place"]["cache_allocated_GiB"] < case["hf_cat"]["cache_allocated_GiB"] / 2
    assert case["in_place"]["s_per_step_wall"] > 0 and case["hf_cat"]["s_per_step_wall"] > 0


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


def test_e2e_step_generation_deadline_stops_the_decode_and_the_step_goes_on(tmp_path):
    """`--generation-deadline-s` stops the step's decode when its seconds are spent (a prediction from a short decode
    misses what long rows cost: the H200's MGT step outlasted its part in generation, 2026-12-04): the rows cut
    there go through the whole step, and the planner's figures are for the length generated."""
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "e2e_step.py"), "--out", str(out),
                    "--set", "prompts_per_step=2", "--set", "max_new_tokens=48", "--generation-deadline-s", "0"],
                   check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["generation_stopped_at"] == 1 and report["max_new_tokens"] == 48
    assert report["completion_tokens_mean"] == 1.0
    # its cache, written in place, had room for the prompt + min(48, 128) tokens: the planner's generation figure
    assert report["generation_cache_room_tokens"] == report["prompt_tokens"] + 48
    assert {"backward", "train"} <= set(report["phases"])
    from transformers import AutoConfig

    from lmmr1_lite.config import resolve_config
    from lmmr1_lite.plan import estimate

    cfg = resolve_config("fre", None, {"prompts_per_step": 2, "max_new_tokens": 1})
    plan = estimate(cfg, AutoConfig.from_pretrained(cfg.model), False, prompt_tokens=report["prompt_tokens"])
    assert report["planner_peak_gib"] == pytest.approx(plan["peak"] / 2**30)


def test_e2e_step_extend_completions_runs_the_passes_at_the_configs_length(tmp_path):
    """`--extend-completions` after a generation stopped short: every row continued with drawn ordinary tokens to
    max_new_tokens, so that the passes and the update run at the config's length (on the H200 the 3B's decode
    cannot reach 1,024 tokens in a part's time); the generation's planner figure stays at the length generated,
    the training's and the peak's move to the config's."""
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "e2e_step.py"), "--out", str(out),
                    "--set", "prompts_per_step=2", "--set", "max_new_tokens=40", "--generation-deadline-s", "0",
                    "--extend-completions"], check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert report["generation_stopped_at"] == 1 and report["completions_extended_from"] == 1
    assert report["max_new_tokens"] == 40 and report["completion_tokens_mean"] == 40.0
    assert {"backward", "train"} <= set(report["phases"])
    from transformers import AutoConfig

    from lmmr1_lite.config import resolve_config
    from lmmr1_lite.plan import estimate

    def plan(length):
        cfg = resolve_config("fre", None, {"prompts_per_step": 2, "max_new_tokens": length})
        return estimate(cfg, AutoConfig.from_pretrained(cfg.model), False, prompt_tokens=report["prompt_tokens"])
    generated, full = plan(1), plan(40)
    components = report["components"]
    # the generation stopped after 1 token, but its cache, written in place, had room for the prompt + min(40, 128)
    assert report["generation_cache_room_tokens"] == report["prompt_tokens"] + 40
    assert components["generation working set (KV cache, prefill layer, dequantised weight)"]["planner_gib"] == \
        pytest.approx(full["generation_working_set"] / 2**30)
    training = "training working set (activations; the log-prob chunk or the recomputed layer; dequantised weight)"
    assert components[training]["planner_gib"] == pytest.approx(full["training_working_set"] / 2**30)
    assert full["training_working_set"] > 2 * generated["training_working_set"]
    assert report["planner_peak_gib"] == pytest.approx(full["peak"] / 2**30)
    assert report["planner_peak_as_run_gib"] == pytest.approx(
        max(full["generation_peak"], full["training_peak"]) / 2**30)


def test_drawn_completions_continue_every_row_with_ordinary_tokens():
    import torch

    from lmmr1_lite.rollout import Rollout

    batch = Rollout(torch.tensor([[5, 6], [0, 7]]), torch.tensor([[1, 1], [0, 1]]), torch.tensor([[3, 9], [4, 0]]),
                    torch.tensor([[1, 1], [1, 0]]), ["a", "b"], [None, None], torch.zeros(2, 2),
                    torch.tensor([False, False]), torch.tensor([0, 0]))
    longer = _bench_module("e2e_step").with_drawn_completions(batch, 50, vocab=11, seed=0)
    assert longer.completion_ids.shape == (2, 50) and longer.completion_ids[:, :2].tolist() == [[3, 9], [4, 0]]
    assert 0 <= int(longer.completion_ids.min()) and int(longer.completion_ids.max()) < 11
    assert len(set(longer.completion_ids[:, 2:].flatten().tolist())) > 5, "drawn, not one repeated token"
    assert longer.completion_mask.tolist() == [[1] * 50] * 2 and longer.clipped.tolist() == [True, True]
    assert longer.prompt_ids is batch.prompt_ids and longer.texts == ["a", "b"] and longer.logprobs is None
    assert longer.prompt_index.tolist() == [0, 0]


def _bench_module(name: str):
    """A script of bench/ imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_saved_bench_writes_the_layer_against_the_planner(tmp_path):
    """bench/layer_saved.py on the tiny model: its JSON has the planner's figure and both side paths per token,
    the fp32 casts the larger, with the saved storages by shape."""
    report = _bench_module("layer_saved").main(["--quantization", "none", "--tokens", "24",
                                                "--out", str(tmp_path / "layer.json")])
    assert json.loads((tmp_path / "layer.json").read_text()) == report
    assert report["planner_bytes_per_token"] > 0
    assert report["peft_fp32_casts_bytes_per_token"] > 1.4 * report["bf16_side_path_bytes_per_token"] > 0
    assert set(report["by_shape"]) == {"bf16_side_path", "peft_fp32_casts"}
    assert any("float32" in shape for shape in report["by_shape"]["peft_fp32_casts"])


def test_decode_dispatches_counts_a_steps_ops_per_layer_in_each_rollout_mode(tmp_path):
    """bench/decode_dispatches.py on the tiny model (NF4 + LoRA): a decode step's ops in one layer fall from peft's
    fp32 casts to the bf16 side path (lora_autocast) to the merged copies (merge_for_rollouts: one GEMM per
    linear, no bitsandbytes call), while the rest of the step (embedding, masks, head, sampler) is the same in
    every mode; the whole model's count is layers x per layer + the rest."""
    report = _bench_module("decode_dispatches").main(["--rows", "2", "--out", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text()) == report
    modes = list(report["modes"].values())
    fp32, bf16, merged = (m["per_layer"] for m in modes)
    assert fp32 > bf16 > merged > 0
    assert len({m["other"] for m in modes}) == 1 and modes[0]["other"] > 0
    assert all(m["whole_model"] == report["layers"] * m["per_layer"] + m["other"] for m in modes)
    assert modes[0]["vs_peft_fp32_casts"] == 1.0 and modes[2]["vs_peft_fp32_casts"] < 0.7


def test_real_fre_tables_are_judged_from_the_completions_and_rescore_checks_them(tmp_path):
    """bench/real_fre.py's tables: each completion judged now (not the score a file recorded), paired counts
    and the sign test over each problem set, the commonest-answer baseline; --rescore rebuilds eval.json's
    tables from the prediction files and exits 1 when they differ."""
    real_fre = _bench_module("real_fre")
    golds = {f"q{i}": str(i % 3) for i in range(6)}                        # commonest answer: 2 of 6
    base = {"q0": "so \\boxed{0}", "q1": "it is 5", "q2": "\\boxed{2}", "q3": "\\boxed{0}", "q4": "x", "q5": "y"}
    tuned = {"q0": "\\boxed{0}", "q1": "\\boxed{1}", "q2": "\\boxed{2}", "q3": "\\boxed{3}", "q4": "\\boxed{1}",
             "q5": "\\boxed{2}"}
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for name, texts in (("base-cot-8.jsonl", base), ("run-1234-cot-8.jsonl", tuned)):
        (predictions / name).write_text("".join(json.dumps({"id": i, "score": 1.0, "format": 0.0, "tokens": 8 - len(t) % 3,
                                                            "clipped": i == "q5", "completion": t}) + "\n"
                                                for i, t in texts.items()))
    sets = {"2 shipped": ["q0", "q1"], "6 (shipped + 4)": list(golds)}
    tables = real_fre.tables_at(8, real_fre.prediction_files(predictions, 8), golds, sets)
    small, full = tables["2 shipped problems, cap 8"], tables["6 (shipped + 4) problems, cap 8"]
    assert small["n"] == 2 and small["gained"] == 1 and small["lost"] == 0      # q1: "it is 5" vs boxed 1
    assert full["base"]["accuracy"] == 3 / 6 and full["adapter"]["accuracy"] == 5 / 6
    assert (full["gained"], full["lost"], full["p"]) == (3, 1, 0.625)            # q1, q4, q5 gained; q3 lost
    assert full["difference"] == pytest.approx(100 * 2 / 6) and full["commonest_answer_accuracy"] == 2 / 6
    assert full["adapter"]["format"] == 1.0 and full["base"]["format"] == 3 / 6 and full["adapter"]["clipped_ratio"] == 1 / 6

    (tmp_path / "eval.json").write_text(json.dumps({"caps": [8], "problems": golds, "problem_sets": sets,
                                                    "tables": tables}))
    assert real_fre.rescore(tmp_path) == tables
    rescore = [sys.executable, str(REPO_ROOT / "bench" / "real_fre.py"), "--rescore", str(tmp_path)]
    done = subprocess.run(rescore, capture_output=True, text=True)
    assert done.returncode == 0 and "gained 3, lost 1, exact two-sided sign test p = 0.625" in done.stdout, done.stderr
    tables["2 shipped problems, cap 8"]["gained"] = 2                        # eval.json no longer what the files say
    (tmp_path / "eval.json").write_text(json.dumps({"caps": [8], "problems": golds, "problem_sets": sets,
                                                    "tables": tables}))
    assert subprocess.run(rescore, capture_output=True, text=True).returncode == 1


def test_real_fre_cut_tables_are_the_answers_cut_at_the_smaller_cap(tmp_path):
    """--cut: an answer within the smaller cap (its end token counted) is kept as it is; a longer one is cut at
    exactly that many tokens, marked clipped, and judged again (its final box gone, it scores 0); the cut tables
    are recorded in eval.json and rebuilt by --rescore."""
    from lmmr1_lite.tiny import load_qwen_tokenizer

    real_fre = _bench_module("real_fre")
    tokenizer = load_qwen_tokenizer()
    long = "Step one: 3 + 4 = 7. Step two: 7 * 2 = 14. So the answer is \\boxed{14}."
    length = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    records = {"short": {"completion": "\\boxed{2}", "tokens": 6, "clipped": False},
               "long": {"completion": long, "tokens": length + 1, "clipped": False}}
    cut = real_fre.cut_at(records, 10, tokenizer)
    assert cut["short"] is records["short"]
    assert cut["long"]["tokens"] == 10 and cut["long"]["clipped"] and long.startswith(cut["long"]["completion"])
    assert len(tokenizer(cut["long"]["completion"], add_special_tokens=False)["input_ids"]) == 10
    assert real_fre.cut_at(records, length + 1, tokenizer)["long"] is records["long"], "its end token fits"

    golds = {"short": "2", "long": "14"}
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for name in ("base-cot-64.jsonl", "run-1-cot-64.jsonl"):
        (predictions / name).write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in records.items()))
    summary = {"caps": [64], "train_cap": 10, "problems": golds, "problem_sets": {"2 shipped": list(golds)},
               "tables": real_fre.tables_at(64, real_fre.prediction_files(predictions, 64), golds,
                                            {"2 shipped": list(golds)})}
    summary = real_fre.with_cuts(summary, predictions, [10])
    assert summary["cuts"] == {"10": 64}
    at_64, at_10 = summary["tables"]["2 shipped problems, cap 64"], \
        summary["tables"]["2 shipped problems, cap 10 (the cap-64 answers cut at 10 tokens)"]
    assert at_64["base"]["accuracy"] == 1.0 and at_10["base"]["accuracy"] == 0.5
    assert at_10["base"]["clipped_ratio"] == 0.5 and at_10["base"]["mean_length"] == (6 + 10) / 2
    (tmp_path / "eval.json").write_text(json.dumps(summary))
    assert real_fre.rescore(tmp_path) == summary["tables"]
    with pytest.raises(SystemExit, match="below the largest evaluated cap"):
        real_fre.with_cuts(summary, predictions, [64])


def test_real_flips_counts_gains_losses_and_shared_flips_against_independence():
    """bench/real_flips.py: per adapter the problems gained and lost against the base; per pair those both
    gained (lost) beside |A| |B| / (problems the base missed (solved)); per problem how many adapters are right."""
    flips = _bench_module("real_flips")
    base = {"p1": True, "p2": True, "p3": False, "p4": False, "p5": False}
    adapters = {"a": {"p1": False, "p2": True, "p3": True, "p4": True, "p5": False},
                "b": {"p1": False, "p2": True, "p3": True, "p4": False, "p5": False}}
    s = flips.flip_summary(base, adapters)
    assert s["problems"] == 5 and s["base_right"] == 2
    assert s["adapters"] == {"a": {"right": 3, "gained": 2, "lost": 1}, "b": {"right": 2, "gained": 1, "lost": 1}}
    (pair,) = s["pairs"]
    assert (pair["gained_both"], pair["gained_both_if_independent"]) == (1, 2 * 1 / 3)
    assert (pair["lost_both"], pair["lost_both_if_independent"]) == (1, 1 * 1 / 2)
    # p1 right by none, p2 by both; of the missed: p5 by none, p4 by one, p3 by both
    assert s["adapters_right_per_problem"] == {"base right": [1, 0, 1], "base wrong": [1, 1, 1]}
