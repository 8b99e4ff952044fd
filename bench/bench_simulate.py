"""Time ``simulate_cohort``: ``python bench/bench_simulate.py [--sim.KEY VALUE ...] [--repeat N]``.

Prints wall and CPU seconds per run and the 1-minute load average (other jobs
on a shared machine inflate wall time; CPU time is less affected).
"""
from __future__ import annotations

import os
import sys
import time

from twinbrain.config import load_config
from twinbrain.data.simulate import simulate_cohort


def main(argv: list[str]) -> None:
    repeat = 1
    if "--repeat" in argv:
        i = argv.index("--repeat")
        repeat = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    cfg = load_config(overrides=argv).sim
    print(f"sim: {cfg}")
    for _ in range(repeat):
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        cohort = simulate_cohort(cfg)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rec = cohort.recordings[0]
        print(f"wall {wall:.2f} s  cpu {cpu:.2f} s  load(1 min) {load:.2f}  "
              f"{len(cohort.recordings)} runs, EEG {rec.eeg.shape}, fMRI {rec.fmri.shape}")


if __name__ == "__main__":
    main(sys.argv[1:])
