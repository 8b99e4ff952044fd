"""``launch/train.py`` with one injected fault, for the multi-process fault tests.

``TWINBRAIN_TEST_FAULT=kind:step:rank``:
  ``kill-in-save``  rank ``rank`` writes half a DCP shard of the step-``step`` checkpoint, then SIGKILLs itself
  ``raise``         rank ``rank`` raises inside training step ``step``
"""
import os
import runpy
import signal
from pathlib import Path

import torch.distributed.checkpoint as dcp

from twinbrain.train.trainer import Trainer

kind, step, rank = os.environ["TWINBRAIN_TEST_FAULT"].split(":")
step, rank = int(step), int(rank)
me = int(os.environ.get("RANK", "0"))

if kind == "kill-in-save":
    real_save = dcp.save

    def save(state, *args, checkpoint_id=None, **kwargs):
        if me == rank and f"step-{step:08d}" in str(checkpoint_id):
            shard = Path(checkpoint_id) / f"__{me}_0.distcp"
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_bytes(b"\x50\x4b" + bytes(4096))     # the start of a zip, then nothing
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)

    dcp.save = save
elif kind == "raise":
    real_step = Trainer.train_step

    def train_step(self, micro):
        if me == rank and self.step + 1 == step:
            raise RuntimeError(f"injected fault on rank {me} at step {step}")
        return real_step(self, micro)

    Trainer.train_step = train_step
else:
    raise SystemExit(f"unknown fault {kind}")

runpy.run_path(str(Path(__file__).resolve().parents[1] / "launch" / "train.py"), run_name="__main__")
