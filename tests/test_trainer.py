"""Trainer in one process: exact resume, accumulation parity, activation checkpointing, schedules."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from tests.batches import make_batch
from tests.synth_recordings import make_cohort
from twinbrain.config import ConfigError, load_config
from twinbrain.data.module import DataModule
from twinbrain.model import build_model, build_train_module, loss_counts
from twinbrain.train.optim import EarlyStopping, Schedule, warmup_cosine
from twinbrain.train.parallel import apply_activation_checkpointing
from twinbrain.train.trainer import Trainer

SYNTH = ["--sim.tr", "1.0", "--sim.eeg_sfreq", "20", "--model.eeg_patch", "10", "--model.eeg_stride", "10",
         "--data.window_s", "16", "--data.stride_s", "8", "--data.calib_s", "16", "--sim.n_regions", "6",
         "--sim.n_channels", "4", "--graph.k_fmri", "3", "--graph.k_eeg", "2", "--logging.wandb", "disabled",
         "--logging.progress", "off", "--logging.flops", "false", "--model.hidden", "16", "--model.heads", "2",
         "--model.blocks", "2", "--model.dropout", "0.1", "--data.augment_noise", "0.1"]


def synth_cfg(out, *extra):
    return load_config("configs/smoke.yaml", ["--run.out", str(out), *SYNTH, *extra])


def synth_data(cfg):
    return DataModule(cfg, cohort=make_cohort(4, n_regions=6, n_channels=4, n_vols=120, tr=1.0,
                                              sfreq=20.0)).setup()


def train_records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r.get("kind", "train") == "train" and "loss" in r}


def final_weights(run_dir):
    return torch.load(run_dir / "final" / "model.pt", weights_only=False)["model"]


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    common = ["--train.max_steps", "8", "--train.checkpoint_every", "4", "--train.eval_every", "4",
              "--logging.log_every", "1"]
    full_cfg = synth_cfg(tmp_path / "full", *common)
    Trainer(full_cfg, data=synth_data(full_cfg)).train()

    cut_cfg = synth_cfg(tmp_path / "cut", *common)
    first = Trainer(cut_cfg, data=synth_data(cut_cfg))
    first.train(until=4)
    first.tel.close(print_summary=False)
    resumed = Trainer(cut_cfg, data=synth_data(cut_cfg))
    assert resumed.step == 4
    resumed.train()

    full, cut = train_records(tmp_path / "full"), train_records(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 9))
    for step in full:
        assert cut[step]["loss"] == full[step]["loss"], f"loss differs at step {step}"
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_changed_model_config(tmp_path):
    cfg = synth_cfg(tmp_path / "run", "--train.max_steps", "4", "--train.checkpoint_every", "2")
    tr = Trainer(cfg, data=synth_data(cfg))
    tr.train(until=2)
    tr.tel.close(print_summary=False)
    changed = synth_cfg(tmp_path / "run", "--train.max_steps", "4", "--train.checkpoint_every", "2",
                        "--train.lr", "0.5")
    with pytest.raises(ConfigError, match="train.lr"):
        Trainer(changed, data=synth_data(changed))


@pytest.mark.parametrize("key", ["model.spatial_layer", "model.core", "data.shuffle_block"])
def test_resume_of_a_run_saved_before_an_added_key(tmp_path, key):
    """A config.yaml written before a key existed resumes when the key's default is what such runs did
    (config.ADDED_KEYS)."""
    cfg = synth_cfg(tmp_path / "run", "--train.max_steps", "4", "--train.checkpoint_every", "2")
    tr = Trainer(cfg, data=synth_data(cfg))
    tr.train(until=2)
    tr.tel.close(print_summary=False)
    saved = tmp_path / "run" / "config.yaml"
    values = yaml.safe_load(saved.read_text())
    section, name = key.split(".")
    del values[section][name]
    saved.write_text(yaml.safe_dump(values, sort_keys=False))
    again = synth_cfg(tmp_path / "run", "--train.max_steps", "4", "--train.checkpoint_every", "2")
    resumed = Trainer(again, data=synth_data(again))
    assert resumed.step == 2
    resumed.tel.close(print_summary=False)


def test_resume_refuses_a_checkpoint_of_another_parameter_layout(tmp_path, monkeypatch):
    """A checkpoint that lacks one of today's weights (written before a layer gained parameters) stops the
    resume with a one-line error naming the weight, and leaves the run directory as it was."""
    import twinbrain.model.layers as layers
    cfg = synth_cfg(tmp_path / "run", "--train.max_steps", "4", "--train.checkpoint_every", "2")
    tr = Trainer(cfg, data=synth_data(cfg))
    tr.train(until=2)
    tr.tel.close(print_summary=False)
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*"))
    plain = layers._add_norm_parameters

    def with_an_extra_weight(module, features):
        plain(module, features)
        module.norm_extra = torch.nn.Parameter(torch.zeros(features))
    monkeypatch.setattr(layers, "_add_norm_parameters", with_an_extra_weight)
    again = synth_cfg(tmp_path / "run", "--train.max_steps", "4", "--train.checkpoint_every", "2")
    with pytest.raises(ConfigError, match=r"holds no weight '.*norm_extra'.*start a new --run.out"):
        Trainer(again, data=synth_data(again))
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*")) == before


def test_checkpoint_holds_full_state_and_keeps_newest(tmp_path):
    cfg = synth_cfg(tmp_path / "run", "--train.max_steps", "6", "--train.checkpoint_every", "2",
                    "--train.keep_checkpoints", "2")
    tr = Trainer(cfg, data=synth_data(cfg))
    tr.train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]
    last = tmp_path / "run" / "checkpoints" / "step-00000006"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 6
    assert meta["data"]["subject_map"] and meta["config"]["model"]["hidden"] == 16
    state = torch.load(last / "trainer.pt", weights_only=False)
    assert {"step", "schedule", "early", "run_id", "skipped"} <= set(state)
    rank = torch.load(last / "rank-0.pt", weights_only=False)
    assert {"loader", "rng"} <= set(rank)
    assert rank["loader"]["sampler"]["position"] >= 0
    export = torch.load(tmp_path / "run" / "best" / "model.pt", weights_only=False)
    assert {"model", "config", "data"} <= set(export)
    assert not any("_checkpoint_wrapped_module" in k for k in export["model"])


def _module(model_cfg_overrides=(), balancer="uncertainty"):
    cfg = load_config(None, ["--model.hidden", "16", "--model.heads", "2", "--model.blocks", "2",
                             "--model.eeg_patch", "4", "--model.eeg_stride", "4", "--model.forecast_steps", "2",
                             "--model.dropout", "0.0", "--train.balancer", balancer, *model_cfg_overrides],
                      validate=False)
    torch.manual_seed(0)
    model = build_model(cfg, n_subjects=2, n_sessions=2, n_fmri_slots=8, n_eeg_slots=6, samples_per_tr=4)
    return cfg, build_train_module(model, cfg.train, cfg.model)


def _grads(module):
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
            for n, p in module.named_parameters() if p.grad is not None}


def _counts(batches, cfg):
    out = {}
    for b in batches:
        for k, v in loss_counts(b, cfg.train, cfg.model).items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def test_accumulation_equals_one_big_batch_with_uneven_windows():
    """k micro-batches of windows of different sizes give the gradient of one batch of all of them."""
    from torch_geometric.data import Batch
    from tests.batches import make_window

    cfg, module = _module()
    windows = [make_window(n_fmri=nf, n_eeg=ne, t_f=8, samples_per_tr=4, seed=i, subject=i % 2, session=i % 2)
               for i, (nf, ne) in enumerate([(8, 6), (5, 3), (7, 6), (4, 2)])]
    big = Batch.from_data_list(windows)
    counts = _counts([big], cfg)
    loss, _ = module(big, counts, 1.0, 1.0)
    loss.backward()
    ref = _grads(module)
    module.zero_grad()

    micro = [Batch.from_data_list(windows[:1]), Batch.from_data_list(windows[1:])]
    counts = _counts(micro, cfg)
    for b in micro:
        loss, _ = module(b, counts, 1.0, 1.0 / len(micro))
        loss.backward()
    acc = _grads(module)
    assert ref.keys() == acc.keys()
    for k in ref:
        torch.testing.assert_close(acc[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_activation_checkpointing_recomputes_and_keeps_gradients():
    """Backward FLOPs rise by about one forward of the checkpointed blocks; gradients are unchanged,
    including with dropout (the RNG state is restored for the recomputation)."""
    batch = make_batch(n_windows=2, n_fmri=8, n_eeg=6, t_f=8, samples_per_tr=4)
    results = {}
    for policy in ("none", "full"):
        cfg, module = _module(["--model.dropout", "0.2"])
        apply_activation_checkpointing(module.model.blocks, policy, 1)
        counts = _counts([batch], cfg)
        torch.manual_seed(123)
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = module(batch, counts, 1.0, 1.0)
            loss.backward()
        results[policy] = (counter.get_total_flops(), _grads(module))
    flops_none, g_none = results["none"]
    flops_full, g_full = results["full"]
    assert flops_full > flops_none * 1.1, (flops_none, flops_full)
    for k in g_none:
        torch.testing.assert_close(g_full[k], g_none[k], rtol=1e-5, atol=1e-7, msg=k)


def test_every_k_policy_selects_blocks():
    from twinbrain.train.parallel import checkpointed_block_indices
    assert checkpointed_block_indices(4, "none", 2) == []
    assert checkpointed_block_indices(4, "full", 2) == [0, 1, 2, 3]
    assert checkpointed_block_indices(5, "every_k", 2) == [0, 2, 4]


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "plateau", "constant"])
def test_schedulers_are_built_and_move_the_lr(kind):
    cfg = load_config(None, ["--train.scheduler", kind, "--train.max_steps", "20", "--train.warmup_steps", "4"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": cfg.train.lr, "name": "decay"}])
    sched = Schedule(opt, cfg.train)
    lrs = []
    for step in range(20):
        opt.step()
        sched.step()
        if kind == "plateau":
            sched.on_eval(1.0)  # never improves: the lr must drop
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(round(v, 12) for v in lrs)) > 1, f"{kind} never changed the lr"
    if kind in ("cosine", "onecycle"):
        assert lrs[-1] < max(lrs)


@pytest.mark.parametrize("kind", ["cosine", "onecycle", "plateau", "constant"])
def test_schedule_state_round_trip_continues_the_same_lrs(kind):
    """A schedule restored after step 1 of the warm-up (with its optimizer, as a resume does) gives the same
    lr at every later step as the one that never stopped."""
    cfg = load_config(None, ["--train.scheduler", kind, "--train.max_steps", "20", "--train.warmup_steps", "4"])

    def build():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([{"params": [p], "lr": cfg.train.lr, "name": "decay"}])
        return opt, Schedule(opt, cfg.train)

    def advance(opt, sched, steps):
        out = []
        for _ in range(steps):
            opt.step()
            sched.step()
            sched.on_eval(1.0)        # never improves: plateau halves the lr
            out.append(opt.param_groups[0]["lr"])
        return out

    opt, sched = build()
    advance(opt, sched, 1)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    expected = advance(opt, sched, 19)
    assert len(set(expected)) > 1, f"{kind}: the lr does not move after step 1, so nothing is checked"
    opt2, sched2 = build()
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert advance(opt2, sched2, 19) == expected
    fresh_opt, fresh = build()
    assert advance(fresh_opt, fresh, 19) != expected, f"{kind}: a fresh schedule gives the same lrs"


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_early_stopping_counts_evaluations():
    es = EarlyStopping(patience=2)
    assert es.update(1.0) == (True, False)
    assert es.update(1.5) == (False, False)
    assert es.update(1.2) == (False, True)
    es2 = EarlyStopping(0)
    assert not any(es2.update(v)[1] for v in (3, 4, 5, 6))
    assert math.isinf(EarlyStopping(1).best)


def test_nonfinite_loss_skips_the_step(tmp_path):
    cfg = synth_cfg(tmp_path / "run", "--train.max_steps", "3", "--logging.log_every", "1")
    tr = Trainer(cfg, data=synth_data(cfg))
    before = {k: v.clone() for k, v in tr.raw.state_dict().items()}
    it = iter(tr.loader)
    micro = tr._micro_batches(it)
    micro[0]["fmri"].x[0, 0, 0] = float("nan")
    stats = tr.train_step(micro)
    assert stats["skipped_steps"] == 1
    after = tr.raw.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
