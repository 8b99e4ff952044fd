"""Training entry point for ``accelerate launch`` / ``torchrun`` (and plain ``python``).

    accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 \\
        launch/train.py --config configs/smoke.yaml --run.out runs/smoke

Resolve the config -> build the trainer -> train -> close. Relaunching the same command resumes
from the newest complete checkpoint in ``--run.out``.
"""
import argparse
import logging
import sys
import traceback

from twinbrain.config import ConfigError, load_config
from twinbrain.train.distributed import clean_exit
from twinbrain.train.trainer import run_training


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    run_training(cfg)
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    except BaseException:  # noqa: BLE001 - print it before the hard exit below swallows it
        traceback.print_exc()
        code = 1
    finally:
        # Ends every worker without the flaky c10d teardown abort (shared/ENVIRONMENT.md).
        clean_exit(code)
