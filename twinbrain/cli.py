"""The ``twinbrain`` command.

Verbs: ``config``, ``simulate-cohort``, ``prepare``, ``train``, ``evaluate``, ``report``, ``twin``.
Any ``--section.key VALUE`` after the verb's own options overrides the config.

Exit codes: 0 success; 2 bad input (config, paths, run directory, files), as one ``error:`` line;
1 a failure of the job itself (e.g. training diverged). ``--debug`` or ``TWINBRAIN_DEBUG=1`` adds
the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import zipfile
from pathlib import Path

from . import data as _sources  # noqa: F401  (each data source registers its settings check)
from .config import ConfigError, dump_config, load_config


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` among the arguments (removed from them) or ``TWINBRAIN_DEBUG`` set to a true value."""
    if argv is not None and "--debug" in argv:
        argv.remove("--debug")
        os.environ["TWINBRAIN_DEBUG"] = "1"
    return os.environ.get("TWINBRAIN_DEBUG", "").lower() not in ("", "0", "false", "no")


def report_error(exc: BaseException, show: bool = True) -> int:
    """Print ``exc`` as one line (the traceback too when debugging) and return the exit code.

    Bad input (``ConfigError``, missing files, invalid values) -> 2; a job that failed on its own
    terms (divergence) -> 1; anything else is a bug: traceback, 1. ``show=False``: only the code.
    """
    user = isinstance(exc, (ConfigError, FileNotFoundError, NotADirectoryError, ValueError))
    known = user or isinstance(exc, FloatingPointError)     # incl. the trainer's DivergenceError
    if show:
        if debug_requested() or not known:
            traceback.print_exception(exc)
        if known:
            kind = "" if isinstance(exc, (ConfigError, FloatingPointError)) else f" ({type(exc).__name__})"
            print(f"error{kind}: {exc}", file=sys.stderr, flush=True)
    return 2 if user else 1


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (may inherit with 'base:')")


def _verb(sub, name: str, help: str, sections=None, keys=(), title=None, **kw) -> argparse.ArgumentParser:
    """A verb whose ``--help`` lists the config fields it reads (type, default, meaning)."""
    from .config_help import config_help
    epilog = config_help(sections, keys, **({"title": title} if title else {}))
    return sub.add_parser(name, help=help, description=help, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def _cmd_config(args, overrides) -> int:
    cfg = load_config(args.config, overrides)
    print(dump_config(cfg), end="")   # --print is accepted for clarity; printing is what this verb does
    return 0


def _cmd_simulate(args, overrides) -> int:
    from .data.bids_io import write_cohort_bids
    from .data.simulate import simulate_cohort

    cfg = load_config(args.config, overrides)
    cohort = simulate_cohort(cfg.sim)
    out = write_cohort_bids(cohort, Path(args.out))
    print(f"wrote {len(cohort.recordings)} runs of {len(cohort.subjects)} subjects to {out}")
    return 0


def _cmd_prepare(args, overrides) -> int:
    from .data.prepare import prepare

    from .data.prepare import PrepareError

    cfg = load_config(args.config, overrides)
    try:
        report = prepare(cfg, progress=True)
    except PrepareError as exc:
        print(f"prepare failed:\n{exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _cmd_train(args, overrides) -> int:
    from .train.trainer import run_training

    run_training(load_config(args.config, overrides))
    return 0


def _cmd_evaluate(args, overrides) -> int:
    from .eval.evaluate import evaluate_checkpoint

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt}: no such file (an export is RUN/best/model.pt)")
    if not zipfile.is_zipfile(ckpt):
        raise ConfigError(f"--checkpoint {ckpt}: not a readable TwinBrain export (truncated or corrupt); "
                          "use another export, e.g. RUN/final/model.pt, or re-export it")
    report = evaluate_checkpoint(Path(args.checkpoint), split=args.split,
                                 out_dir=Path(args.out) if args.out else None, overrides=overrides)
    print(report["markdown"] if isinstance(report, dict) and "markdown" in report else report)
    return 0


def _cmd_report(args, overrides) -> int:
    from .eval.report import render_report

    path = render_report(Path(args.run_dir))
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinbrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = _verb(sub, "config", "resolve, validate and print a config")
    _config_args(p)
    p.add_argument("--print", action="store_true", help="print the resolved config (default)")
    p.set_defaults(func=_cmd_config)

    p = _verb(sub, "simulate-cohort", "write the simulated cohort as a BIDS-derivative dataset", ("sim",))
    _config_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_simulate)

    p = _verb(sub, "prepare", "turn a BIDS dataset into the prepared graph store", ("data", "graph"))
    _config_args(p)
    p.set_defaults(func=_cmd_prepare)

    p = _verb(sub, "train", "train in this process (multi-process: accelerate launch launch/train.py)")
    _config_args(p)
    p.set_defaults(func=_cmd_train)

    p = _verb(sub, "evaluate", "model vs baselines on held-out subjects; twin validity", ("eval",),
              ("data.num_workers", "data.cache_mb"), title="config fields evaluate may override (--eval.KEY VALUE; the "
              "rest is fixed by the checkpoint)")
    p.add_argument("--checkpoint", required=True, help="exported model (RUN/best/model.pt)")
    p.add_argument("--split", default="test", choices=["val", "test", "train"])
    p.add_argument("--out", help="report directory (default: RUN/eval)")
    p.set_defaults(func=_cmd_evaluate)

    p = _verb(sub, "report", "render training curves and a Markdown summary", ("logging",),
              title="config fields read from the run's config.yaml")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("twin", help="ask a trained twin: forecast | perturb | ec | personalize | attribute",
                       add_help=False)
    p.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug_requested(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    if argv and argv[0] == "twin":
        from .twin.cli import main as twin_main
        return twin_main(argv[1:])
    args, rest = parser.parse_known_args(argv)
    try:
        return args.func(args, rest)
    except Exception as exc:  # noqa: BLE001 - bad input (missing files, wrong shapes, NaNs, mismatched
        # rates) gets its one line naming the file and the fix; a traceback would only bury it.
        return report_error(exc)


if __name__ == "__main__":
    raise SystemExit(main())
