"""The Trainer: one build order for every backend, one loop, exact resume.

Build order (each step depends only on earlier ones): distributed -> run-directory lock, paths,
checkpoint choice and compatibility (seconds, before any data or model work) -> seeds -> data ->
model (warm start) and loss balancer -> activation checkpointing -> train module, loader and FLOP
probe -> wrapping/sharding and optimizer, schedule -> per-rank seeds -> auto-resume -> telemetry.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import (ADDED_KEYS, Config, ConfigError, check_paths, drop_retired, dump_config, fixed_keys,
                      flatten, save_config)
from ..data.module import DataModule
from ..model import TrainModule, build_model, build_train_module, loss_counts, loss_term_names
from ..rundir import BEST, EXPORT_FILES, FINAL, RunDir
from ..schema import SIGNAL_LOSS_TERMS
from ..weights import write_export
from .backends import make_backend
from .checkpoint import Checkpointer, RNGState, full_model_state
from .distributed import Backend, all_reduce_, make_accelerator, resolve_backend, resolve_precision
from .extensions import prepare_extensions
from .host_memory import keep_freed_memory
from .optim import EarlyStopping, Schedule, build_optimizer, fixed_groups, param_groups
from .parallel import apply_activation_checkpointing, autocast_dtype
from .runlock import RunLock
from .telemetry import Telemetry, count_flops, reduce_scalars, summary_table
from .validation import validate
from .warm_start import warm_start

log = logging.getLogger(__name__)

# The skipped-fraction limit applies from this step on (a few early skips are normal under fp16).
FRACTION_MIN_STEPS = 20


class DivergenceError(FloatingPointError):
    """Training stopped because too many steps had a non-finite loss or gradient."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def node_steps(batch, eeg_stride: int) -> float:
    """Work units of one batch: fMRI nodes x TRs + EEG nodes x latent steps."""
    f, e = batch["fmri"].x, batch["eeg"].x
    return float(f.shape[0] * f.shape[1] + e.shape[0] * (e.shape[1] // eeg_stride))


def _release_lock_on_error(init):
    """A trainer that fails to build gives its run directory back at once (not at process exit)."""
    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.release()
            raise
    return wrapped


class Trainer:
    @_release_lock_on_error
    def __init__(self, cfg: Config, data: DataModule | None = None):
        self.cfg = cfg
        t = cfg.train
        # 1. distributed, then the run directory (locked) and the checkpoint to resume from
        self._setup_run()
        # 2. seeds: identical model initialisation on every rank
        seed_everything(t.seed)
        # 3. data
        self.data = data if data is not None else DataModule(cfg).setup()
        # 4. model (warm-started unless resuming); 5. activation checkpointing, train module, loader, FLOP probe
        module = self._build_module()
        # 6. wrapping and optimizer
        self._wrap(module)
        # 7. per-rank randomness (dropout) after the shared initialisation
        seed_everything(t.seed + 1000003 * (self.rank + 1))
        # 8. auto-resume
        self._resume_or_start()
        # 9. telemetry
        self._start_telemetry()

    # ------------------------------------------------------------ build steps
    def _setup_run(self) -> None:
        """Backend, device and precision; the run directory locked; the checkpoint to resume from chosen
        and checked against the config (seconds, before any data or model work)."""
        cfg, t = self.cfg, self.cfg.train
        self.backend: Backend = resolve_backend(cfg)
        # config.yaml records what ran, not 'auto' (the launch config may have chosen it).
        cfg.parallel.backend, cfg.parallel.zero_stage = self.backend.name, self.backend.zero_stage
        self.accelerator = make_accelerator()
        self.device = self.accelerator.device
        if self.device.type == "cpu" and keep_freed_memory():
            log.debug("CPU run: freed activations stay in the process between steps (train/host_memory.py)")
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.rank == 0
        self.precision = resolve_precision(t.precision)
        self.dtype = autocast_dtype(self.precision, self.device)
        if self.dtype is not None and self.device.type == "cpu" and self.precision == "fp16":
            raise ConfigError("train.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
        self.kind = make_backend(self.backend, self.accelerator, self.dtype)
        self.run_dir = Path(cfg.run.out)
        self.layout = RunDir(self.run_dir)
        self.lock = RunLock(self.run_dir)
        self._take_run_dir()
        self.ext_dir = prepare_extensions() if self.kind.jit_extensions else None
        # Checkpoint choice and compatibility are settled now, in seconds, not after data and model setup.
        self.checkpointer = Checkpointer(self.layout.checkpoints, self.kind, self.rank,
                                         self.world, t.keep_checkpoints)
        self.resume_from = self.checkpointer.newest_intact()
        self._check_run_dir()

    def _build_module(self) -> TrainModule:
        """The model (warm-started unless resuming), activation checkpointing (applied by us, the same
        under every backend), the train module with the loss balancer (before the optimizer, or it is never
        trained), this rank's loader and the FLOP probe (on a copy of the unwrapped module, before any
        wrapper). Returns the unwrapped train module on the device."""
        cfg, t, d = self.cfg, self.cfg.train, self.data
        model = build_model(cfg, n_subjects=len(d.subject_map), n_sessions=len(d.session_map),
                             n_fmri_slots=d.n_fmri_slots, n_eeg_slots=d.n_eeg_slots,
                             samples_per_tr=d.samples_per_tr)
        self.modalities = d.modalities
        self.kind.modalities = tuple(self.modalities)
        # Closed-form start (tuned ridge VAR core, coupling priors); a resume loads the trained state instead.
        self.warm = warm_start(model, d, cfg) if t.warm_start and self.resume_from is None else None
        groups = fixed_groups(t)
        frozen = model.freeze(groups)  # before any wrapper: DDP and FSDP2 see what is trained
        if frozen and self.is_main:
            log.info("frozen at lr 0 (train.core_lr_scale / train.gate_lr_scale): %d tensors (%s); closed "
                     "forecast gates: %s", len(frozen), ", ".join(groups),
                     ", ".join(m for m, g in model.gate.items() if g.closed) or "none")
        self.n_params = sum(p.numel() for p in model.parameters())
        self.ac_blocks = apply_activation_checkpointing(model.blocks, t.activation_checkpointing, t.ac_every_k)
        module = build_train_module(model, t, cfg.model, self.modalities).to(self.device)
        self.raw = module
        self.loader = d.train_loader(self.rank, self.world, device=self.device)
        self.step_flops = self._count_flops(module) if cfg.logging.flops else None
        return module

    def _wrap(self, module: TrainModule) -> None:
        """The backend's wrapping/sharding of ``module`` with its optimizer, the grad scaler (fp16),
        the learning-rate schedule and early stopping."""
        cfg, t = self.cfg, self.cfg.train
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 \
            and self.kind.uses_scaler else None
        self.module, self.optimizer, self.base_optimizer = self.kind.wrap(
            module, cfg, lambda: build_optimizer(param_groups(module.model, t, extra=module.balancer), t, self.device),
            self.ext_dir)
        self.schedule = Schedule(self.base_optimizer, t)
        self.early = EarlyStopping(t.early_stop_patience)

    def _resume_or_start(self) -> None:
        """Counters at zero, every stateful piece registered with the checkpointer, then the newest intact
        checkpoint loaded, or (a new run) the resolved config written."""
        self.step, self.skipped, self.skipped_run = 0, 0, 0
        self.best_metric = math.inf
        self.run_id: str | None = None
        # Everything a resume restores besides model and optimizer, handed to the one checkpointer.
        self.checkpointer.register(self, {"schedule": self.schedule, "early": self.early, "scaler": self.scaler},
                                   {"loader": self.loader, "rng": RNGState()})
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif self.is_main:
            save_config(self.cfg, self.layout.config)

    def _start_telemetry(self) -> None:
        """Telemetry (metrics.jsonl, tracker) continuing the resumed run id, and the launch logged."""
        cfg, t = self.cfg, self.cfg.train
        self.tel = Telemetry(cfg.logging, self.run_dir, is_main=self.is_main, world_size=self.world,
                             device=self.device, config_dict=cfg.to_dict(),
                             run_name=cfg.run.name or self.run_dir.name, resume_run_id=self.run_id,
                             max_steps=t.max_steps, backend=self.backend.name, start_step=self.step,
                             launch={**self.backend.record(), "precision": self.precision,
                                     "autocast_dtype": str(self.dtype).replace("torch.", "") if self.dtype
                                     else "float32"})
        self.run_id = self.tel.run_id
        if self.step_flops:
            self.tel.set_step_flops(*self.step_flops)
        if self.is_main:
            log.info("backend %s, %d process(es), device %s, %s, %.2fM parameters, activation checkpointing "
                     "on blocks %s", self.backend.name, self.world, self.device, self.dtype or "fp32",
                     self.n_params / 1e6, self.ac_blocks or "none")

    # ------------------------------------------------------------ setup helpers
    def _take_run_dir(self) -> None:
        """Paths exist, the run directory is writable and this job holds its lock (same verdict on all ranks).

        Rank 0 holds the lock; a refusal is raised on every rank, so no rank waits on a collective.
        """
        error = None
        try:
            check_paths(self.cfg)
            if self.is_main:
                self.lock.acquire()
        except ConfigError as exc:
            error = str(exc)
        if self.world > 1:
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = error or box[0]
        if error:
            self.lock.release()
            raise ConfigError(error)

    def _check_run_dir(self) -> None:
        """A run directory with a checkpoint resumes only under the same learning-relevant config,
        world size and backend."""
        if self.resume_from is None:
            return
        self.checkpointer.check_compatible(self.resume_from)
        saved = self.layout.config
        if not saved.is_file():
            return
        old = {**ADDED_KEYS, **flatten(drop_retired(yaml.safe_load(saved.read_text())))}
        new = flatten(yaml.safe_load(dump_config(self.cfg)))
        resolved_later = {"parallel.backend": "auto", "parallel.zero_stage": 0}   # runs saved before resolution
        changed = fixed_keys([k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
                              and resolved_later.get(k, object()) != old.get(k)], "resume")
        if changed:
            diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
            raise ConfigError(f"{self.run_dir} holds a checkpoint trained with a different config ({diff}). "
                              "Resume with the same config, or choose a new --run.out")

    def _count_flops(self, module: TrainModule) -> tuple[int, int] | None:
        """Matmul FLOPs of one micro-batch forward+backward, on a copy (no state is touched)."""
        try:
            probe = copy.deepcopy(module)
            loader = self.data.train_loader(self.rank, self.world, device=self.device)
            batch = next(iter(loader)).to(self.device)
            counts = probe.counts(batch)
            rng = torch.get_rng_state()

            def step():
                loss, _ = probe(batch, counts, 1.0, 1.0)
                loss.backward()
            flops = count_flops(step)
            torch.set_rng_state(rng)
            return flops, batch.num_graphs
        except Exception as exc:  # FLOPs are telemetry: never let them stop training
            log.warning("FLOP count skipped: %s", exc)
            return None

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The trainer's own counters (the top level of ``trainer.pt``; its components are saved beside them)."""
        return {"step": self.step, "skipped": self.skipped, "skipped_run": self.skipped_run,
                "run_id": self.run_id, "best_metric": self.best_metric}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.skipped_run = int(state.get("skipped_run", 0))
        self.run_id = state.get("run_id")
        self.best_metric = float(state["best_metric"])

    def _resume(self, path: Path) -> None:
        self.checkpointer.load(path, self.module, self.base_optimizer)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self) -> Path:
        meta = {"config": self.cfg.to_dict(), "data": self.data.metadata(), "run_id": self.run_id}
        return self.checkpointer.save(self.step, self.module, self.base_optimizer, meta)

    def export(self, name: str, metrics: dict | None = None, diverged: str | None = None) -> Path:
        """Consolidated single-file model for inference (``RUN/<name>/model.pt``); collective.

        ``diverged``: why these weights are not a usable model; stored as ``diverged`` in the file and
        in ``RUN/<name>/DIVERGED`` so neither a program nor a person takes them for a trained twin.
        """
        full = full_model_state(self.module, self.kind)
        path = self.layout.model(name)
        if self.is_main:
            prefix = "model."
            weights = {k[len(prefix):].replace("_checkpoint_wrapped_module.", ""): v
                       for k, v in full.items() if k.startswith(prefix)}
            payload = {"config": self.cfg.to_dict(), "data": self.data.metadata(), "step": self.step,
                       "metrics": metrics or {}, "backend": self.backend.name}
            if diverged:
                payload["diverged"] = diverged
            write_export(path, weights, payload)
            marker = path.parent / "DIVERGED"
            if diverged:
                marker.write_text(diverged + "\n")
            elif marker.exists():
                marker.unlink()
        return path

    def _divergence(self) -> str | None:
        """Why training must stop (too many skipped steps), or None. The same on every rank."""
        t = self.cfg.train
        if t.max_skipped_consecutive and self.skipped_run >= t.max_skipped_consecutive:
            return (f"{self.skipped_run} consecutive steps (up to step {self.step}) had a non-finite loss or "
                    f"gradient (limit train.max_skipped_consecutive={t.max_skipped_consecutive})")
        if t.max_skipped_fraction < 1 and self.step >= FRACTION_MIN_STEPS \
                and self.skipped / self.step > t.max_skipped_fraction:
            return (f"{self.skipped} of {self.step} steps had a non-finite loss or gradient (limit "
                    f"train.max_skipped_fraction={t.max_skipped_fraction})")
        return None

    def _stop_diverged(self, reason: str) -> None:
        self.export(FINAL, {"skipped_steps": self.skipped}, diverged=reason)
        # No checkpoint to point at: those of the streak hold the diverged weights, and a lower lr is a
        # learning-relevant change that this run directory refuses.
        raise DivergenceError(
            f"training diverged: {reason}. Train again in a new --run.out with a lower train.lr (now "
            f"{self.cfg.train.lr:g}), or check the data; {self.layout.model(FINAL)} is marked diverged")

    # ------------------------------------------------------------ one optimizer step
    def _micro_batches(self, it) -> list:
        return [next(it) for _ in range(self.cfg.train.grad_accum)]

    def train_step(self, micro: list) -> dict[str, float]:
        """One optimizer step over the micro-batches ``micro`` (``train.grad_accum`` of them); returns the
        step's logged scalars (global values)."""
        micro = [b.to(self.device) for b in micro]
        counts = self._global_counts(micro)
        loss_sum, parts_sum = self._forward_backward(micro, counts)
        grad_norm = self._optimizer_step(loss_sum)
        stats = self._step_stats(loss_sum, parts_sum, grad_norm)
        self._windows = float(sum(b.num_graphs for b in micro))
        self._node_steps = float(sum(node_steps(b, self.cfg.model.eeg_stride) for b in micro))
        return stats

    def _global_counts(self, micro: list) -> dict[str, float]:
        """Global element counts of every loss term over all micro-batches and ranks, before backward."""
        t = self.cfg.train
        names = loss_term_names()
        local = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        for b in micro:
            c = loss_counts(b, t, self.cfg.model)
            local += torch.tensor([float(c[n]) for n in names], dtype=torch.float64, device=self.device)
        return dict(zip(names, all_reduce_(local).tolist()))

    def _forward_backward(self, micro: list, counts: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of every micro-batch (gradient sync on the last only): the summed loss
        and this rank's sum of each present modality's loss parts."""
        data_scale, reg_scale = self.kind.scales(self.world, len(micro))
        parts_sum: dict[str, float] = {}
        loss_sum = torch.zeros((), device=self.device)
        for i, b in enumerate(micro):
            with self.kind.no_sync(self.module, last=i == len(micro) - 1):
                loss, parts = self.kind.forward(self.module, b, counts, data_scale, reg_scale, self.device)
                self.kind.backward(self.module, loss, self.scaler, self.step + 1, self.device)
            loss_sum += loss.detach() / data_scale
            for k, v in parts.items():
                if k.split("_", 1)[0] in self.modalities:      # absent modalities are not logged
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
        return loss_sum, parts_sum

    def _optimizer_step(self, loss_sum: torch.Tensor) -> float:
        """Clip and step (or skip a non-finite step on all ranks), advance the schedule and the counters;
        returns the gradient norm."""
        t = self.cfg.train
        grad_norm, stepped = self.kind.step(self.module, self.optimizer, self.scaler, loss_sum, t.grad_clip,
                                            self.device)
        if stepped:
            self.schedule.step()
            self.skipped_run = 0
        else:
            self.skipped += 1
            self.skipped_run += 1
            if self.is_main:
                log.warning("step %d: non-finite loss or gradient, step skipped on all ranks", self.step + 1)
        self.step += 1
        return grad_norm

    def _step_stats(self, loss_sum: torch.Tensor, parts_sum: dict[str, float], grad_norm: float) -> dict[str, float]:
        """The step's logged scalars: objective, loss parts and ``loss`` (global), grad norm, skips,
        balancer weights and learning rates."""
        # Loss parts are this rank's share of the global mean: summing over ranks gives the global value.
        summed = reduce_scalars({"objective": float(loss_sum), **{f"loss/{k}": v for k, v in parts_sum.items()}},
                                op="sum")
        # ``loss``: the unweighted sum of the reconstruction and forecast terms (global means), comparable
        # across balancers and with ``val/loss``; ``objective``: what the optimizer minimised.
        summed["loss"] = sum(summed[f"loss/{k}"] for k in SIGNAL_LOSS_TERMS if f"loss/{k}" in summed)
        stats = {**summed, "grad_norm": grad_norm, "skipped_steps": float(self.skipped)}
        balancer = self.raw.balancer
        if not self.kind.sharded or balancer.mode == "none":
            stats.update({f"balancer/{k}": v for k, v in balancer.weights().items()})
        stats.update(self.schedule.lrs())
        return stats

    # ------------------------------------------------------------ loop
    def evaluate(self) -> dict[str, float]:
        self.module.eval()
        try:
            loader = self.data.eval_loader("val", self.rank, self.world)
            metrics = validate(self.module, loader, self.cfg.model, self.cfg.train, self.device, self.dtype,
                               self.modalities)
        finally:
            self.module.train()
        return metrics

    def train(self, until: int | None = None) -> dict:
        """Train to ``train.max_steps`` (or stop early at step ``until``, e.g. to test resume)."""
        t = self.cfg.train
        end = min(t.max_steps, until) if until else t.max_steps
        self.module.train()
        it = iter(self.loader)
        last_eval: dict = {}
        stop = False
        saved_at = self.step if self.step else -1
        if self.step == 0 and self.warm:
            # The warm-started linear model is the first candidate for best/: training must beat it.
            last_eval = self.evaluate()
            self.tel.log_eval(0, last_eval)
            if self.early.update(last_eval["loss"])[0]:
                self.best_metric = last_eval["loss"]
                self.export(BEST, {f"val/{k}": v for k, v in last_eval.items()})
        while self.step < end and not stop:
            self.tel.step_begin()
            micro = self._micro_batches(it)
            self.tel.data_loaded()
            try:
                with self.tel.maybe_profile(self.step + 1):
                    stats = self.train_step(micro)
            except torch.OutOfMemoryError:
                self.tel.on_oom()
                raise
            self.tel.step_end(self.step, self._windows, self._node_steps)
            diverged = self._divergence()
            if self.tel.should_flush(self.step) or diverged:
                self.tel.log(self.step, stats)
                self.tel.flush(self.step)
            if diverged:
                self._stop_diverged(diverged)
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                last_eval = self.evaluate()
                self.tel.log_eval(self.step, last_eval)
                self.schedule.on_eval(last_eval["loss"])
                improved, stop = self.early.update(last_eval["loss"])
                if improved and math.isfinite(last_eval["loss"]):
                    self.best_metric = last_eval["loss"]
                    self.export(BEST, {f"val/{k}": v for k, v in last_eval.items()})
                if stop and self.is_main:
                    log.info("early stopping at step %d: no improvement in %d evaluations", self.step,
                             t.early_stop_patience)
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps or stop:
                self.save_checkpoint()
                saved_at = self.step
        if saved_at != self.step:
            self.save_checkpoint()
        if self.step < t.max_steps and not stop:
            return last_eval                      # interrupted on purpose: no final export
        final_loss = last_eval.get("loss", math.nan)
        diverged = None if math.isfinite(final_loss) else f"final validation loss is {final_loss}"
        self.export(FINAL, {f"val/{k}": v for k, v in last_eval.items()}, diverged=diverged)
        if self.is_main and not self.layout.model(BEST).is_file():
            if diverged:
                log.warning("no best/ export: no validation was finite (%s)", diverged)
            else:
                # No validation improved on an earlier one (or none ran): the final weights are the best we have.
                self.layout.export(BEST).mkdir(parents=True, exist_ok=True)
                for f in EXPORT_FILES:
                    shutil.copyfile(self.layout.export(FINAL) / f, self.layout.export(BEST) / f)
        if self.is_main and self.tel.wandb is not None and self.layout.model(BEST).is_file():
            self.tel.wandb.log_export(self.layout.export(BEST), self.step)     # the best export as an artifact
        self.last_eval = last_eval
        return last_eval

    def close(self, exit_code: int = 0) -> None:
        """Finish telemetry (``exit_code`` != 0 marks a failed run) and release the run directory."""
        tel = getattr(self, "tel", None)
        if tel is not None:
            tel.close(exit_code=exit_code)
            if self.is_main:
                print(summary_table(tel.last_metrics, getattr(self, "last_eval", None) or tel.last_eval))
                print(f"run directory: {self.run_dir.resolve()}")
        self.lock.release()


def run_training(cfg: Config) -> dict:
    """Build the trainer, train, close: the whole job behind ``launch/train.py`` and ``twinbrain train``."""
    trainer = Trainer(cfg)
    code = 1
    try:
        result = trainer.train()
        code = 0
        return result
    finally:
        trainer.close(exit_code=code)
