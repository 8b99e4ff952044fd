"""CPU training keeps freed activations in the process (train/host_memory.py): a step-like pattern of
allocations re-faults its pages every iteration with glibc's defaults and not after keep_freed_memory."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

STEP_PATTERN = textwrap.dedent("""
    import resource, sys
    import torch
    from twinbrain.train.host_memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    def step():                      # ten live 16 MiB activations, freed together (as after backward)
        live = [torch.ones(4 << 20) for _ in range(10)]
        del live
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", STEP_PATTERN, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_freed_activations_are_not_faulted_back_in_every_step():
    _, default = _faults("default")
    applied, kept = _faults("keep")
    pages = 5 * 10 * 4096                          # 5 steps x 160 MiB in 4 KiB pages
    assert applied == "True"
    # glibc's defaults re-fault part of every step, how much depending on its adaptive thresholds (20-100 % seen;
    # once, on a loaded CI box, 2 %): compare with them only where they did re-fault.
    assert kept < 0.05 * pages, (kept, default)
    if default >= 0.05 * pages:
        assert kept < default / 2, (kept, default)
