"""`lmmr1-lite eval --benchmark math500,mathvista,...`: the paper's benchmarks, each scored by its own rule,
for the base model and each adapter, as a table in the shape of LMM-R1's Table 1 beside the paper's rows.

Every row is evaluated unless `--limit N` says otherwise (and says what it dropped). Decoding is greedy, in
batches, with a progress bar. Each prediction is appended to
`predictions/<benchmark>/<model>-<prompt>-<cap>.jsonl` as soon as its batch is scored, so an interrupted
evaluation resumes where it stopped: rows already there are not generated again (and a file is reused only at
its own prompt and generation cap).

Prompt modes (`--prompt`): `lmmr1` (LMM-R1's system prompt and `<think>/<answer>` format, how the paper
evaluated its trained models), `cot` (no system prompt; step by step and `\\boxed{}`, how the paper evaluated
its baseline, because the format prompt hurt the untrained model), `auto` (cot for the base row, lmmr1 for
adapters: the paper's choice), `run` (every row under the adapter's own run's system prompt, template, stop
strings and format reward; the base row under the first adapter's, so before and after see one prompt).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import benchmarks, models
from .config import ConfigError, TrainConfig
from .data import build_messages, prepare
from .rollout import generate

# LMM-R1 Table 1, Qwen2.5-VL-3B-Instruct (../shared/reference/lmm-r1.md), in %. The paper's "text avg"
# averages MATH500 and GPQA; its "MM avg" the five columns after it, OlympiadBench included.
PAPER_ROWS = {
    "baseline (CoT)": [63.40, 30.30, 46.85, 10.28, 23.59, 34.64, 51.40, 60.70, 36.12],
    "FRE-Multi": [61.80, 27.27, 44.54, 11.80, 24.74, 38.45, 58.76, 64.20, 38.71],
    "FRE-Text": [65.40, 36.87, 51.14, 15.62, 25.76, 38.83, 55.15, 61.40, 39.35],
    "MGT-Geo": [65.80, 32.32, 49.06, 14.63, 26.84, 41.80, 54.39, 59.00, 39.33],
    "MGT-PerceReason": [63.80, 38.89, 51.35, 15.62, 26.35, 41.55, 58.03, 63.20, 40.95],
}
PAPER_COLUMNS = ["MATH500", "GPQA", "text avg", "OlympiadBench", "MathVision", "MathVerse", "MM-Star", "MathVista",
                 "MM avg"]
AVERAGES = {"text avg": ("MATH500", "GPQA"),
            "MM avg": ("OlympiadBench", "MathVision", "MathVerse", "MM-Star", "MathVista")}
PAPER_SOKOBAN = {"baseline (CoT)": 42.35, "FRE-Text": 44.81}  # agent tasks, MGT-Sokoban: 47.91


@dataclass
class EvalRequest:
    """What `eval --benchmark` was asked for."""
    names: list[str]
    data: list[str | None]       # per benchmark: a local file/dir or Hub id (None: the benchmark's Hub id)
    model: str | None
    adapters: list[str]
    prompt: str = "auto"
    limit: int | None = None
    max_new_tokens: int = 4096
    batch_size: int = 16
    out: str = "evals/benchmarks"
    sets: dict | None = None
    scoring: dict[str, str] | None = None  # benchmark -> scoring rule (--scoring), when not its default
    merge: bool = False                    # adapters folded into the base weights (--merge)
    pass_k: int = 0                        # also k sampled completions per row for pass@k (--pass-k)


def parse_request(args) -> EvalRequest:
    names = [n.strip() for n in args.benchmark.split(",") if n.strip()]
    for name in names:
        benchmarks.get(name)  # one line naming the choices when unknown
    data = [d.strip() or None for d in args.data.split(",")] if args.data else [None] * len(names)
    if len(data) != len(names):
        raise ConfigError(f"--data: {len(data)} paths for {len(names)} benchmarks; give one per benchmark, in order")
    if args.prompt not in ("auto",) + benchmarks.MODES:
        raise ConfigError(f"--prompt must be auto, {', '.join(benchmarks.MODES)}, got {args.prompt!r}")
    if args.prompt == "run" and not args.adapter:
        raise ConfigError("--prompt run scores under a training run's own prompt: give that run's --adapter")
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size), ("--pass-k", getattr(args, "pass_k", None) or None)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    from .config import parse_sets
    scoring = {}
    for item in filter(None, (part.strip() for part in (getattr(args, "scoring", None) or "").split(","))):
        name, _, rule = item.partition("=")
        if name not in names:
            raise ConfigError(f"--scoring {item}: {name!r} is not one of the --benchmark names ({', '.join(names)})")
        bench = benchmarks.get(name)
        if rule not in bench.SCORINGS:
            bench.use_scoring(rule)  # one line naming the choices
        scoring[name] = rule
    max_new_tokens = EvalRequest.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    return EvalRequest(names, data, args.model, args.adapter, args.prompt, args.limit, max_new_tokens,
                       args.batch_size, args.out or "evals/benchmarks", parse_sets(args.sets), scoring,
                       bool(getattr(args, "merge", False)), getattr(args, "pass_k", 0) or 0)


def model_label(adapter: Path | None) -> str:
    """A stable, filename-safe name for a model row: `base`, or the adapter's run and a digest of its path."""
    if adapter is None:
        return "base"
    resolved = str(adapter.resolve())
    name = adapter.parent.name if adapter.name == "adapter" else adapter.name
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class PromptSpec:
    """How one row's model is prompted: a benchmark mode, and in `run` mode the run's own system prompt,
    template, stop strings and format reward."""
    mode: str
    system: str = ""
    template: str = "{prompt}"
    stop_strings: tuple[str, ...] = ()
    format_reward: str = ""

    @classmethod
    def of(cls, mode: str, cfg: TrainConfig) -> "PromptSpec":
        if mode != "run":
            return cls(mode, stop_strings=("</answer>",) if mode == "lmmr1" else ())  # several tokens in Qwen's vocab
        reward = "format_boxed" if "format_boxed" in cfg.rewards else "format"
        return cls(mode, cfg.system_prompt, cfg.prompt_template, tuple(cfg.stop_tokens), reward)

    @property
    def name(self) -> str:
        """For file names and table rows: the mode, and in run mode a digest of the prompt."""
        if self.mode != "run":
            return self.mode
        digest = hashlib.sha256(json.dumps([self.system, self.template, self.stop_strings]).encode()).hexdigest()
        return f"run{digest[:8]}"

    def describe(self) -> str:
        if self.mode != "run":
            return self.mode
        return f"{self.name} (system {self.system!r}, template {self.template!r}, stop {list(self.stop_strings)!r})"


def read_predictions(path: Path) -> dict:
    """Row id -> prediction, from a (possibly interrupted) predictions file; a torn last line is ignored."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                done[record["id"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return done


def benchmark_messages(tokenizer, cfg: TrainConfig, job: dict, rows: list[dict]) -> list[list[dict]]:
    """The chat messages of benchmark rows under the job's prompt; images decoded and fitted into
    [min_pixels, max_pixels], never truncated; an unreadable image is one line naming the row."""
    bench, spec, examples = job["bench"], job["prompt"], []
    for row in rows:
        try:
            examples += prepare([bench.to_example(row, spec.mode, job["base_dir"])], tokenizer, "", 10**9,
                                cfg.min_pixels, cfg.max_pixels)
        except (ValueError, OSError) as err:
            raise ConfigError(f"{bench.name} row {bench.row_id(row)}: image unreadable ({err})") from None
    return [build_messages(e, spec.system, spec.template) for e in examples]


def predict_rows(job: dict, path: Path, desc: str, per_call: int, records_of) -> list[dict]:
    """The record of every row of the job, in order: those `path` already holds (an interrupted evaluation's)
    read back, the others made `per_call` rows at a time by `records_of(rows)` and appended to `path` as each
    call ends, under a progress bar."""
    bench, rows = job["bench"], job["rows"]
    done = read_predictions(path)
    todo = [row for row in rows if bench.row_id(row) not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=desc, unit="row", dynamic_ncols=True)
    with path.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), per_call):
            batch_rows = todo[start:start + per_call]
            for record in records_of(batch_rows):
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                done[record["id"]] = record
            handle.flush()
            bar.update(len(batch_rows))
    bar.close()
    return [done[bench.row_id(row)] for row in rows]


def sample_benchmark(policy, tokenizer, cfg: TrainConfig, job: dict, k: int) -> dict:
    """`k` sampled completions per row (the run's `temperature`, `top_k`, `top_p`; seeded by `seed`), appended
    row by row to the greedy file's name with `-pass<k>` (resumed like it); returns `pass@k` (a row counts as
    solved when any of its samples scores 1) and `sampled_accuracy` (the samples' mean score: what a training
    batch at this temperature sees)."""
    bench, spec = job["bench"], job["prompt"]
    generator = torch.Generator(policy.device).manual_seed(cfg.seed)

    def sampled(rows: list[dict]) -> list[dict]:
        out = generate(policy, tokenizer, benchmark_messages(tokenizer, cfg, job, rows), num_generations=k,
                       max_new_tokens=job["max_new_tokens"], temperature=cfg.temperature, top_k=cfg.top_k,
                       top_p=cfg.top_p, stop_ids=[tokenizer.eos_token_id], stop_strings=list(spec.stop_strings),
                       image_processor=job["image_processor"], generator=generator)
        scores = bench.score_batch([row for row in rows for _ in range(k)], out.texts)
        lengths = out.completion_mask.sum(1).tolist()
        parts = [slice(i * k, (i + 1) * k) for i in range(len(rows))]
        return [{"id": bench.row_id(row), "scores": scores[part], "tokens": [int(n) for n in lengths[part]],
                 "clipped": [bool(c) for c in out.clipped[part].tolist()], "completions": out.texts[part]}
                for row, part in zip(rows, parts)]
    path = job["path"].with_name(f"{job['path'].stem}-pass{k}.jsonl")
    per_call = max(1, job["batch_size"] // k)  # about batch_size sequences in each generate call
    records = predict_rows(job, path, f"{job['label']} {bench.name} pass@{k}", per_call, sampled)
    return {f"pass@{k}": sum(max(r["scores"]) for r in records) / len(records),
            "sampled_accuracy": sum(sum(r["scores"]) for r in records) / (k * len(records)),
            "temperature": cfg.temperature}


def evaluate_benchmark(policy, tokenizer, cfg: TrainConfig, job: dict) -> dict:
    """Greedy predictions of one model on one benchmark's rows, appended to `job["path"]` batch by batch;
    returns {"accuracy", "n"} over every row (resumed rows included)."""
    bench, rows, spec = job["bench"], job["rows"], job["prompt"]

    def greedy(batch_rows: list[dict]) -> list[dict]:
        out = generate(policy, tokenizer, benchmark_messages(tokenizer, cfg, job, batch_rows), num_generations=1,
                       max_new_tokens=job["max_new_tokens"], temperature=1.0, stop_ids=[tokenizer.eos_token_id],
                       stop_strings=list(spec.stop_strings), greedy=True, image_processor=job["image_processor"])
        scores = bench.score_batch(batch_rows, out.texts)
        lengths = out.completion_mask.sum(1).tolist()
        records = []
        for row, text, score, tokens, clipped in zip(batch_rows, out.texts, scores, lengths, out.clipped.tolist()):
            record = {"id": bench.row_id(row), "extracted": bench.extract(row, text), "score": score,
                      "format": answer_format(text, spec), "tokens": int(tokens), "clipped": bool(clipped),
                      "completion": text, **bench.details(row)}
            if hasattr(bench, "variants"):  # other rules' verdicts (GSM8K: lm-evaluation-harness's filters)
                record["variants"] = bench.variants(row, text)
            records.append(record)
        return records
    records = predict_rows(job, job["path"], f"{job['label']} {bench.name} ({spec.name})", job["batch_size"], greedy)
    result = {"accuracy": sum(r["score"] for r in records) / len(records), "n": len(records)}
    measured = [r for r in records if "tokens" in r]  # predictions written before these fields lack them
    if measured:
        result.update({"format": sum(r["format"] for r in measured) / len(measured),
                       "mean_length": sum(r["tokens"] for r in measured) / len(measured),
                       "clipped_ratio": sum(r["clipped"] for r in measured) / len(measured)})
    if hasattr(bench, "variants"):  # recomputed from the completions, so resumed rows count too
        verdicts = [bench.variants(row, record.get("completion") or "") for row, record in zip(rows, records)]
        result["variants"] = {name: sum(v[name] for v in verdicts) / len(verdicts) for name in verdicts[0]}
    result["scores"] = {r["id"]: r["score"] for r in records}
    return result


def answer_format(completion: str, spec: PromptSpec) -> float:
    """The format the prompt asks for: LMM-R1's tags (lmmr1), one final `\\boxed{}` (cot), or in run mode the
    run's own format reward."""
    from .rewards import boxed_format_reward, format_reward

    name = spec.format_reward or ("format" if spec.mode == "lmmr1" else "format_boxed")
    return (format_reward if name == "format" else boxed_format_reward)(completion)


def completion_table(results: dict[str, dict[str, dict]], names: list[str]) -> str:
    """Per model and benchmark: accuracy, answer format, mean completion tokens, clipped ratio (hit the cap),
    and, for each row after the first, the problems it solves that the first row does not (gained), the
    reverse (lost), and the exact two-sided sign test's p on those discordant problems."""
    from .report import paired

    lines = ["| model | benchmark | accuracy | format | mean tokens | clipped | gained / lost vs first row | "
             "sign-test p |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    first = next(iter(results.values()), {})
    for index, (label, per_bench) in enumerate(results.items()):
        for name in names:
            r = per_bench.get(name)
            if r is None:
                continue
            counts = ""
            if index and name in first:
                pair = paired(first[name]["scores"], r["scores"])
                counts = f"+{pair['gained']} / -{pair['lost']} | {pair['p']:.3g}"
            cells = [f"{100 * r['accuracy']:.1f}"] + ([f"{100 * r['format']:.1f}", f"{r['mean_length']:.0f}",
                                                       f"{100 * r['clipped_ratio']:.1f}"] if "format" in r else [""] * 3)
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {counts or ' | '} |")
    return "\n".join(lines) + "\n"


def sampling_table(results: dict[str, dict[str, dict]], names: list[str], k: int) -> str:
    """With --pass-k k: per model and benchmark, the sampled completions' mean accuracy and pass@k beside the
    greedy accuracy ('' without it)."""
    if not k:
        return ""
    lines = [f"| model | benchmark | greedy accuracy | temperature | sampled accuracy | pass@{k} |",
             "|---|---|---:|---:|---:|---:|"]
    for label, per_bench in results.items():
        for name in names:
            r = per_bench[name]
            lines.append(f"| {label} | {name} | {100 * r['accuracy']:.1f} | {r['temperature']:g} | "
                         f"{100 * r['sampled_accuracy']:.1f} | {100 * r[f'pass@{k}']:.1f} |")
    return "\n".join(lines) + "\n"


def rules(request: EvalRequest, results: dict[str, dict[str, dict]] | None = None,
          prompts: dict[str, "PromptSpec"] | None = None) -> str:
    """What each number comes from: per benchmark, its scoring rule (and which one, where it has several),
    how the paper's evaluation differs, and other rules' accuracies where the benchmark computes them; the
    prompt each row was generated with."""
    lines = ["Rules (rule-based scoring throughout: no language model extracts or judges an answer):"]
    for name in request.names:
        bench = benchmarks.get(name)
        which = f" [scoring: {bench.scoring}]" if bench.scoring else ""
        lines.append(f"- {name}{which}: {bench.rule or 'see lmmr1_lite/benchmarks/' + name + '.py'}. "
                     f"Paper's evaluation: {bench.PAPER_EVAL or 'as ours'}.")
        for label, per_bench in (results or {}).items():
            variants = per_bench.get(name, {}).get("variants")
            if variants:
                lines.append(f"  - {label}: " + ", ".join(f"{variant} {100 * accuracy:.1f}"
                                                          for variant, accuracy in variants.items()))
    lines.append(f"Greedy decoding, at most {request.max_new_tokens} new tokens; prompt mode {request.prompt} "
                 "(cot: the benchmark's chain-of-thought prompt, no system prompt; lmmr1: LMM-R1's; run: the "
                 "adapter's own run's system prompt and template).")
    if request.merge:
        lines.append("Adapters merged into the base weights before generating (--merge; `-merged` rows).")
    for label, spec in (prompts or {}).items():
        lines.append(f"- prompt of {label}: {spec.describe()}")
    return "\n".join(lines) + "\n"


def table(results: dict[str, dict[str, dict]], names: list[str]) -> str:
    """Markdown in the shape of Table 1: a row per model, a column per benchmark (% accuracy) and the
    paper's averages where all their columns were evaluated; the paper's Qwen2.5-VL-3B rows beside."""
    columns = [benchmarks.get(n).paper_column for n in names]
    ordered = [c for c in PAPER_COLUMNS if c in columns or (c in AVERAGES and set(AVERAGES[c]) <= set(columns))]
    ordered += [c for c in columns if c not in ordered]
    lines = ["| model | " + " | ".join(ordered) + " |", "|---|" + "---:|" * len(ordered)]
    for label, per_bench in results.items():
        values = {benchmarks.get(n).paper_column: 100 * per_bench[n]["accuracy"] for n in names if n in per_bench}
        for avg, parts in AVERAGES.items():
            if set(parts) <= set(values):
                values[avg] = sum(values[p] for p in parts) / len(parts)
        lines.append(f"| {label} | " + " | ".join(f"{values[c]:.2f}" if c in values else "" for c in ordered) + " |")
    for name, paper in PAPER_ROWS.items():
        values = dict(zip(PAPER_COLUMNS, paper))
        if "Sokoban" in ordered and name in PAPER_SOKOBAN:
            values["Sokoban"] = PAPER_SOKOBAN[name]
        lines.append(f"| paper: {name} (LMM-R1, Qwen2.5-VL-3B) | "
                     + " | ".join(f"{values[c]:.2f}" if c in values else "" for c in ordered) + " |")
    return "\n".join(lines) + "\n"


def run_benchmarks(args) -> Path:
    request = parse_request(args)
    previous = {name: benchmarks.get(name).scoring for name in request.scoring or {}}
    for name, rule in (request.scoring or {}).items():
        benchmarks.get(name).use_scoring(rule)
    try:
        return _run(request)
    finally:  # the benchmarks are shared objects: their default rules come back after this evaluation
        for name, rule in previous.items():
            benchmarks.get(name).use_scoring(rule)


def _run(request: EvalRequest) -> Path:
    from .evaluate import load_policy, run_config

    loaded = {}
    for name, data in zip(request.names, request.data):  # every benchmark's rows checked before any model loads
        rows = benchmarks.load_rows(name, data)
        if request.limit is not None and request.limit < len(rows):
            print(f"--limit {request.limit}: {name} evaluated on its first {request.limit} of {len(rows)} rows "
                  f"({len(rows) - request.limit} dropped)")
            rows = rows[:request.limit]
        base_dir = Path(data).parent if data and Path(data).is_file() else Path(data) if data and Path(data).is_dir() \
            else Path(".")
        loaded[name] = (rows, base_dir)
    out = Path(request.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    adapters = [None] + [Path(a) for a in request.adapters]
    results: dict[str, dict] = {}
    prompts: dict[str, PromptSpec] = {}
    for adapter in adapters:
        cfg = run_config(adapter if adapter is not None else (Path(request.adapters[0]) if request.adapters else None),
                         request.model, request.sets or {})
        label = model_label(adapter) + ("-merged" if adapter is not None and request.merge else "")
        row_name = f"base ({Path(cfg.model).name})" if adapter is None else label
        mode_of = request.prompt if request.prompt != "auto" else ("cot" if adapter is None else "lmmr1")
        spec = PromptSpec.of(mode_of, cfg)  # run mode: the base row takes the first adapter's run config
        tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
        policy = load_policy(replace(cfg, output_dir=None), adapter, request.merge)
        image_processor = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
        row_label = f"{row_name}, {spec.name}"
        results[row_label], prompts[row_label] = {}, spec
        for name in request.names:
            rows, base_dir = loaded[name]
            job = {"bench": benchmarks.get(name), "rows": rows, "prompt": spec, "label": label,
                   "path": out / "predictions" / name / f"{label}-{spec.name}-{request.max_new_tokens}.jsonl",
                   "base_dir": base_dir,
                   "batch_size": request.batch_size, "max_new_tokens": request.max_new_tokens,
                   "image_processor": image_processor}
            results[row_label][name] = evaluate_benchmark(policy, tokenizer, cfg, job)
            if request.pass_k:
                results[row_label][name].update(sample_benchmark(policy, tokenizer, cfg, job, request.pass_k))
        del policy
    sampled = sampling_table(results, request.names, request.pass_k)
    markdown = table(results, request.names) + "\n" + completion_table(results, request.names) + "\n" + \
        (sampled + "\n" if sampled else "") + rules(request, results, prompts)
    (out / "eval.md").write_text(markdown)
    scoring = {name: benchmarks.get(name).scoring or "single rule" for name in request.names}
    (out / "eval.json").write_text(json.dumps({"benchmarks": request.names, "scoring": scoring, "results": results},
                                              indent=2))
    print(markdown + f"wrote {out / 'eval.md'}, {out / 'eval.json'} and the predictions under {out / 'predictions'}")
    return out
