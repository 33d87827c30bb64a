"""The ``distill`` command line: a thin layer that turns flags and YAML into config dataclasses
and calls the library. Each command is ``module.function(config) -> exit code``; command modules
keep heavy imports (torch, transformers, lm_eval) inside functions so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import signal
import sys
import time
import typing

from distill import __version__, parallel
from distill.config import build, config_section, field_types, load_yaml
from distill.errors import DistillError

# name -> (module, config class, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "generate": ("distill.generate", "GenerateConfig", "generate",
                 "have a teacher write chain-of-thought traces for a prompt set"),
    "import": ("distill.importer", "ImportConfig", "import_traces",
               "turn a public reasoning dataset (OpenR1, OpenThoughts, ShareGPT, messages, prompt/completion) into traces"),
    "verify": ("distill.verify", "VerifyConfig", "verify_file",
               "grade traces against reference answers and keep the correct ones"),
    "logits": ("distill.logits", "LogitsConfig", "cache_logits",
               "cache top-k log-probs for offline KD: a local --teacher, a served one (--base-url), or the traces' API top_logprobs"),
    "train": ("distill.train.command", "TrainConfig", "train",
              "fine-tune a student on traces: SFT or logit distillation (KD)"),
    "eval": ("distill.eval.runner", "EvalConfig", "run_eval",
             "score a model on AIME/MATH-500/AMC/GSM8K with lm-eval: pass@1 over k, cons@k"),
    "compare": ("distill.report", "CompareConfig", "compare",
                "table of evaluated students side by side (Markdown, CSV, HTML)"),
    "export": ("distill.export", "ExportConfig", "export",
               "write traces as a datasets directory (parquet + dataset card) to share or push to the hub"),
}


def _config_class(name: str):
    module, cls, _, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), cls)


def _add_field_flags(parser: argparse.ArgumentParser, cls) -> None:
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, "", [], {}) and tp is not bool:
            help_ += f" (default: {default})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="*", default=None, help=help_)
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict = {"dest": f.name, "default": None, "help": help_}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            if default is not None:
                kwargs["help"] = help_ + f" (default: {'on' if default else 'off'})"
        elif typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        parser.add_argument(flag, **kwargs)
        for old in f.metadata.get("aliases", ()):  # former names: config.build says what replaced them
            parser.add_argument("--" + old.replace("_", "-"), **{**kwargs, "dest": old, "help": argparse.SUPPRESS})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distill large reasoning models into small ones: generate teacher traces, "
                    "verify them, train students (SFT or KD), evaluate, compare.",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", metavar="FILE.yaml",
                       help=f"recipe whose '{name}:' section sets any of the options below; flags override it")
        _add_field_flags(p, _config_class(name))
    p = sub.add_parser("run", help="run every step of a recipe's 'pipeline:' in order",
                       description="Run the steps of a recipe's 'pipeline:' list in order, "
                                   "e.g. distill run configs/quickstart.yaml")
    p.add_argument("recipe", metavar="FILE.yaml")
    p.add_argument("--only", metavar="STEP", help="run only the steps whose name or command is STEP")
    return parser


def run_command(name: str, options: dict, source: str = "flags", config_file: str | None = None) -> int:
    """Build the command's config from an optional recipe section plus options, then run it."""
    module, cls_name, func, _ = COMMANDS[name]
    mod = importlib.import_module(module)
    layers = []
    if config_file:
        layers.append((f"{config_file} [{name}]", config_section(config_file, name)))
    layers.append((source, options))
    cfg = build(getattr(mod, cls_name), *layers)
    return getattr(mod, func)(cfg) or 0


def run_pipeline(recipe: str, only: str | None = None) -> int:
    data = load_yaml(recipe)
    steps = data.get("pipeline")
    if not isinstance(steps, list) or not steps:
        raise DistillError(f"{recipe}: no 'pipeline:' list of steps")
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict) or len(step) != 1:
            raise DistillError(f"{recipe}: pipeline step {i} must be one 'command: {{options}}' mapping")
        (name, options), = step.items()
        if name not in COMMANDS:
            raise DistillError(f"{recipe}: pipeline step {i}: unknown command '{name}' "
                               f"(known: {', '.join(COMMANDS)})")
        options = dict(options or {})
        label = options.pop("step", name)
        if only and only not in (label, name):
            continue
        print(f"\n== step {i}/{len(steps)}: {label} ({name})", flush=True)
        started = time.monotonic()
        rc = run_command(name, options, source=f"{recipe} [pipeline step {i}: {label}]")
        print(f"== step {i}/{len(steps)}: {label} {'failed' if rc else 'done'} in {time.monotonic() - started:.0f} s",
              flush=True)
        if rc:
            print(f"distill run: step '{label}' exited with {rc}; fix it and rerun (finished work is kept)",
                  file=sys.stderr)
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    # past a file-size limit, writes fail with EFBIG (handled: no torn output) instead of a SIGXFSZ kill
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            code = run_pipeline(args.recipe, args.only)
        else:
            options = {k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None}
            code = run_command(args.command, options, config_file=args.config)
    except DistillError as e:
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        code = 130
    if parallel.launched():
        parallel.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
