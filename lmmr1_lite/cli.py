"""`lmmr1-lite` command line. Every config field is a flag; errors a user can cause print one line."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import ConfigError, TrainConfig, coerce, default_config_path, field_types, parse_sets, resolve_config


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config fields (each overrides the YAML; see lmmr1_lite/config.py)")
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default!r})"
        if types[f.name] is bool:  # `--random-init` alone means true; `--random-init false` also works
            group.add_argument(flag, dest=f.name, nargs="?", const="true", default=None, metavar="BOOL", help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def _positive_gb(text: str) -> float:
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of GB > 0, got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (exit 2) like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lmmr1-lite", description="Two-stage rule-based GRPO (LMM-R1) on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO for one stage",
                           description="Run GRPO for one stage. With no --config and no --model, the stage's tiny "
                                       f"embedded default is used ({default_config_path('fre')} for fre).",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--stage", choices=["fre", "mgt"], default=None,
                       help="fre: text-only math; mgt: image + text (default: the config's stage, else fre)")
    train.add_argument("--config", default=None, help="YAML file of config overrides")
    train.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue RUN_DIR from its newest complete checkpoint with its saved config "
                            "(--max-steps may raise the total to extend the run)")
    train.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config field, value parsed as YAML (repeatable)")
    _add_config_flags(train)
    from .datacli import add_parsers
    add_parsers(sub)
    pipeline = sub.add_parser("pipeline", help="stage FRE, then stage MGT from its adapter, in one run directory")
    pipeline.add_argument("--config-fre", default=None, help="FRE YAML (default: configs/tiny/fre.yaml)")
    pipeline.add_argument("--config-mgt", default=None, help="MGT YAML (default: configs/tiny/mgt.yaml)")
    pipeline.add_argument("--output-dir", default=None, help="run directory holding fre/ and mgt/ "
                                                               "(default: runs/pipeline-<timestamp>)")
    pipeline.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config field in both stages (repeatable)")
    from .evaluate import add_parsers as add_eval_parsers
    add_eval_parsers(sub)
    plan = sub.add_parser("plan", help="estimate a config's peak GPU memory by component")
    plan.add_argument("--config", default=None, help="YAML config (default: the stage's tiny one)")
    plan.add_argument("--stage", choices=["fre", "mgt"], default=None)
    plan.add_argument("--gpu-gb", type=_positive_gb, default=24.0, help="card size to check against (default: 24)")
    plan.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (torchrun ranks): the estimate is per "
                      "GPU, each holding the whole model and prompts_per_step / N of the prompts (default: 1)")
    plan.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override any config field (repeatable)")
    return parser


def overrides_from(args: argparse.Namespace) -> dict:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "stage" and getattr(args, f.name, None) is not None}
    overrides.update(parse_sets(args.sets))
    return overrides


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """The run's saved config; only --max-steps may change (to extend the run)."""
    from pathlib import Path

    from .config import load_yaml

    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a run directory)")
    overrides = overrides_from(args)
    extra = sorted(set(overrides) - {"max_steps"}) + (["--config"] if args.config else [])
    if extra:
        raise ConfigError(f"--resume uses the run's saved config; only --max-steps may change (got {', '.join(extra)})")
    values = load_yaml(run_dir / "config.yaml")
    values.update({key: coerce(key, value, "command line") for key, value in overrides.items()})
    values["output_dir"] = str(run_dir.resolve())  # the run directory is wherever it is now
    try:
        return TrainConfig(**values)
    except TypeError as err:  # a saved config with a field this version does not know
        raise ConfigError(f"{run_dir / 'config.yaml'}: {err}") from None


def run_pipeline(args: argparse.Namespace) -> None:
    """FRE into <dir>/fre, then MGT into <dir>/mgt continuing the FRE adapter."""
    from datetime import datetime
    from pathlib import Path

    from .train import train

    root = Path(args.output_dir or f"runs/pipeline-{datetime.now():%Y%m%d-%H%M%S}")
    overrides = overrides_from(args)
    stages = [("fre", args.config_fre, {**overrides, "output_dir": str(root / "fre")}),
              ("mgt", args.config_mgt, {**overrides, "output_dir": str(root / "mgt"), "init": str(root / "fre")})]
    for stage, config, stage_overrides in stages:  # both configs checked before hours go into the first stage
        resolve_config(stage, config, stage_overrides)
    for stage, config, stage_overrides in stages:
        print(f"== pipeline stage {stage} -> {root / stage}")
        cfg = resolve_config(stage, config, stage_overrides)
        train(cfg)
    print(f"pipeline done: {root / 'fre'} then {root / 'mgt'}\n"
          f"compare: lmmr1-lite eval --adapter {root / 'fre' / 'adapter'} --adapter {root / 'mgt' / 'adapter'} "
          f"--data {cfg.data}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error, already printed in one line (2)
        return int(exit_.code or 0)
    from .models import configure_cuda_allocator
    configure_cuda_allocator()  # before anything touches CUDA
    try:
        if args.command == "train":
            from .train import train
            if args.resume:
                cfg = resume_config(args)
            else:
                cfg = resolve_config(args.stage, args.config, overrides_from(args))
            train(cfg, resume=bool(args.resume))
        elif args.command == "pipeline":
            run_pipeline(args)
        elif args.command == "plan":
            from .plan import plan
            cfg = resolve_config(args.stage, args.config, overrides_from(args))
            print(plan(cfg, args.gpu_gb, args.gpus))
        elif args.command == "eval" and args.benchmark:
            from .benchmark_eval import run_benchmarks
            run_benchmarks(args)
        elif args.command in ("eval", "export"):
            from .evaluate import run
            return run(args)
        elif args.command == "data":
            from .datacli import run
            return run(args)
        return 0
    except ConfigError as err:
        print(f"lmmr1-lite: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmmr1-lite: stopped at once; the newest complete checkpoint is intact", file=sys.stderr)
        return 130
    except Exception as err:
        from .step import TrainingAborted
        if not isinstance(err, TrainingAborted):
            raise
        print(f"lmmr1-lite: aborted: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
