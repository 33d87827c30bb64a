"""The ``distill`` command line: a thin layer that turns flags and YAML into config dataclasses
and calls the library. Each command is ``module.function(config) -> exit code``; command modules
keep heavy imports (torch, transformers, lm_eval) inside functions so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import typing

from distill import __version__, console, parallel
from distill.check.command import CheckConfig, Step
from distill.config import build, config_section, leaves, load_yaml
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
               "cache top-k log-probs for offline KD: a local --teacher, a served one (--teacher-url), or the traces' API top_logprobs"),
    "train": ("distill.train.command", "TrainConfig", "train",
              "fine-tune a student: SFT on traces, logit distillation (KD), or on-policy distillation"),
    "eval": ("distill.eval.runner", "EvalConfig", "run_eval",
             "score a model on AIME/MATH-500/AMC/GSM8K with lm-eval: pass@1 over k, cons@k"),
    "compare": ("distill.report", "CompareConfig", "compare",
                "table of evaluated students side by side (Markdown, CSV, HTML)"),
    "export": ("distill.export", "ExportConfig", "export",
               "write traces as a datasets directory (parquet + dataset card) to share or push to the hub"),
    "check": ("distill.cli", "CheckConfig", "check_recipes",
              "before the GPU hours: every check of a recipe that needs no training (tokenizers, template, Base "
              "student, served teacher, memory, eval protocol), one line each"),
}


def _config_class(name: str):
    module, cls, _, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), cls)


def _add_options(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per option of the command's config, in one --help section per group."""
    sections: dict[type, argparse._ArgumentGroup] = {}
    for leaf in leaves(cls):
        target = parser
        if leaf.section is not None:
            if leaf.section not in sections:
                title, _, about = (leaf.section.__doc__ or leaf.section.__name__).partition(":")
                sections[leaf.section] = parser.add_argument_group(title, about.strip() or None)
            target = sections[leaf.section]
        meta, tp, default = leaf.meta, leaf.type, leaf.default
        help_ = meta["help"]
        if meta["check"] is not None:
            help_ += f"; {meta['check']}"
        if default not in (None, "", [], {}) and tp is not bool:
            help_ += f" (default: {default})"
        kwargs: dict = {"dest": leaf.key, "default": None, "help": help_}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            if default is not None:
                kwargs["help"] = help_ + f" (default: {'on' if default else 'off'})"
        elif typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["metavar"] = meta["metavar"] or leaf.key.upper()
        if meta["positional"]:  # also as a flag, for scripts that name it
            target.add_argument(leaf.key, nargs="*", default=argparse.SUPPRESS, metavar=kwargs["metavar"], help=help_)
            kwargs["nargs"] = "+"
        target.add_argument(leaf.flag, **kwargs)
        for old in meta["aliases"]:  # former names: config.build says what replaced them
            target.add_argument("--" + old.replace("_", "-"), **{**kwargs, "dest": old, "help": argparse.SUPPRESS})
    for old in getattr(cls, "RESHAPED", {}):
        parser.add_argument("--" + old.replace("_", "-"), dest=old, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distill large reasoning models into small ones: generate teacher traces, "
                    "verify them, train students (SFT or KD), evaluate, compare.",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' own progress bars and info lines, and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.add_argument("--config", metavar="FILE.yaml",
                       help=f"recipe whose '{name}:' section sets any of the options below; flags override it")
        _add_options(p, _config_class(name))
    p = sub.add_parser("run", help="run every step of a recipe's 'pipeline:' in order", parents=[common],
                       description="Run the steps of a recipe's 'pipeline:' list in order, "
                                   "e.g. distill run configs/quickstart.yaml")
    p.add_argument("recipe", metavar="FILE.yaml")
    p.add_argument("--only", metavar="STEP", help="run only the steps whose name or command is STEP")
    p.add_argument("--check", action="store_true",
                   help="run distill check on the recipe first; stop if any check fails")
    return parser


def make_config(name: str, options: dict, source: str = "flags", config_file: str | None = None):
    """The command's config from an optional recipe section plus options (checked, nothing loaded)."""
    module, cls_name, _, _ = COMMANDS[name]
    layers = []
    if config_file:
        layers.append((f"{config_file} [{name}]", config_section(config_file, name)))
    layers.append((source, options))
    return build(getattr(importlib.import_module(module), cls_name), *layers)


def execute(name: str, cfg) -> int:
    module, _, func, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), func)(cfg) or 0


def plan_recipe(recipe: str, pipeline_only: bool = False) -> list[Step]:
    """Every step of a recipe's ``pipeline:`` with its config built (options checked, nothing loaded);
    without ``pipeline_only``, a recipe of command sections (``train:``) is one step per section."""
    data = load_yaml(recipe)
    steps = data.get("pipeline")
    if steps is None and not pipeline_only:
        steps = [{name: section} for name, section in data.items() if name in COMMANDS and name != "check"]
    if not isinstance(steps, list) or not steps:
        raise DistillError(f"{recipe}: no 'pipeline:' list of steps" + ("" if pipeline_only else
                                                                        " and no command section (train: ...)"))
    planned = []
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict) or len(step) != 1:
            raise DistillError(f"{recipe}: pipeline step {i} must be one 'command: {{options}}' mapping")
        (name, options), = step.items()
        if name not in COMMANDS or name == "check":
            raise DistillError(f"{recipe}: pipeline step {i}: unknown command '{name}' "
                               f"(known: {', '.join(c for c in COMMANDS if c != 'check')})")
        if options is not None and not isinstance(options, dict):
            raise DistillError(f"{recipe}: pipeline step {i} ({name}): its options must be a mapping")
        options = dict(options or {})
        label = options.pop("step", name)
        source = f"{recipe} [pipeline step {i}: {label}]"
        planned.append(Step(i, name, label, make_config(name, options, source=source)))
    return planned


def run_pipeline(recipe: str, only: str | None = None, check: bool = False) -> int:
    planned = plan_recipe(recipe, pipeline_only=True)  # every step's options are checked before the first runs
    if only and not any(only in (step.label, step.command) for step in planned):
        raise DistillError(f"{recipe}: --only {only}: no such step (steps: "
                           f"{', '.join(step.label for step in planned)})")
    if check:
        from distill.check.recipe import check_recipe

        if check_recipe(recipe, planned, make_config("check", {"recipe": [recipe]}), only):
            print("distill run: a check failed (FAIL above); fix it, or run without --check", file=sys.stderr)
            return 1
    for step in planned:
        if only and only not in (step.label, step.command):
            continue
        where = f"step {step.number}/{len(planned)}: {step.label}"
        print(f"\n== {where} ({step.command})", flush=True)
        started = time.monotonic()
        rc = execute(step.command, step.config)
        print(f"== {where} {'failed' if rc else 'done'} in {time.monotonic() - started:.0f} s", flush=True)
        if rc:
            print(f"distill run: step '{step.label}' exited with {rc}; fix it and rerun (finished work is kept)",
                  file=sys.stderr)
            return rc
    return 0


def check_recipes(cfg: CheckConfig) -> int:
    """``distill check``: each recipe's steps built as ``distill run`` builds them, then checked."""
    from distill.check.recipe import check_recipe

    return max(check_recipe(recipe, plan_recipe(recipe), cfg) for recipe in cfg.recipe)


def main(argv: list[str] | None = None) -> int:
    # past a file-size limit, writes fail with EFBIG (handled: no torn output) instead of a SIGXFSZ kill
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: (received.append(signum), _interrupt(signum, frame)))
    console.quiet(args.verbose)
    try:
        if args.command == "run":
            code = run_pipeline(args.recipe, args.only, args.check)
        else:
            options = {k: v for k, v in vars(args).items()
                       if k not in ("command", "config", "verbose") and v is not None}
            code = execute(args.command, make_config(args.command, options, config_file=args.config))
    except DistillError as e:
        code = _fail(args, str(e))
    except KeyboardInterrupt:
        name = signal.Signals(received[0]).name if received else "interrupted"
        print(f"distill {args.command}: {name}; finished work is saved, rerun the same command to resume",
              file=sys.stderr)
        code = 128 + (received[0] if received else signal.SIGINT)
    except UnicodeDecodeError as e:
        code = _fail(args, f"{getattr(e, 'filename', None) or 'an input'}: not UTF-8 text ({e.reason} at byte "
                           f"{e.start})", e)
    except OSError as e:
        code = _fail(args, f"{e.filename}: {e.strerror}" if e.filename else str(e), e)
    except Exception as e:  # a bug: one line, and the traceback with -v
        code = _fail(args, f"internal error: {type(e).__name__}: {e} (rerun with -v for the traceback; please "
                           f"report it)", e)
    if parallel.launched():
        parallel.leave(code)
    return code


def _interrupt(signum, frame):
    """SIGTERM (a scheduler's stop, ``kill``) ends a command as Ctrl-C does: its finally blocks close
    the outputs and write the run record's status. train saves a checkpoint first (its own handler).
    It goes through SIGINT's handler of the moment: inside ``asyncio.run`` that one cancels the main
    task and the loop raises KeyboardInterrupt once the task has unwound, where an exception raised
    at whatever line the signal lands on could tear the HTTP client's cancel scopes (an internal error
    instead of the saved stop)."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored (a background job): SIGTERM still stops
        raise KeyboardInterrupt
    handler(signum, frame)


def _fail(args, message: str, error: BaseException | None = None) -> int:
    """One line on stderr (the traceback too with -v); exit status 2."""
    if error is not None and args.verbose:
        import traceback

        traceback.print_exception(error)
    print(f"distill {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
