"""Training entry point for ``accelerate launch`` / ``torchrun`` (and plain ``python``).

    accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 \\
        launch/train.py --config configs/smoke.yaml --run.out runs/smoke

Resolve the config -> build the trainer -> train -> close. Relaunching the same command resumes
from the newest complete checkpoint in ``--run.out``.
"""
import argparse
import logging
import os
import sys
import traceback

from twinbrain.cli import debug_requested, report_error
from twinbrain.config import ConfigError, load_config
from twinbrain.train.distributed import clean_exit
from twinbrain.train.trainer import run_training


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML")
    parser.add_argument("--debug", action="store_true", help="tracebacks for every error (or TWINBRAIN_DEBUG=1)")
    args, overrides = parser.parse_known_args(argv)
    if args.debug:
        debug_requested(["--debug"])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_training(load_config(args.config, overrides))
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    except Exception as exc:  # noqa: BLE001 - print it before the hard exit below swallows it
        # Refusals of bad input are the same on every rank: one line, from rank 0 only.
        same_everywhere = isinstance(exc, ConfigError) and os.environ.get("RANK", "0") != "0"
        code = report_error(exc, show=not same_everywhere)
    except SystemExit as exc:              # argparse: --help, usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - KeyboardInterrupt
        traceback.print_exc()
        code = 1
    finally:
        # Ends every worker without the flaky c10d teardown abort (shared/ENVIRONMENT.md).
        clean_exit(code)
