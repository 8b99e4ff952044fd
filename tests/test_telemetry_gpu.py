"""Telemetry on a CUDA device: memory peaks per window, MFU, profiler trace, OOM snapshot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twinbrain.config import LoggingConfig
from twinbrain.train.telemetry import Telemetry, count_flops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_memory_flops_profile_and_oom(tmp_path):
    dev = torch.device("cuda", 0)
    run = tmp_path / "run"
    cfg = LoggingConfig(log_every=3, wandb="disabled", progress="off", profile_steps=1)
    tel = Telemetry(cfg, run, is_main=True, world_size=1, device=dev, config_dict={}, run_name="g",
                    resume_run_id=None, max_steps=6, backend="single")
    n = 4096
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    flops = count_flops(lambda: (a @ b).float().sum().backward())
    tel.set_step_flops(flops, 1)
    assert flops == 2 * 2 * n**3  # forward + grad of b (a needs none)
    recs = []
    for step in range(1, 7):
        tel.step_begin()
        tel.data_loaded()
        with tel.maybe_profile(step):
            big = torch.empty(4 * 2**30, dtype=torch.uint8, device=dev) if step == 2 else None  # 4 GiB, window 1 only
            for _ in range(20):
                b.grad = None
                (a @ b).float().sum().backward()
            del big
        tel.step_end(step, n_windows=20, n_node_steps=20 * n)
        if tel.should_flush(step):
            tel.log(step, {"loss": 1.0})
            recs.append(tel.flush(step))
    tel.close(print_summary=False)
    print(json.dumps(recs, indent=1))
    print(json.dumps(tel.env, indent=1))

    first, second = recs
    for r in recs:
        assert {"mem_peak_gib", "mem_reserved_peak_gib", "mem_peak_pct", "alloc_retries", "ooms", "rss_gib"} <= set(r)
    assert first["mem_peak_gib"] > 4.0 > second["mem_peak_gib"]  # peaks reset each window
    name = torch.cuda.get_device_name(dev)
    if tel.env["peak_tflops"]:
        assert 0.05 < second["mfu"] < 1.0, (name, second["tflops_per_s"])
    else:
        assert second["mfu"] is None
    traces = list((run / "profile").glob("trace_rank0_step*.json"))
    assert traces and any(e.get("cat") == "kernel" for e in json.loads(traces[0].read_text())["traceEvents"])


def test_oom_writes_memory_snapshot(tmp_path):
    dev = torch.device("cuda", 0)
    cfg = LoggingConfig(wandb="disabled", progress="off", memory_snapshot_on_oom=True)
    tel = Telemetry(cfg, tmp_path / "run", is_main=True, world_size=1, device=dev, config_dict={},
                    run_name="o", resume_run_id=None, max_steps=1)
    keep = torch.ones(2**20, device=dev)
    too_big = torch.cuda.get_device_properties(dev).total_memory * 2
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(too_big, dtype=torch.uint8, device=dev)
    snaps = list((tmp_path / "run" / "memory").glob("oom_rank0_*.pickle"))
    assert snaps and snaps[0].stat().st_size > 0, "the allocator's OOM observer should have dumped a snapshot"
    assert tel.on_oom() == snaps[0]  # the trainer's except-handler call does not dump the same OOM again
    assert len(list((tmp_path / "run" / "memory").glob("*.pickle"))) == 1
    assert tel.flush(1)["ooms"] >= 1
    tel.close(print_summary=False)
    del keep
    assert Path(snaps[0]).exists()
