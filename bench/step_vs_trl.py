"""One GRPO step of lmmr1-lite against TRL's GRPOTrainer, side by side, at Qwen's real vocabulary.

The same random-init Qwen2.5-VL directory (Qwen's BPE tokenizer, 151,936 logits, hidden 256, 4 layers,
the tiny vision tower; `lmmr1_lite.tiny.write_real_vocab_model_dir`) is trained by both systems with the
same settings: 2 prompts x 8 completions x 64 new tokens (random weights rarely stop early, so both run
to the cap), LoRA r16 on the language model, beta 0.04 (a reference pass with the adapter off), token-mean
loss, one update per generation batch, fp32, gradient checkpointing off in both. Shapes:

  text40   ~40-token text prompts
  text600  ~600-token text prompts
  image    ~40-token text with one 448x448 image (256 image tokens) per prompt

Each (system, shape) runs in a process of its own, the systems alternating, `--rounds` times; a row
reports the median step time over steps 3 and later of every round, the process's peak resident set
(VmHWM), and the phases: generate, score (rewards and the reference pass), update (training forward,
backward, optimizer). TRL (an optional bench dependency, `pip install trl`) is timed from outside: its
`_generate_single_turn` and `_generate_and_score_completions` are wrapped with timers, nothing else.

    python bench/step_vs_trl.py                       # all shapes, 2 rounds, 6 steps each
    python bench/step_vs_trl.py --shapes text40 --rounds 1 --steps 4
Writes bench/out/step_vs_trl.json and prints a table. Timing is a benchmark, never a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kernels_cpu_memory import peak_rss_bytes  # noqa: E402

SHAPES = {"text40": {"prompt_tokens": 40, "image": False}, "text600": {"prompt_tokens": 600, "image": False},
          "image": {"prompt_tokens": 40, "image": True}}
PROMPTS, GENERATIONS, NEW_TOKENS, LORA_R, BETA, LEARNING_RATE = 2, 8, 64, 16, 0.04, 1e-5
IMAGE_SIDE = 448  # 448 x 448 at patch 14, merge 2: 256 image tokens
FILLER = ("Background: a farmer keeps records of every field, every harvest and every sale, and the numbers "
          "below come from those records. ")


def build_prompts(tokenizer, prompt_tokens: int, n: int = 64) -> list[str]:
    """`n` distinct arithmetic questions, each preceded by background text so that it is about
    `prompt_tokens` tokens once the chat template is applied."""
    from lmmr1_lite.tasks import generate as draw

    def length(text: str) -> int:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return len(tokenizer.encode(chat, add_special_tokens=False))

    examples, _ = draw("arithmetic", n, 0, seed=0)
    prompts = []
    for example in examples:
        text = example.prompt
        while length(FILLER + text) <= prompt_tokens:  # whole sentences, then single words
            text = FILLER + text
        for word in reversed(FILLER.split()):  # the end of a sentence
            if length(f"{word} {text}") > prompt_tokens:
                break
            text = f"{word} {text}"
        prompts.append(text)
    return prompts


def prompt_images(n: int):
    from lmmr1_lite.tasks import generate as draw

    examples, _ = draw("tiny_color", n, 0, seed=0)
    return [e.images[0].resize((IMAGE_SIDE, IMAGE_SIDE)) for e in examples]


def run_ours(model_dir: str, shape: dict, steps: int) -> dict:
    import torch

    from lmmr1_lite import models
    from lmmr1_lite.config import resolve_config
    from lmmr1_lite.distributed import OneProcess, start_verifier_pool
    from lmmr1_lite.example import Example
    from lmmr1_lite.step import StepContext, grpo_step
    from lmmr1_lite.train import seed_everything

    cfg = resolve_config(None, None, {
        "model": model_dir, "random_init": False, "quantization": "none", "dtype": "float32",
        "gradient_checkpointing": False, "lora_r": LORA_R, "lora_alpha": 2 * LORA_R, "beta": BETA,
        "learning_rate": LEARNING_RATE, "prompts_per_step": PROMPTS, "num_generations": GENERATIONS,
        "max_new_tokens": NEW_TOKENS, "temperature": 1.0, "system_prompt": "", "stop_tokens": [],
        "micro_batch_size": PROMPTS * GENERATIONS, "max_tokens_per_micro_batch": 0, "loss_agg": "token_mean",
        "min_pixels": IMAGE_SIDE * IMAGE_SIDE, "max_pixels": IMAGE_SIDE * IMAGE_SIDE})
    seed_everything(0)
    tokenizer = models.load_tokenizer(cfg.model)
    policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
    optimizer = models.make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    processor = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels) if shape["image"] else None
    start_verifier_pool(cfg, OneProcess())
    texts = build_prompts(tokenizer, shape["prompt_tokens"])
    images = prompt_images(len(texts)) if shape["image"] else [None] * len(texts)
    examples = [Example(prompt=t, answer="0", images=[i] if i is not None else []) for t, i in zip(texts, images)]
    ctx = StepContext(policy, tokenizer, cfg, optimizer, scheduler, image_processor=processor)
    rows = []
    for step in range(steps):
        row, _ = grpo_step(ctx, examples[step * PROMPTS % len(examples):][:PROMPTS])
        rows.append(row)
    return {"step_s": [r["step_seconds"] for r in rows], "generate_s": [r["generate_seconds"] for r in rows],
            "score_s": [r["score_seconds"] for r in rows], "update_s": [r["update_seconds"] for r in rows],
            "completion_tokens": [r["completions/mean_length"] for r in rows]}


def run_trl(model_dir: str, shape: dict, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lmmr1_lite import models, rewards
    from lmmr1_lite.example import Example

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    texts = build_prompts(tokenizer, shape["prompt_tokens"])
    if shape["image"]:
        from transformers import Qwen2_5_VLProcessor

        class ImageOnlyProcessor(Qwen2_5_VLProcessor):
            """Qwen2.5-VL's processor without its video processor, which needs torchvision (not installable
            beside the CPU torch here); images are processed exactly as by the full one."""

            def check_argument_for_proper_class(self, argument_name, argument):
                if not (argument_name == "video_processor" and argument is None):
                    super().check_argument_for_proper_class(argument_name, argument)
        processing = ImageOnlyProcessor(image_processor=models.load_image_processor(
            model_dir, IMAGE_SIDE * IMAGE_SIDE, IMAGE_SIDE * IMAGE_SIDE), tokenizer=tokenizer, video_processor=None,
            chat_template=tokenizer.chat_template)
        rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}], "image": i}
                for t, i in zip(texts, prompt_images(len(texts)))]
    else:
        processing = tokenizer
        rows = [{"prompt": [{"role": "user", "content": t}]} for t in texts]

    def lmmr1_reward(completions, **_):  # the same rule-based reward lmmr1-lite pays
        texts_ = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return rewards.score(texts_, [Example("", "0")] * len(texts_), {"format": 0.5, "accuracy": 1.0})[0]

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                      target_modules=models.language_model_lora_pattern(
                          ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    out = tempfile.mkdtemp()
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GENERATIONS,
                      num_generations=GENERATIONS, max_completion_length=NEW_TOKENS, beta=BETA,
                      learning_rate=LEARNING_RATE, max_steps=steps, logging_steps=1, report_to="none",
                      save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False, temperature=1.0,
                      seed=0, loss_type="dapo", num_iterations=1, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[lmmr1_reward], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=processing, peft_config=lora)
    timing = {"generate_s": [], "generate_and_score_s": []}

    def timed(name, method):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                timing[name].append(time.perf_counter() - start)
        return wrapper
    trainer._generate_single_turn = timed("generate_s", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed("generate_and_score_s", trainer._generate_and_score_completions)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.lengths, self.started = [], [], 0.0

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    score = [a - b for a, b in zip(timing["generate_and_score_s"], timing["generate_s"])]
    update = [s - g for s, g in zip(timer.seconds, timing["generate_and_score_s"])]
    return {"step_s": timer.seconds, "generate_s": timing["generate_s"], "score_s": score, "update_s": update,
            "completion_tokens": timer.lengths}


def worker(system: str, model_dir: str, shape_name: str, steps: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    result = (run_ours if system == "ours" else run_trl)(model_dir, SHAPES[shape_name], steps)
    result["peak_rss_mib"] = peak_rss_bytes() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def median_after_warmup(values: list[float], skip: int = 2) -> float:
    return statistics.median(values[skip:] if len(values) > skip else values)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="text40,text600,image")
    parser.add_argument("--systems", default="ours,trl", help="ours, trl, or both (alternated)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per process; the median is over steps 3+")
    parser.add_argument("--model-dir", default=str(HERE / "out" / "real_vocab_model"))
    parser.add_argument("--out", default=str(HERE / "out" / "step_vs_trl.json"))
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "MODEL_DIR", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.steps)
        return {}

    from lmmr1_lite.tiny import write_real_vocab_model_dir

    model_dir = Path(args.model_dir)
    if not (model_dir / "model.safetensors").exists():
        write_real_vocab_model_dir(model_dir, hidden=256, layers=4, max_pixels=IMAGE_SIDE * IMAGE_SIDE)
    systems = args.systems.split(",")
    runs: dict = {}
    for shape in args.shapes.split(","):
        for round_ in range(args.rounds):
            order = systems if round_ % 2 == 0 else systems[::-1]  # alternate which system goes first
            for system in order:
                done = subprocess.run([sys.executable, __file__, "--worker", system, str(model_dir), shape,
                                       "--steps", str(args.steps)], capture_output=True, text=True)
                lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(f"{system} {shape} failed:\n{done.stderr[-3000:]}")
                runs.setdefault((shape, system), []).append(json.loads(lines[-1][len("RESULT "):]))
                print(f"{shape:8} {system:5} round {round_ + 1}: steps "
                      + " ".join(f"{s:.2f}" for s in runs[(shape, system)][-1]["step_s"]), flush=True)
    rows = []
    for (shape, system), results in runs.items():
        row = {"shape": shape, "system": system, "rounds": len(results)}
        for key in ("step_s", "generate_s", "score_s", "update_s"):
            row[key] = statistics.median(median_after_warmup(r[key]) for r in results)
        row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
        row["completion_tokens"] = statistics.mean(statistics.mean(r["completion_tokens"]) for r in results)
        row["step_s_by_round"] = [median_after_warmup(r["step_s"]) for r in results]
        rows.append(row)
    by = {(r["shape"], r["system"]): r for r in rows}
    for row in rows:
        trl = by.get((row["shape"], "trl"))
        if trl and row["system"] == "ours":
            row["time_vs_trl"] = row["step_s"] / trl["step_s"]
            row["memory_vs_trl"] = row["peak_rss_mib"] / trl["peak_rss_mib"]
    report = {"benchmark": "step_vs_trl", "date": str(date.today()), "device": "cpu", "threads": os.cpu_count(),
              "settings": {"prompts": PROMPTS, "generations": GENERATIONS, "new_tokens": NEW_TOKENS, "lora_r": LORA_R,
                           "beta": BETA, "dtype": "float32", "vocab": 151_936, "hidden": 256, "layers": 4},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n| shape | system | step s | generate s | score s | update s | peak RSS MiB | vs TRL time | vs TRL memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['system']} | {r['step_s']:.2f} | {r['generate_s']:.2f} | {r['score_s']:.2f} | "
              f"{r['update_s']:.2f} | {r['peak_rss_mib']:.0f} | {r.get('time_vs_trl', float('nan')):.2f} | "
              f"{r.get('memory_vs_trl', float('nan')):.2f} |")
    return report


if __name__ == "__main__":
    main()
