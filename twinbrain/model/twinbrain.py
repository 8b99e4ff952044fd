"""TwinBrain: heterogeneous spatio-temporal graph model that reconstructs and forecasts EEG and fMRI.

Pipeline (shapes for one batch of windows; ``H`` = ``model.hidden``):

    fMRI x [N_f, T_f, 1] --Linear-->                     [N_f, T_f, H]   one latent step per TR
    EEG  x [N_e, T_e, 1] --causal patch embedding-->     [N_e, L_e, H]   L_e = T_e / eeg_stride
    + node-identity, subject and session embeddings (+ Laplacian PE), broadcast over time
    --> blocks: model.blocks x STBlock (causal conv, relation attention, EEG->fMRI per TR, causal attention)
    --> LayerNorm per modality --> shared Linear (the GradNorm layer) = latent[m] [N, L, H]
    recon:    decoder[m](latent)                              -> [N, T, 1]
    forecast: predictor (S future latents) -> graph propagation over the fc relation
              = latent_forecast[m] [N, L, S, H] -> decoder[m] -> forecast[m] [N, L, S * step]

See docs/ARCHITECTURE.md for the batch schema and the output contract.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinbrain.model.blocks import MODALITIES, STBlock
from twinbrain.model.layers import (CausalPatchEmbed, DynamicAdjacency, GraphPropagation, LatentPredictor,
                                    dense_index, laplacian_pe, normalized_adjacency)

FC = {"fmri": ("fmri", "fc", "fmri"), "eeg": ("eeg", "fc", "eeg")}
CROSS = ("eeg", "to", "fmri")
# Names contain "embed" / "session_affine": the trainer's optimizer groups match on those markers.
EMBEDDING_PREFIXES = ("subject_embed.", "session_embed.", "session_affine.")


@dataclass
class ModelOutput:
    """Outputs per modality ``m in ('fmri', 'eeg')`` (``L`` latent steps, ``S`` forecast steps):

    recon[m] ``[N, T, 1]`` on the input grid; forecast[m] ``[N, L, S * step]`` where entry ``[n, t, k]``
    predicts sample ``(t + 1) * step + k`` (``step`` = 1 for fMRI, ``eeg_stride`` for EEG);
    forecast_std[m] same shape, positive (only for ``probabilistic == 'gaussian'``, else None);
    latent[m] ``[N, L, H]``; latent_forecast[m] ``[N, L, S, H]`` predicting ``latent[m][:, t + 1 + s]``.
    """
    recon: dict[str, Tensor]
    forecast: dict[str, Tensor]
    latent: dict[str, Tensor]
    latent_forecast: dict[str, Tensor]
    forecast_std: dict[str, Tensor] | None = None


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
        self.step = {"fmri": 1, "eeg": cfg.eeg_stride}          # signal samples per latent step
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
        if cfg.dynamic_adjacency:
            self.dyn_adj = nn.ModuleDict({m: DynamicAdjacency(rows[m]) for m in MODALITIES})

        self.blocks = nn.ModuleList(
            STBlock(hid, cfg.heads, cfg.kernel_size, cfg.dropout, self.steps_per_tr, dilation=2 ** (i % 4),
                    temporal_attention=cfg.temporal_attention, dynamic_adjacency=cfg.dynamic_adjacency,
                    spectral_norm=cfg.spectral_norm)
            for i in range(cfg.blocks))

        self.norm_out = nn.ModuleDict({m: nn.LayerNorm(hid) for m in MODALITIES})
        self.shared = nn.Linear(hid, hid)   # last layer every loss term passes through (GradNorm)
        # One decoder per modality serves reconstruction and forecasting: a forecast latent for step
        # t+1+s is decoded exactly like the latent of step t+1+s.
        self.decoder = nn.ModuleDict({m: nn.Linear(hid, self.step[m]) for m in MODALITIES})
        self.predictor = nn.ModuleDict({m: LatentPredictor(hid, s_steps) for m in MODALITIES})
        self.propagate = nn.ModuleDict({m: GraphPropagation(hid, cfg.propagation_steps) for m in MODALITIES})
        # Persistence anchor: the forecast is a learned gain times the last observed sample of the step
        # plus the decoded prediction, so an untrained twin starts at persistence for the slow BOLD
        # signal (gain 1) and learns departures from it; oscillatory EEG starts without it (gain 0).
        self.anchor = nn.ParameterDict({"fmri": nn.Parameter(torch.ones(1)),   # 1-D: FSDP2 cannot shard scalars
                                        "eeg": nn.Parameter(torch.zeros(1))})
        if cfg.probabilistic == "gaussian":
            self.std_head = nn.ModuleDict({m: nn.Linear(hid, self.step[m]) for m in MODALITIES})

    # ------------------------------------------------------------ parameter groups for the trainer
    def shared_parameter(self) -> nn.Parameter:
        """Weight of the last layer shared by every loss term (for GradNorm gradient norms)."""
        return self.shared.weight

    def embedding_parameter_names(self) -> list[str]:
        """Names (relative to this module) of subject/session embeddings and the session affine layer."""
        return [n for n, _ in self.named_parameters() if n.startswith(EMBEDDING_PREFIXES)]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters that belong in the ``train.emb_lr`` group."""
        names = set(self.embedding_parameter_names())
        return [p for n, p in self.named_parameters() if n in names]

    def param_groups_spec(self) -> dict[str, list[str]]:
        """Every parameter name in exactly one group: ``embedding`` (subject/session embeddings and the
        session affine; use ``train.emb_lr``, no weight decay), ``no_decay`` (biases, norms, node-identity
        and step embeddings, attention edge scales) and ``default``.  Names are relative to the
        unwrapped model; wrappers (DDP ``module.``, checkpoint wrappers) add prefixes."""
        emb = set(self.embedding_parameter_names())
        groups: dict[str, list[str]] = {"embedding": [], "no_decay": [], "default": []}
        for name, p in self.named_parameters():
            if name in emb:
                groups["embedding"].append(name)
            elif p.dim() < 2 or "norm" in name or name.startswith(("node_emb.", "dyn_adj.")) or "step_emb" in name:
                groups["no_decay"].append(name)
            else:
                groups["default"].append(name)
        return groups

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
            mask = store.mask if "mask" in store else torch.ones(n, dtype=torch.bool, device=dev)
            node_id = store.node_id if "node_id" in store else torch.arange(n, device=dev)
            g[m] = {"x": x, "mask": mask.bool(), "node_id": node_id, "window": window,
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
        h = {m: self._embed(m, g[m], g) for m in MODALITIES}
        dyn = {m: (None, None) for m in MODALITIES}
        if self.cfg.dynamic_adjacency:
            dyn = {m: (self.dyn_adj[m](g[m]["idx"], g[m]["mask"], g["n_windows"]), g[m]["idx"])
                   for m in MODALITIES}
        edges = [t for rel in (FC["fmri"], FC["eeg"], CROSS) for t in g[rel]]
        h_f, h_e = h["fmri"], h["eeg"]
        for block in self.blocks:
            h_f, h_e = block(h_f, h_e, *edges, *dyn["fmri"], *dyn["eeg"])
        h = {"fmri": h_f, "eeg": h_e}

        out = ModelOutput(recon={}, forecast={}, latent={}, latent_forecast={},
                          forecast_std={} if self.cfg.probabilistic == "gaussian" else None)
        s_steps = self.cfg.forecast_steps
        for m in MODALITIES:
            z = self.shared(self.norm_out[m](h[m]))                               # [N, L, H]
            n, steps, _ = z.shape
            out.latent[m] = z
            out.recon[m] = self.decoder[m](z).reshape(n, steps * self.step[m], 1)
            zf = self.predictor[m](z)                                             # [N, L, S, H]
            if self.cfg.propagation_steps:
                ei, ew = g[FC[m]]
                zf = self.propagate[m](zf, normalized_adjacency(ei, ew, n))
            out.latent_forecast[m] = zf                                           # [N, L, S, H]
            fc = self.decoder[m](zf).reshape(n, steps, s_steps * self.step[m])
            last = g[m]["x"][:, self.step[m] - 1::self.step[m], 0][:, :steps]      # [N, L] input at end of step
            out.forecast[m] = fc + self.anchor[m].to(fc.dtype) * last.to(fc.dtype).unsqueeze(-1)
            if out.forecast_std is not None:
                std = F.softplus(self.std_head[m](zf).float()) + 1e-3
                out.forecast_std[m] = std.reshape(n, steps, s_steps * self.step[m])
        return out


def build_model(cfg, n_subjects: int, n_sessions: int, n_fmri_slots: int, n_eeg_slots: int,
                samples_per_tr: int) -> TwinBrain:
    """Build :class:`TwinBrain` from a full ``Config`` (uses ``cfg.model``) or a ``ModelConfig``."""
    model_cfg = cfg.model if hasattr(cfg, "model") else cfg
    return TwinBrain(model_cfg, n_subjects=n_subjects, n_sessions=n_sessions, n_fmri_slots=n_fmri_slots,
                     n_eeg_slots=n_eeg_slots, samples_per_tr=samples_per_tr)
