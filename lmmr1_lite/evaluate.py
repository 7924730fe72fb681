"""`lmmr1-lite eval` (base vs adapters, one comparison table) and `lmmr1-lite export` (merged HF model).

An adapter written by `train` knows its run: the run's `config.yaml` supplies the prompt template,
lengths and stop tokens, and `adapter_config.json` names the base model (for a random-init run, the
run's saved `base_model/`). So `lmmr1-lite eval --adapter runs/fre-X/adapter` needs nothing else.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path


from . import hub, models, rewards
from .config import ConfigError, TrainConfig, coerce, load_yaml, parse_sets
from .data import DataOptions, build_messages, load_rows, prepare
from .tasks import TASKS
from .tasks import generate as generate_task
from .rollout import generate


def adapter_base(adapter: Path) -> str:
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"{adapter}: no adapter_config.json (not a PEFT adapter directory)")
    return json.loads(config_file.read_text())["base_model_name_or_path"]


def run_config(adapter: Path | None, model: str | None, sets: dict) -> TrainConfig:
    """The adapter's run config when there is one (else the defaults), with the base model resolved."""
    run_file = adapter.parent / "config.yaml" if adapter is not None else None
    values = load_yaml(run_file) if run_file is not None and run_file.is_file() else {}
    values.update({k: coerce(k, v, "command line") for k, v in sets.items()})
    values["model"] = model or (adapter_base(adapter) if adapter is not None else values.get("model"))
    if not values.get("model"):
        raise ConfigError("eval/export need --model or an --adapter that names its base")
    hub.check_model_source(values["model"])
    values.update(random_init=False, quantization="none", output_dir=None)
    return TrainConfig(**values)


def load_policy(cfg: TrainConfig, adapter: Path | None, merge: bool = False):
    """The base model in `dtype` (never quantised: eval and export see exact weights), adapter applied; with
    `merge`, folded into the base weights (peft's merge_and_unload: no LoRA side path per layer, so generation
    runs at the base's speed; the merged weights are rounded to `dtype`, which can flip a few greedy tokens)."""
    base = models.load_base_model(cfg, models.pick_device())
    if adapter is None:
        return base
    from peft import PeftModel
    try:
        policy = PeftModel.from_pretrained(base, adapter)
        return policy.merge_and_unload() if merge else policy
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. LoRA shapes of another base: size mismatch
        lines = str(err).strip().splitlines() or [type(err).__name__]
        detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
        raise ConfigError(f"adapter {adapter}: does not fit the base model {cfg.model} ({detail[:200]}); "
                          "pass the base it was trained on with --model") from None


def evaluate_model(policy, tokenizer, examples, cfg: TrainConfig, pass_k: int = 0, image_processor=None) -> dict:
    """Greedy accuracy and format rate on `examples` (and pass@k over k samples at the training
    temperature), scored with the run's configured rewards: "accuracy" is the task reward (`sokoban`
    for a Sokoban run, else `accuracy`). Also the accuracy of always giving the commonest gold answer,
    the bar a constant guess clears. Empty dict for no examples."""
    if not examples:
        return {}
    stops = dict(stop_ids=[tokenizer.eos_token_id], stop_strings=cfg.stop_tokens)  # `</answer>`: several tokens
    task = rewards.task_reward(cfg.rewards)
    messages = [build_messages(e, cfg.system_prompt, cfg.prompt_template) for e in examples]
    answers = [e.answer for e in examples]
    accuracy, formats, texts = [], [], []
    for start in range(0, len(examples), 64):
        batch = generate(policy, tokenizer, messages[start:start + 64], num_generations=1,
                         max_new_tokens=cfg.max_new_tokens, temperature=1.0, **stops, greedy=True,
                         image_processor=image_processor)
        _, parts, _ = rewards.score(batch.texts, examples[start:start + 64], {task: 1.0})
        accuracy += parts[task]
        formats += parts["format"]
        texts += batch.texts
    result = {"n": len(examples), "accuracy": sum(accuracy) / len(examples), "format": sum(formats) / len(examples),
              "majority_answer_accuracy": max(answers.count(a) for a in set(answers)) / len(answers),
              "samples": [{"prompt": e.prompt, "answer": e.answer, "completion": c}
                          for e, c in zip(examples[:8], texts[:8])]}
    if pass_k:
        solved = []
        for start in range(0, len(examples), 16):
            batch = generate(policy, tokenizer, messages[start:start + 16], num_generations=pass_k,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, **stops,
                             top_k=cfg.top_k, top_p=cfg.top_p,
                             image_processor=image_processor)
            per_row = [e for e in examples[start:start + 16] for _ in range(pass_k)]
            _, parts, _ = rewards.score(batch.texts, per_row, {task: 1.0})
            solved += [max(parts[task][i:i + pass_k]) for i in range(0, len(per_row), pass_k)]
        result[f"pass@{pass_k}"] = sum(solved) / len(solved)
    return result


def markdown_table(rows: list[tuple[str, dict]], data: str, pass_k: int) -> str:
    head = f"| model | {data} accuracy | format |" + (f" pass@{pass_k} |" if pass_k else "") + " n |"
    lines = [head, "|---|---:|---:|" + ("---:|" if pass_k else "") + "---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['format']:.3f} |"
                     + (f" {r[f'pass@{pass_k}']:.3f} |" if pass_k else "") + f" {r['n']} |")
    return "\n".join(lines) + "\n"


def run_eval(args) -> Path:
    """`eval --data TASK_OR_FILE`: the run's own task (or a data file in a training format), every row unless
    --limit, scored with the run's configured task reward."""
    sets = parse_sets(args.sets)
    if args.max_new_tokens is not None:
        sets["max_new_tokens"] = args.max_new_tokens
    model, data, pass_k, out = args.model, args.data, args.pass_k, args.out
    adapter_paths = [Path(a) for a in args.adapter]
    cfg = run_config(adapter_paths[0] if adapter_paths else None, model, sets)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
    if data in TASKS:  # the task's held-out split for this seed: the same prompts the run held out
        test = generate_task(data, 0, args.limit or max(cfg.eval_size, 1), cfg.seed)[1]
    else:
        test = load_rows(data, options=DataOptions.from_config(cfg))[0]
        if args.limit is not None and args.limit < len(test):
            print(f"--limit {args.limit}: evaluating the first {args.limit} of {len(test)} rows "
                  f"({len(test) - args.limit} dropped)")
            test = test[:args.limit]
    test = prepare(test, tokenizer, cfg.system_prompt, cfg.max_prompt_tokens, cfg.min_pixels, cfg.max_pixels,
                   None, cfg.prompt_template)
    if not test:
        raise ConfigError(f"data {data}: no usable evaluation rows")
    images = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    rows = [(f"base ({Path(cfg.model).name})",
             evaluate_model(load_policy(cfg, None), tokenizer, test, cfg, pass_k, images))]
    for adapter in adapter_paths:
        adapter_cfg = run_config(adapter, model, sets)
        label = adapter.parent.name + "/" + adapter.name if (adapter.parent / "config.yaml").exists() else str(adapter)
        rows.append((label + (" (merged)" if args.merge else ""),
                     evaluate_model(load_policy(adapter_cfg, adapter, args.merge), tokenizer, test, adapter_cfg,
                                    pass_k, images)))
    out_dir = Path(out or f"evals/{datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps({"data": data, "results": dict(rows)}, indent=2))
    table = markdown_table(rows, Path(data).name, pass_k)
    (out_dir / "eval.md").write_text(table)
    print(table + f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.md'}")
    return out_dir


def model_card(cfg: TrainConfig, adapter: Path, merged: bool) -> str:
    """A README.md for an exported model or adapter: base model, data, steps and the run's eval table."""
    run_dir = adapter.parent
    lines = ["---", f"base_model: {cfg.model}", "library_name: " + ("transformers" if merged else "peft"),
             "tags: [lmmr1-lite, grpo, lmm-r1, qwen2.5-vl]", "---", "",
             f"# {'Merged model' if merged else 'LoRA adapter'} trained with lmmr1-lite (stage {cfg.stage.upper()})", "",
             f"- base model: `{cfg.model}`", f"- data: `{cfg.data}`" + (f" (preset {cfg.data_preset})"
                                                                       if cfg.data_preset != "auto" else ""),
             f"- GRPO steps: {cfg.max_steps} x {cfg.prompts_per_step} prompts x {cfg.num_generations} completions, "
             f"LoRA r={cfg.lora_r}, learning rate {cfg.learning_rate:g}, beta {cfg.beta:g}, loss {cfg.loss_agg}",
             f"- rewards: {', '.join(f'{w:g} x {n}' for n, w in cfg.rewards.items())}",
             "- recipe: LMM-R1 (arXiv 2503.07536), two-stage rule-based RL, reproduced on one GPU with LoRA", ""]
    evaluated = run_dir / "eval.json"
    if evaluated.is_file():
        scores = json.loads(evaluated.read_text())
        if scores.get("before") and scores.get("after"):
            lines += ["| held-out | accuracy | format |", "|---|---:|---:|"]
            lines += [f"| {when} | {scores[when]['accuracy']:.3f} | {scores[when]['format']:.3f} |"
                      for when in ("before", "after")]
            lines.append("")
    if merged:
        lines.append("Load with `AutoModelForImageTextToText.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)`.")
    else:
        lines.append("Load with `peft.AutoPeftModel.from_pretrained(DIR)` (the base class is named in adapter_config.json).")
    return "\n".join(lines) + "\n"


def push_to_hub(out_dir: Path, repo: str) -> None:
    """Upload an exported directory to the Hub (needs a token: `hf auth login`); one line when it cannot."""
    from huggingface_hub import HfApi

    if hub.offline() or not hub.hub_reachable():
        raise ConfigError(f"--push-to-hub {repo}: the Hub cannot be reached; {out_dir} is written, push it later with "
                          f"`hf upload {repo} {out_dir}`")
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(out_dir))
    except Exception as err:  # noqa: BLE001 - no token, no rights, a name taken: one line, the export stays
        raise ConfigError(f"--push-to-hub {repo}: {type(err).__name__}: {str(err).splitlines()[0][:160]} "
                          f"({out_dir} is written)") from None
    print(f"pushed {out_dir} to https://huggingface.co/{repo}")


def run_export(args) -> Path:
    adapter_path, out_dir, merge = Path(args.adapter), Path(args.out), args.merge
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a directory; choose another directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is not empty; choose another directory")
    cfg = replace(run_config(adapter_path, args.model, {}), dtype=args.dtype)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
    policy = load_policy(cfg, adapter_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge:
        merged = policy.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
    else:
        policy.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = Path(cfg.model)
    for name in ("preprocessor_config.json", "chat_template.json", "chat_template.jinja"):
        if (source / name).is_file() and not (out_dir / name).exists():
            shutil.copy(source / name, out_dir / name)
    (out_dir / "README.md").write_text(model_card(cfg, adapter_path, merge))
    print(f"{'merged model' if merge else 'adapter'} ({args.dtype}) with tokenizer, processor config and model card: "
          f"{out_dir}")
    if args.push_to_hub:
        push_to_hub(out_dir, args.push_to_hub)
    return out_dir


def add_parsers(sub) -> None:
    from .benchmarks import NAMES

    ev = sub.add_parser("eval", help="greedy accuracy of a base model and adapters, as one table: on a task or "
                                     "data file, or on the paper's benchmarks (--benchmark)")
    ev.add_argument("--model", default=None, help="base model (default: the one the first adapter names)")
    ev.add_argument("--adapter", action="append", default=[], help="adapter directory (repeatable)")
    ev.add_argument("--benchmark", default=None, metavar="NAMES",
                    help=f"comma-separated benchmarks, each scored by its own rule: {', '.join(NAMES)}")
    ev.add_argument("--data", default=None, help="without --benchmark: a generated task or a data file (required); "
                    "with it: comma-separated local copies (file, folder) or Hub ids, one per benchmark in order "
                    "(default: each benchmark's Hub id)")
    ev.add_argument("--prompt", default="auto", choices=["auto", "lmmr1", "cot", "run"],
                    help="with --benchmark: lmmr1 (training format), cot (no system prompt, \\boxed{}), auto (cot "
                         "for the base row, lmmr1 for adapters: the paper's choice), run (the adapter's own run's system "
                         "prompt, template and stop strings, for the base row too)")
    ev.add_argument("--scoring", default=None, metavar="NAME=RULE",
                    help="with --benchmark: comma-separated alternative scoring rules, e.g. mathvision=lenient "
                         "(default: MATH-V's official rule), gsm8k=flexible-extract or gsm8k=strict-match "
                         "(lm-evaluation-harness's filters; default: kit); eval.md says which rule each number follows")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows (default: every row; "
                    "what is dropped is printed)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation cap (default: 4096 with --benchmark, else the run's max_new_tokens)")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (--benchmark)")
    ev.add_argument("--pass-k", type=int, default=0, help="also sample k completions per prompt (the run's temperature, "
                    "top_k, top_p) for pass@k and the samples' mean accuracy; with --benchmark kept in a `-pass<k>` "
                    "predictions file")
    ev.add_argument("--out", default=None, help="output directory (default evals/<timestamp>); --benchmark "
                    "resumes from the predictions already there")
    ev.add_argument("--merge", action="store_true", help="merge each adapter into the base weights before "
                    "generating: the merged model is the base architecture, so it generates at the base's speed "
                    "(unmerged LoRA layers took 3.3 s a GSM8K problem against the base's 2.3 here); merged bf16 "
                    "weights can flip a few greedy answers; rows and prediction files are labelled `merged`")
    ev.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ex = sub.add_parser("export", help="save an adapter merged into its base (Hugging Face format)")
    ex.add_argument("--adapter", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--merge", action="store_true", help="merge the LoRA weights into the base model")
    ex.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ex.add_argument("--push-to-hub", default=None, metavar="REPO",
                    help="also upload the exported directory to this Hub repository (needs `hf auth login`)")


def run(args) -> int:
    if args.command == "eval":  # `eval --benchmark` goes to benchmark_eval.run_benchmarks (cli.py)
        if not args.data:
            raise ConfigError("eval needs --data (a task or data file) or --benchmark NAMES")
        else:
            if args.limit is not None and args.limit < 1:
                raise ConfigError(f"--limit must be >= 1, got {args.limit}")
            run_eval(args)
    else:
        run_export(args)
    return 0
