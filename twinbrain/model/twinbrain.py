"""TwinBrain: heterogeneous spatio-temporal graph model that reconstructs and forecasts EEG and fMRI.

Pipeline (shapes for one batch of windows; ``H`` = ``model.hidden``):

    fMRI x [N_f, T_f, 1] --Linear-->                     [N_f, T_f, H]   one latent step per TR
    EEG  x [N_e, T_e, 1] --causal patch embedding-->     [N_e, L_e, H]   L_e = T_e / eeg_stride
    + node-identity, subject and session embeddings (+ Laplacian PE), broadcast over time
    --> blocks: model.blocks x STBlock (causal conv, directed coupling C[target, source] per relation,
        causal temporal attention, MLP); the couplings (+ per-subject low-rank deltas) are shared by all blocks
    --> LayerNorm per modality --> shared Linear (the GradNorm layer) = latent[m] [N, L, H]
    recon:    decoder[m](latent)                                  -> [N, T, 1]
    forecast: predictor (S future latents) = latent_forecast[m] [N, L, S, H] -> decoder[m] = correction
              fMRI: linear core VAR(p) over all regions (iterated, signal space) + gate * correction
              EEG:  linear core VAR(p) over all channels at the sample rate, iterated from the last sample
                    of every latent step, + gate * correction (model.eeg_core false: anchor * last sample
                    + correction)

See docs/ARCHITECTURE.md for the batch schema and the output contract, docs/model.md for the design.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinbrain.model.blocks import STBlock
from twinbrain.model.coupling import LinearCore, from_dense, in_slot_order, to_dense
from twinbrain.model.layers import CausalPatchEmbed, LatentPredictor, ScaledSum, dense_index, laplacian_pe
from twinbrain.model.relations import build_relation_layers
from twinbrain.schema import MODALITIES, node_mask, samples_per_step

FC = {"fmri": ("fmri", "fc", "fmri"), "eeg": ("eeg", "fc", "eeg")}
CROSS = ("eeg", "to", "fmri")
# Subject-specific parameters: trained at ``train.emb_lr`` without weight decay.
EMBEDDING_PREFIXES = ("subject_embed.", "session_embed.", "session_affine.")
PERSONAL_SUFFIXES = (".u",)               # per-subject loadings of the low-rank coupling deltas
# The linear core's population coefficients (VAR: coef, intercept; transfer flow: w, decay, drive).
CORE_SUFFIXES = (".coef", ".intercept", ".w", ".decay", ".drive")
# Modalities that can be forecast by a linear dynamics core: fMRI one sample per latent step, EEG at its
# sample rate from the last sample of every latent step (``model.eeg_core``).
LINEAR_MODALITIES = ("fmri", "eeg")


def core_modalities(cfg) -> tuple[str, ...]:
    """The modalities with a linear core under ``ModelConfig`` ``cfg``."""
    if cfg.linear_order <= 0:
        return ()
    return tuple(m for m in LINEAR_MODALITIES if m != "eeg" or cfg.eeg_core)


def core_kind(cfg, modality: str) -> str:
    """``model.core`` for fMRI; EEG's sample-rate core is a ridge VAR (the transfer flow integrates one TR)."""
    return cfg.core if modality == "fmri" else "var"


@dataclass
class ModelOutput:
    """Outputs per modality ``m in ('fmri', 'eeg')`` (``L`` latent steps, ``S`` forecast steps):

    recon[m] ``[N, T, 1]`` on the input grid; forecast[m] ``[N, L, S * step]`` where entry ``[n, t, k]``
    predicts sample ``(t + 1) * step + k`` (``step`` = 1 for fMRI, ``eeg_stride`` for EEG);
    forecast_std[m] same shape, positive (only for ``probabilistic == 'gaussian'``, else None);
    latent[m] ``[N, L, H]``; latent_forecast[m] ``[N, L, S, H]`` predicting ``latent[m][:, t + 1 + s]``;
    penalty: the coupling sparsity term ``model.coupling_l1 * sum_rel mean(|C_rel| * weight_rel)`` (scalar).
    """
    recon: dict[str, Tensor]
    forecast: dict[str, Tensor]
    latent: dict[str, Tensor]
    latent_forecast: dict[str, Tensor]
    forecast_std: dict[str, Tensor] | None = None
    penalty: Tensor | None = None


class TwinBrain(nn.Module):
    """The digital-twin model. ``forward(batch) -> ModelOutput`` for a PyG ``Batch`` or one ``HeteroData``.

    Args:
        cfg: ``ModelConfig``.
        n_subjects, n_sessions: sizes of the subject and (subject, session) maps (embedding rows).
        n_fmri_slots, n_eeg_slots: atlas slots / channel slots (``node_id`` ranges).
        samples_per_tr: EEG samples per fMRI volume; must be a multiple of ``cfg.eeg_stride``.

    Embeddings of subjects and sessions start at zero, so an unseen subject is the population model.
    ``node_id`` must be unique within a window (fixed atlas slots).
    """

    def __init__(self, cfg, *, n_subjects: int, n_sessions: int, n_fmri_slots: int, n_eeg_slots: int,
                 samples_per_tr: int):
        super().__init__()
        if samples_per_tr % cfg.eeg_stride:
            raise ValueError(f"samples_per_tr={samples_per_tr} is not a multiple of model.eeg_stride="
                             f"{cfg.eeg_stride}; pick a stride that divides the EEG samples per TR")
        if cfg.hidden % cfg.heads:
            raise ValueError(f"model.hidden={cfg.hidden} is not divisible by model.heads={cfg.heads}")
        self.cfg, self.samples_per_tr = cfg, samples_per_tr
        hid, s_steps = cfg.hidden, cfg.forecast_steps
        self.n_slots = {"fmri": n_fmri_slots, "eeg": n_eeg_slots}
        self.step = samples_per_step(cfg)                        # signal samples per latent step
        self.steps_per_tr = samples_per_tr // cfg.eeg_stride    # EEG latent steps per fMRI volume

        self.encode = nn.ModuleDict({"fmri": nn.Linear(1, hid),
                                     "eeg": CausalPatchEmbed(1, hid, cfg.eeg_patch, cfg.eeg_stride)})
        # Tables get at least one row: a modality absent from the cohort (0 slots) is never indexed, but
        # FSDP2 cannot shard zero-size parameters.
        rows = {m: max(self.n_slots[m], 1) for m in MODALITIES}
        self.node_emb = nn.ModuleDict({m: nn.Embedding(rows[m], hid) for m in MODALITIES})
        for emb in self.node_emb.values():
            nn.init.normal_(emb.weight, std=0.1)
        self.subject_embed, self.session_embed = nn.Embedding(n_subjects, hid), nn.Embedding(n_sessions, hid)
        nn.init.zeros_(self.subject_embed.weight)
        nn.init.zeros_(self.session_embed.weight)
        if cfg.session_affine:   # per (session, slot) input gain and offset, identity at start
            self.session_affine = nn.ModuleDict({
                kind: nn.ModuleDict({m: nn.Embedding(n_sessions * rows[m], 1) for m in MODALITIES})
                for kind in ("gain", "bias")})
            for emb in self.session_affine.modules():
                if isinstance(emb, nn.Embedding):
                    nn.init.zeros_(emb.weight)
        if cfg.lap_pe_dim:
            self.pe_proj = nn.ModuleDict({m: nn.Linear(cfg.lap_pe_dim, hid) for m in MODALITIES})
        # One signed directed coupling per relation, shared by every block (the twin's "who drives whom").
        self.coupling = build_relation_layers(cfg, self.n_slots, n_subjects)

        self.blocks = nn.ModuleList(
            STBlock(hid, cfg.heads, cfg.kernel_size, cfg.dropout, self.steps_per_tr, self.n_slots,
                    dilation=2 ** (i % 4), temporal_attention=cfg.temporal_attention,
                    spectral_norm=cfg.spectral_norm, attention_window=cfg.attention_window)
            for i in range(cfg.blocks))

        self.norm_out = nn.ModuleDict({m: nn.LayerNorm(hid) for m in MODALITIES})
        self.shared = nn.Linear(hid, hid)   # last layer every loss term passes through (GradNorm)
        # One decoder per modality serves reconstruction and forecasting: a forecast latent for step
        # t+1+s is decoded exactly like the latent of step t+1+s.
        self.decoder = nn.ModuleDict({m: nn.Linear(hid, self.step[m]) for m in MODALITIES})
        self.predictor = nn.ModuleDict({m: LatentPredictor(hid, s_steps) for m in MODALITIES})
        # Linear dynamics core: the model contains the ridge VAR. Its forecast is the starting point and the
        # nonlinear path adds ``gate * correction`` with the gate at 0, so a warm-started twin forecasts
        # exactly like the tuned VAR at step 0 and training learns departures from it.
        self.linear_modalities = core_modalities(cfg)
        self.linear = nn.ModuleDict({m: LinearCore(self.n_slots[m], cfg.linear_order, s_steps * self.step[m],
                                                   n_subjects, cfg.coupling_rank, core=core_kind(cfg, m),
                                                   stride=self.step[m])
                                     for m in self.linear_modalities})
        self.gate = nn.ModuleDict({m: ScaledSum(0.0) for m in self.linear_modalities})
        # Without a core: a learned gain times the last observed sample of the step plus the decoded
        # prediction (oscillatory EEG starts without it, gain 0; fMRI at persistence).
        self.anchor = nn.ModuleDict({m: ScaledSum(1.0 if m == "fmri" else 0.0)
                                     for m in MODALITIES if m not in self.linear_modalities})
        if cfg.probabilistic == "gaussian":
            self.std_head = nn.ModuleDict({m: nn.Linear(hid, self.step[m]) for m in MODALITIES})

    # ------------------------------------------------------------ parameter groups for the trainer
    def shared_parameter(self) -> nn.Parameter:
        """Weight of the last layer shared by every loss term (for GradNorm gradient norms)."""
        return self.shared.weight

    def param_groups_spec(self) -> dict[str, list[str]]:
        """The optimizer groups, owned by the model (one rule next to the parameters it describes).

        Every parameter name in exactly one group: ``embedding`` (subject/session embeddings, the session
        affine and the personal coupling deltas: ``train.emb_lr``, no weight decay), ``core`` (the linear
        core's population coefficients, VAR or transfer flow: ``train.core_lr_scale`` x ``train.lr``, no decay), ``gate``
        (the forecast gates: ``train.gate_lr_scale`` x ``train.lr``, no decay), ``no_decay`` (biases,
        norms, node-identity and step embeddings, the couplings — held sparse by their own penalty) and ``default`` (weights, with weight decay). Names are
        relative to the unwrapped model; checkpoint wrappers' ``_checkpoint_wrapped_module.`` is removed.
        """
        groups: dict[str, list[str]] = {"embedding": [], "core": [], "gate": [], "no_decay": [], "default": []}
        for raw, p in self.named_parameters():
            name = raw.replace("_checkpoint_wrapped_module.", "")
            if name.startswith(EMBEDDING_PREFIXES) or (name.startswith(("coupling.", "linear."))
                                                       and name.endswith(PERSONAL_SUFFIXES)):
                groups["embedding"].append(name)
            elif name.startswith("linear.") and name.endswith(CORE_SUFFIXES):
                groups["core"].append(name)
            elif name.startswith("gate."):
                groups["gate"].append(name)
            elif (p.dim() < 2 or "norm" in name or "step_emb" in name
                  or name.startswith(("node_emb.", "coupling.", "linear.", "anchor."))):
                groups["no_decay"].append(name)
            else:
                groups["default"].append(name)
        return groups

    def freeze(self, groups) -> list[str]:
        """Stop the gradients of every parameter in ``groups`` (names of :meth:`param_groups_spec` the
        optimizer leaves unchanged, at lr 0), so backward skips their work; a frozen forecast gate is also
        closed (:meth:`ScaledSum.close`: at 0 its correction is not computed). Returns the frozen names."""
        spec = self.param_groups_spec()
        names = {n for g in groups for n in spec[g]}
        frozen = []
        for raw, p in self.named_parameters():
            if raw.replace("_checkpoint_wrapped_module.", "") in names:
                p.requires_grad_(False)
                frozen.append(raw)
        for gate in self.gate.values():
            if not gate.weight.requires_grad:
                gate.close()
        return frozen

    def embedding_parameter_names(self) -> list[str]:
        """Names of the ``embedding`` group: everything subject- or session-specific."""
        return self.param_groups_spec()["embedding"]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters of the ``embedding`` group (``train.emb_lr``), e.g. for personalisation."""
        names = set(self.embedding_parameter_names())
        return [p for n, p in self.named_parameters() if n.replace("_checkpoint_wrapped_module.", "") in names]

    # ------------------------------------------------------------ couplings, priors, linear core
    def couplings(self, subject: Tensor | None = None) -> dict[str, Tensor]:
        """``{relation_key: C}``: ``[M_t, M_s]`` population couplings, or ``[B, M_t, M_s]`` personal ones for
        ``subject [B]`` (row = target, column = source)."""
        return {k: (c.matrix(subject) if subject is not None else c.matrix()) for k, c in self.coupling.items()}

    @torch.no_grad()
    def set_prior(self, rel_key: str, prior) -> None:
        """Weight the sparsity penalty of one coupling by a prior ``[M_t, M_s]`` in [0, 1] (e.g. |FC| or
        normalised structural connectivity): entry weight ``1 - prior``, so likely edges cost less. The
        prior never masks: every entry stays learnable."""
        buf = self.coupling[rel_key].penalty_weight
        prior = torch.as_tensor(prior, dtype=buf.dtype).clamp(0, 1)
        m_t, m_s = self.coupling[rel_key].n_target, self.coupling[rel_key].n_source
        if prior.shape != (m_t, m_s):
            raise ValueError(f"prior for {rel_key} has shape {tuple(prior.shape)}, expected {(m_t, m_s)}")
        buf[:m_t, :m_s] = 1 - prior

    # ------------------------------------------------------------ forward
    def _read(self, batch) -> dict:
        """Pull the tensors of the schema out of a ``Batch``/``HeteroData``; edges of masked nodes get
        weight 0 (= no edge), missing relations become empty edge sets."""
        n_windows = batch.subject.numel()
        g: dict = {"n_windows": n_windows}
        for m in MODALITIES:
            store = batch[m]
            x = store.x
            if x.dim() != 3 or x.shape[-1] != 1:
                raise ValueError(f"batch['{m}'].x must be [N, T, 1], got {tuple(x.shape)}")
            n, dev = x.shape[0], x.device
            window = store.batch if "batch" in store else torch.zeros(n, dtype=torch.long, device=dev)
            node_id = store.node_id if "node_id" in store else torch.arange(n, device=dev)
            g[m] = {"x": x, "mask": node_mask(store, "x"), "node_id": node_id, "window": window,
                    "subject": batch.subject.view(-1)[window], "session": batch.session.view(-1)[window],
                    "idx": dense_index(node_id, window, self.n_slots[m])}
        t_f, t_e = g["fmri"]["x"].shape[1], g["eeg"]["x"].shape[1]
        if t_e != t_f * self.samples_per_tr:
            raise ValueError(f"EEG window has {t_e} samples but fMRI has {t_f} TRs x {self.samples_per_tr} "
                             f"samples per TR = {t_f * self.samples_per_tr}; windows must span the same time")
        for rel in (FC["fmri"], FC["eeg"], CROSS):
            src, _, dst = rel
            dev = g[dst]["x"].device
            if rel in batch.edge_types and "edge_index" in batch[rel]:
                ei = batch[rel].edge_index.long()
                ew = batch[rel].edge_weight if "edge_weight" in batch[rel] else None
                ew = torch.ones(ei.shape[1], device=dev) if ew is None else ew.float()
            else:
                ei, ew = torch.zeros(2, 0, dtype=torch.long, device=dev), torch.zeros(0, device=dev)
            ew = ew * g[src]["mask"][ei[0]] * g[dst]["mask"][ei[1]]
            g[rel] = (ei, ew)
        return g

    def _embed(self, m: str, gm: dict, g: dict) -> Tensor:
        """Input projection + identity embeddings: ``[N, T, 1] -> [N, L, H]``."""
        dtype = self.shared.weight.dtype   # parameter dtype (bf16 under FSDP2/DeepSpeed mixed precision)
        x = gm["x"].to(dtype)
        if self.cfg.session_affine:
            flat = gm["session"] * self.n_slots[m] + gm["node_id"]
            gain, bias = self.session_affine["gain"][m](flat), self.session_affine["bias"][m](flat)
            x = x * (1 + gain).unsqueeze(1) + bias.unsqueeze(1)
        h = self.encode[m](x)
        add = self.node_emb[m](gm["node_id"]) + self.subject_embed(gm["subject"]) + self.session_embed(gm["session"])
        if self.cfg.lap_pe_dim:
            ei, ew = g[FC[m]]
            pe = laplacian_pe(ei, ew, gm["idx"], g["n_windows"], self.n_slots[m], self.cfg.lap_pe_dim)
            add = add + self.pe_proj[m](pe.to(dtype))
        return h + add.unsqueeze(1)

    def forward(self, batch) -> ModelOutput:
        g = self._read(batch)
        n_windows = g["n_windows"]
        h = {m: self._embed(m, g[m], g) for m in MODALITIES}
        subject = batch.subject.view(-1)
        couplings, penalty = {}, 0.0
        for key, c in self.coupling.items():                                     # once per forward, all blocks
            couplings[key], p = c(subject)
            penalty = penalty + p
        idx = {m: in_slot_order(g[m]["idx"], n_windows, self.n_slots[m]) for m in MODALITIES}
        keep = {m: g[m]["mask"].to(h[m].dtype).view(-1, 1, 1) for m in MODALITIES}
        h_f, h_e = h["fmri"], h["eeg"]
        for block in self.blocks:
            h_f, h_e = block(h_f, h_e, couplings, idx, keep, n_windows)
        h = {"fmri": h_f, "eeg": h_e}

        out = ModelOutput(recon={}, forecast={}, latent={}, latent_forecast={},
                          forecast_std={} if self.cfg.probabilistic == "gaussian" else None,
                          penalty=self.cfg.coupling_l1 * penalty)
        s_steps = self.cfg.forecast_steps
        for m in MODALITIES:
            z = self.shared(self.norm_out[m](h[m]))                               # [N, L, H]
            n, steps, _ = z.shape
            out.latent[m] = z
            out.recon[m] = self.decoder[m](z).reshape(n, steps * self.step[m], 1)
            zf = self.predictor[m](z)                                             # [N, L, S, H]
            out.latent_forecast[m] = zf
            if m in self.linear_modalities:
                x = g[m]["x"][..., 0] * g[m]["mask"].to(g[m]["x"].dtype).unsqueeze(-1)   # [N, L * step]
                lin = self.linear[m](to_dense(x, idx[m], n_windows, self.n_slots[m]), subject)
                lin = from_dense(lin.flatten(2), idx[m], (steps, s_steps * self.step[m]))  # [N, L, S * step]
                lin = lin.to(zf.dtype)
                # A closed gate adds 0 x the correction: it is neither decoded nor back-propagated.
                out.forecast[m] = lin if self.gate[m].closed else self.gate[m](lin, self._decode_forecast(m, zf))
            else:
                last = g[m]["x"][:, self.step[m] - 1::self.step[m], 0][:, :steps]  # [N, L] input at end of step
                out.forecast[m] = self.anchor[m](self._decode_forecast(m, zf), last.to(zf.dtype).unsqueeze(-1))
            if out.forecast_std is not None:
                std = F.softplus(self.std_head[m](zf).float()) + 1e-3
                out.forecast_std[m] = std.reshape(n, steps, s_steps * self.step[m])
        return out

    def _decode_forecast(self, m: str, zf: Tensor) -> Tensor:
        """Latent forecasts ``[N, L, S, H]`` -> signal forecasts ``[N, L, S * step]``."""
        n, steps, s_steps = zf.shape[:3]
        return self.decoder[m](zf).reshape(n, steps, s_steps * self.step[m])


def build_model(cfg, n_subjects: int, n_sessions: int, n_fmri_slots: int, n_eeg_slots: int,
                samples_per_tr: int) -> TwinBrain:
    """Build :class:`TwinBrain` from a full ``Config`` (uses ``cfg.model``) or a ``ModelConfig``."""
    model_cfg = cfg.model if hasattr(cfg, "model") else cfg
    return TwinBrain(model_cfg, n_subjects=n_subjects, n_sessions=n_sessions, n_fmri_slots=n_fmri_slots,
                     n_eeg_slots=n_eeg_slots, samples_per_tr=samples_per_tr)
