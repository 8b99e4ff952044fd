"""TwinBrain model: shapes, causality, batching, equivariance, empty relations, gradients, learning."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch_geometric.data import Batch

from tests.batches import make_batch, make_window, oscillator_signals, tiny_model_config
from twinbrain.config import ModelConfig, TrainConfig
from twinbrain.model import STBlock, build_model, loss_counts, loss_term_names, loss_terms, make_balancer, normalise
from twinbrain.model.coupling import Coupling
from twinbrain.schema import RELATIONS, relation_key

SPT, STRIDE, T_F, N_F, N_E = 4, 2, 8, 6, 4     # samples per TR, EEG stride, TRs, fMRI nodes, EEG channels


def tiny_cfg(**kw) -> ModelConfig:
    return tiny_model_config(**kw)


FULL = dict(probabilistic="gaussian", lap_pe_dim=3, session_affine=True)
SLOTS = {"fmri": N_F, "eeg": N_E}


def block_inputs(seed: int = 0):
    """Random signed couplings for every relation and the slot layout of one window (node i = slot i)."""
    g = torch.Generator().manual_seed(seed)
    couplings = {relation_key(r): torch.randn(SLOTS[r[2]], SLOTS[r[0]], generator=g) for r in RELATIONS}
    idx = {m: torch.arange(n) for m, n in SLOTS.items()}
    keep = {m: torch.ones(n, 1, 1) for m, n in SLOTS.items()}
    return couplings, idx, keep, 1
VARIANTS = {"plain": {}, "full": FULL, "no_attn_specnorm": dict(temporal_attention=False, spectral_norm=True),
            "local_attn": dict(attention_window=3)}   # 16 EEG steps: windowed path, last chunk padded


def make(cfg: ModelConfig, seed: int = 0, random_embeddings: bool = False):
    """Tiny model; ``random_embeddings`` replaces the zero-initialised subject/session embeddings and
    session affine (identity at start) so that tests can see whether they are applied per window."""
    torch.manual_seed(seed)
    model = build_model(cfg, n_subjects=3, n_sessions=3, n_fmri_slots=N_F, n_eeg_slots=N_E, samples_per_tr=SPT)
    if random_embeddings:
        for p in model.embedding_parameters():
            torch.nn.init.normal_(p, std=0.5)
        for g in model.gate.values():             # open the nonlinear correction (0 = pure linear core)
            torch.nn.init.constant_(g.weight, 0.5)
    return model


def outputs(out) -> dict[str, torch.Tensor]:
    """Flatten a ModelOutput into {name/modality: tensor}, every tensor with node axis 0, step axis 1."""
    flat = {}
    for field in ("recon", "forecast", "latent", "latent_forecast", "forecast_std"):
        for m, t in (getattr(out, field) or {}).items():
            flat[f"{field}/{m}"] = t
    return flat


def test_output_shapes_follow_contract():
    model = make(tiny_cfg(**FULL)).eval()
    out = model(make_batch(3, n_fmri=N_F, n_eeg=N_E, t_f=T_F, samples_per_tr=SPT))
    l_e, s = T_F * SPT // STRIDE, 2
    assert out.recon["fmri"].shape == (3 * N_F, T_F, 1)
    assert out.recon["eeg"].shape == (3 * N_E, T_F * SPT, 1)
    assert out.forecast["fmri"].shape == (3 * N_F, T_F, s)
    assert out.forecast["eeg"].shape == (3 * N_E, l_e, s * STRIDE)
    assert out.latent["eeg"].shape == (3 * N_E, l_e, 16)
    assert out.latent_forecast["fmri"].shape == (3 * N_F, T_F, s, 16)
    assert out.forecast_std["eeg"].shape == out.forecast["eeg"].shape
    assert (out.forecast_std["eeg"] > 0).all() and (out.forecast_std["fmri"] > 0).all()


def _perturbed(window, m: str, start: int):
    w = window.clone()
    w[m].x = w[m].x.clone()
    w[m].x[:, start:] += 5 * torch.randn_like(w[m].x[:, start:])
    return w


def _assert_prefix_equal(a: dict, b: dict, keep: dict[str, int]):
    """Outputs of modality m agree on latent steps < keep[m] (EEG recon: samples < keep * STRIDE)."""
    for name, ta in a.items():
        m = name.split("/")[1]
        n = keep[m] * (STRIDE if name == "recon/eeg" else 1)
        torch.testing.assert_close(ta[:, :n], b[name][:, :n], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_is_causal_in_both_modalities(variant):
    model = make(tiny_cfg(**VARIANTS[variant]), random_embeddings=True).eval()
    window = make_window(N_F, N_E, T_F, SPT, seed=1)
    with torch.no_grad():
        ref = outputs(model(window))
        for t0 in (0, 3, T_F - 2):
            # fMRI changed after TR t0: nothing at TR <= t0 moves (EEG steps inside TRs <= t0 neither).
            got = outputs(model(_perturbed(window, "fmri", t0 + 1)))
            _assert_prefix_equal(ref, got, {"fmri": t0 + 1, "eeg": (t0 + 1) * SPT // STRIDE})
            assert not torch.allclose(ref["recon/fmri"], got["recon/fmri"])   # the change did arrive
            # EEG changed from the first sample after TR t0 (reaches fMRI through eeg->fmri edges).
            got = outputs(model(_perturbed(window, "eeg", (t0 + 1) * SPT)))
            _assert_prefix_equal(ref, got, {"fmri": t0 + 1, "eeg": (t0 + 1) * SPT // STRIDE})
            assert not torch.allclose(ref["forecast/fmri"], got["forecast/fmri"])
        for k0 in (3, 9):   # EEG change inside a latent step / inside a TR
            got = outputs(model(_perturbed(window, "eeg", k0)))
            _assert_prefix_equal(ref, got, {"fmri": k0 // SPT, "eeg": k0 // STRIDE})


@pytest.mark.parametrize("t", [5, 12, 23])
@pytest.mark.parametrize("window", [1, 3, 5, 8])
def test_local_attention_equals_masked_full_attention(window, t):
    """Step ``i`` attends to steps ``i - window + 1 .. i`` exactly, including a padded last chunk."""
    from twinbrain.model.layers import local_causal_attention
    g = torch.Generator().manual_seed(window * 100 + t)
    q, k, v = (torch.randn(3, 2, t, 4, generator=g, requires_grad=True) for _ in range(3))
    i, j = torch.arange(t).view(-1, 1), torch.arange(t).view(1, -1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - window))
    got = local_causal_attention(q, k, v, window)
    torch.testing.assert_close(got, ref)
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    gg = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, b in zip(gg, gr):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window", [0, 4])
def test_cpu_bf16_attention_runs_in_fp32_and_keeps_its_dtype(window):
    """bf16 inputs on CPU: the fp32 result, rounded to bf16, under autocast too (the core leaves it)."""
    from twinbrain.model.layers import causal_attention
    g = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(2, 2, 10, 4, generator=g).bfloat16() for _ in range(3))
    ref = causal_attention(q.float(), k.float(), v.float(), window).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = causal_attention(q, k, v, window)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def _saved_bytes(fn, *args) -> int:
    """Bytes autograd keeps for backward of ``fn(*args)`` (each storage once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def test_gelu_linear_equals_linear_of_gelu_and_keeps_only_the_pre_activation():
    from twinbrain.model.layers import GeluLinear
    torch.manual_seed(0)
    lin = GeluLinear(32, 8).train()
    a = torch.randn(6, 10, 32, requires_grad=True)
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(a), lin.weight, lin.bias)
    got = lin(a)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    for x, y in zip(torch.autograd.grad(got, (a, lin.weight, lin.bias), g),
                    torch.autograd.grad(ref, (a, lin.weight, lin.bias), g)):
        torch.testing.assert_close(x, y)
    weights = sum(t.numel() * 4 for t in (lin.weight, lin.bias))
    assert _saved_bytes(lin, a) == a.numel() * 4 + weights       # not gelu(a) as well
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(a)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("layer", ["norm_linear", "norm_linear_pooled", "conv"])
def test_pre_norm_layers_equal_their_composition_and_keep_only_the_input(layer):
    """NormLinear = linear(layer_norm(x)), CausalConv = gelu(conv(left_pad(layer_norm(x)))): the same values
    and gradients as the unfused layers, keeping the input and two row statistics for backward (and the
    conv's output for gelu's derivative), not the norm's output or its padded copy."""
    from twinbrain.model.layers import CausalConv, NormLinear
    F = torch.nn.functional
    torch.manual_seed(0)
    mod = {"norm_linear": lambda: NormLinear(16, 24), "norm_linear_pooled": lambda: NormLinear(16, 24, pool=3),
           "conv": lambda: CausalConv(16, 3, dilation=2)}[layer]()
    with torch.no_grad():
        mod.norm_weight.normal_()
        mod.norm_bias.normal_()
    x = torch.randn(5, 12, 16, requires_grad=True)

    def reference(x):
        y = F.layer_norm(x, (16,), mod.norm_weight, mod.norm_bias, mod.eps)
        if layer == "norm_linear":
            return F.linear(y, mod.weight, mod.bias)
        if layer == "norm_linear_pooled":                   # the mean of each run of 3 steps, then the projection
            return F.linear(y.view(5, 4, 3, 16).mean(2), mod.weight, mod.bias)
        return F.gelu(F.conv1d(F.pad(y.transpose(1, 2), (4, 0)), mod.weight, mod.bias, dilation=2)).transpose(1, 2)
    got, ref = mod.train()(x), reference(x)
    torch.testing.assert_close(got, ref)
    params = (x, mod.norm_weight, mod.norm_bias, mod.weight, mod.bias)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)
    weights = sum(p.numel() * 4 for p in params[1:])
    kept = x.numel() * 4 + 2 * 5 * 12 * 4 + weights                        # x, mean, rstd (not the norm)
    assert _saved_bytes(mod, x) == kept + (x.numel() * 4 if layer == "conv" else 0)   # + the conv's output
    torch.testing.assert_close(mod.eval()(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod.train()(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and mod.weight.grad.dtype == mod.norm_weight.grad.dtype == torch.float32


def test_block_loads_a_checkpoint_with_the_pre_norms_as_separate_modules():
    """Runs saved before the pre-norms moved into CausalConv / NormLinear name them norm_conv, norm_attn,
    norm_ff, norm_space (one per source, shared by its relations) and the kernel conv.{m}.conv; such a state
    dict loads strictly and gives the same block."""
    torch.manual_seed(0)
    block = STBlock(16, 2, 3, 0.0, SPT // STRIDE, SLOTS).eval()
    with torch.no_grad():                 # the old layout had one spatial norm per source modality
        for m in ("fmri", "eeg"):
            gamma, beta = torch.randn(16), torch.randn(16)
            for r in RELATIONS:
                if r[0] == m:
                    block.value[relation_key(r)].norm_weight.copy_(gamma)
                    block.value[relation_key(r)].norm_bias.copy_(beta)

    def old_name(key: str) -> str:
        for m in ("fmri", "eeg"):
            for new, before in ((f"conv.{m}.norm_", f"norm_conv.{m}."), (f"attn.{m}.qkv.norm_", f"norm_attn.{m}."),
                                (f"ff.{m}.fc1.norm_", f"norm_ff.{m}."), (f"conv.{m}.", f"conv.{m}.conv.")):
                if key.startswith(new):
                    return before + key[len(new):]
        for r in RELATIONS:
            if key.startswith(f"value.{relation_key(r)}.norm_"):
                return f"norm_space.{r[0]}." + key.rsplit("norm_", 1)[1]
        return key
    old = {old_name(k): v for k, v in block.state_dict().items()}
    assert {"norm_attn.eeg.weight", "conv.fmri.conv.weight", "norm_conv.eeg.bias", "norm_space.eeg.weight"} <= set(old)
    fresh = STBlock(16, 2, 3, 0.0, SPT // STRIDE, SLOTS).eval()
    fresh.load_state_dict(old)
    h_f, h_e = torch.randn(N_F, T_F, 16), torch.randn(N_E, T_F * SPT // STRIDE, 16)
    for a, b in zip(block(h_f, h_e, *block_inputs(2)), fresh(h_f, h_e, *block_inputs(2))):
        torch.testing.assert_close(a, b)


def test_dropout_add_is_inverted_dropout_with_a_boolean_mask():
    from twinbrain.model.layers import dropout_add
    base = torch.randn(40, 50, 16, requires_grad=True)
    x = torch.randn(40, 50, 16, requires_grad=True)
    torch.manual_seed(3)
    y = dropout_add(base, x, 0.25, True)
    kept = (y - base).detach().ne(0)
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close((y - base)[kept], x[kept] / 0.75)
    gb, gx = torch.autograd.grad(y, (base, x), torch.ones_like(y))
    torch.testing.assert_close(gb, torch.ones_like(gb))
    torch.testing.assert_close(gx, kept.float() / 0.75)
    assert _saved_bytes(lambda: dropout_add(base, x, 0.25, True)) == x.numel()      # one byte per element
    torch.manual_seed(3)
    torch.testing.assert_close(dropout_add(base, x, 0.25, True), y)                  # replayable from the seed
    torch.testing.assert_close(dropout_add(base, x, 0.25, False), base + x)


def test_every_block_is_causal():
    torch.manual_seed(0)
    hid, l_e = 16, T_F * SPT // STRIDE
    block = STBlock(hid, 2, 3, 0.0, SPT // STRIDE, SLOTS, dilation=2).eval()
    edges = block_inputs(2)
    h_f, h_e = torch.randn(N_F, T_F, hid), torch.randn(N_E, l_e, hid)
    ref_f, ref_e = block(h_f, h_e, *edges)
    r = SPT // STRIDE
    for t0 in range(T_F - 1):
        hf2 = h_f.clone()
        hf2[:, t0 + 1:] += torch.randn_like(hf2[:, t0 + 1:])
        he2 = h_e.clone()
        he2[:, (t0 + 1) * r:] += torch.randn_like(he2[:, (t0 + 1) * r:])
        out_f, out_e = block(hf2, he2, *edges)
        torch.testing.assert_close(out_f[:, :t0 + 1], ref_f[:, :t0 + 1])
        torch.testing.assert_close(out_e[:, :(t0 + 1) * r], ref_e[:, :(t0 + 1) * r])


def test_block_under_activation_checkpointing_matches():
    torch.manual_seed(0)
    block = STBlock(16, 2, 3, 0.2, SPT // STRIDE, SLOTS)      # dropout on: the recompute replays its masks
    edges = block_inputs(3)
    h_f = torch.randn(N_F, T_F, 16, requires_grad=True)
    h_e = torch.randn(N_E, T_F * SPT // STRIDE, 16, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        block.zero_grad()
        torch.manual_seed(1)
        fn = (lambda *a: torch.utils.checkpoint.checkpoint(block, *a, use_reentrant=False)) if ckpt else block
        out_f, out_e = fn(h_f, h_e, *edges)
        (out_f.square().sum() + out_e.square().sum()).backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", ["plain", "full", "local_attn"])
def test_batched_forward_equals_per_window(variant):
    model = make(tiny_cfg(**VARIANTS[variant]), random_embeddings=True).eval()
    windows = [make_window(N_F, N_E, T_F, SPT, subject=i, session=2 - i, seed=10 + i, masked_fmri=(i,))
               for i in range(3)]
    with torch.no_grad():
        batched = outputs(model(Batch.from_data_list(windows)))
        for i, w in enumerate(windows):
            single = outputs(model(w))
            for name, t in single.items():
                n = t.shape[0]
                torch.testing.assert_close(batched[name][i * n:(i + 1) * n], t, atol=1e-5, rtol=1e-4, msg=name)


def _permute(window, perms: dict[str, torch.Tensor]):
    """Reorder nodes: new node i is old node perm[i]; node tensors and edges follow."""
    w = window.clone()
    for m, p in perms.items():
        for key in ("x", "y", "mask", "node_id", "pos"):
            w[m][key] = window[m][key][p]
    inv = {m: torch.argsort(p) for m, p in perms.items()}
    for rel in window.edge_types:
        src, _, dst = rel
        ei = window[rel].edge_index
        w[rel].edge_index = torch.stack([inv[src][ei[0]], inv[dst][ei[1]]])
    return w


@pytest.mark.parametrize("variant", ["plain", "full"])
def test_permutation_equivariance(variant):
    model = make(tiny_cfg(**VARIANTS[variant]), random_embeddings=True).eval()
    window = make_window(N_F, N_E, T_F, SPT, seed=4, masked_eeg=(1,))
    perms = {"fmri": torch.randperm(N_F, generator=torch.Generator().manual_seed(0)),
             "eeg": torch.randperm(N_E, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        ref = outputs(model(window))
        got = outputs(model(_permute(window, perms)))
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t[perms[name.split("/")[1]]], atol=1e-5, rtol=1e-4, msg=name)


def test_cross_modal_messages_keep_destination_shape():
    torch.manual_seed(0)
    for n_t, n_s in ((5, 7), (9, 3), (0, 4), (4, 0)):
        c = Coupling(n_t, n_s, n_subjects=3, rank=2, self_relation=False)
        personal, penalty = c(torch.tensor([0, 2]))
        assert personal.shape == (2, n_t, n_s) and c.matrix().shape == (n_t, n_s) and penalty.dim() == 0
    model = make(tiny_cfg()).eval()
    for n_cross in (0, 3, 20):   # more cross edges than fMRI nodes
        out = model(make_window(N_F, N_E, T_F, SPT, n_edges_cross=n_cross))
        assert out.recon["fmri"].shape == (N_F, T_F, 1) and out.forecast["fmri"].shape == (N_F, T_F, 2)


def test_coupling_is_signed_directed_without_self_term_and_personal():
    torch.manual_seed(0)
    c = Coupling(5, 5, n_subjects=3, rank=2, self_relation=True)
    pop = c.matrix()
    assert (pop.diagonal() == 0).all() and (pop < 0).any() and (pop > 0).any()
    assert not torch.allclose(pop, pop.t())                          # directed: C[i, j] != C[j, i]
    per, _ = c(torch.tensor([0, 1]))
    torch.testing.assert_close(per[0], pop)                          # deltas start at zero
    with torch.no_grad():
        c.u[1].normal_()
    per, _ = c(torch.tensor([0, 1]))
    torch.testing.assert_close(per[0], pop)
    assert not torch.allclose(per[1], pop) and (per[1].diagonal() == 0).all()


def test_spatial_messages_follow_the_coupling():
    """Zeroing C[target, source] of a relation cuts exactly that influence: the target's output no longer
    depends on the source's input, while other targets still do."""
    torch.manual_seed(0)
    block = STBlock(16, 2, 3, 0.0, SPT // STRIDE, SLOTS).eval()
    couplings, idx, keep, nw = block_inputs(7)
    l_e = T_F * SPT // STRIDE
    h_f, h_e = torch.randn(N_F, T_F, 16), torch.randn(N_E, l_e, 16)
    for key in couplings:                     # only fMRI slot 0 -> fMRI slot 1 (and 2) remain
        couplings[key] = torch.zeros_like(couplings[key])
    couplings["fmri__fc__fmri"][1, 0] = 1.0
    couplings["fmri__fc__fmri"][2, 0] = -1.0
    ref_f, ref_e = block(h_f, h_e, couplings, idx, keep, nw)
    h2 = h_f.clone()
    h2[0] += torch.randn_like(h2[0])            # (a constant shift would vanish in LayerNorm)
    out_f, out_e = block(h2, h_e, couplings, idx, keep, nw)
    changed = (out_f - ref_f).abs().amax(dim=(1, 2)) > 1e-6
    assert changed.tolist() == [True, True, True, False, False, False]
    torch.testing.assert_close(out_e, ref_e)                          # no fMRI -> EEG coupling left
    couplings["fmri__to__eeg"][3, 0] = 1.0                            # now fMRI 0 drives EEG 3
    ref_f, ref_e = block(h_f, h_e, couplings, idx, keep, nw)
    out_f, out_e = block(h2, h_e, couplings, idx, keep, nw)
    assert ((out_e - ref_e).abs().amax(dim=(1, 2)) > 1e-6).tolist() == [False, False, False, True]


def _all_grads(model, balancer):
    named = list(model.named_parameters()) + [(f"balancer.{n}", p) for n, p in balancer.named_parameters()]
    missing = [n for n, p in named if p.grad is None]
    zero = [n for n, p in named if p.grad is not None and not p.grad.abs().sum() > 0]
    return missing, zero


@pytest.mark.parametrize("variant", ["full", "no_attn_specnorm"])
def test_gradients_reach_every_parameter(variant):
    cfg, tc = tiny_cfg(**VARIANTS[variant]), TrainConfig(balancer="uncertainty")
    model = make(cfg, random_embeddings=True)      # zero-initialised deltas would hide the shared basis' gradient
    balancer = make_balancer(tc, loss_term_names())
    batch = make_batch(2, n_fmri=N_F, n_eeg=N_E, t_f=T_F, samples_per_tr=SPT)
    losses = normalise(loss_terms(batch, model(batch), tc, cfg), loss_counts(batch, tc, cfg))
    balancer(losses).backward()
    missing, zero = _all_grads(model, balancer)
    assert not missing and not zero, (missing, zero)


def test_empty_relations_run_and_touch_every_parameter():
    cfg, tc = tiny_cfg(**FULL), TrainConfig(balancer="none")
    model = make(cfg)
    batch = make_batch(2, n_fmri=N_F, n_eeg=N_E, t_f=T_F, samples_per_tr=SPT, n_edges_eeg=0, n_edges_cross=0)
    assert batch["eeg", "to", "fmri"].edge_index.shape == (2, 0)
    out = model(batch)
    assert all(torch.isfinite(t).all() for t in outputs(out).values())
    losses = normalise(loss_terms(batch, out, tc, cfg), loss_counts(batch, tc, cfg))
    make_balancer(tc, loss_term_names())(losses).backward()
    assert all(p.grad is not None for p in model.parameters())   # DDP needs no find_unused_parameters


def test_missing_relation_is_treated_as_empty():
    model = make(tiny_cfg()).eval()
    w = make_window(N_F, N_E, T_F, SPT)
    del w["eeg", "to", "fmri"]
    assert model(w).recon["fmri"].shape == (N_F, T_F, 1)


def test_bf16_autocast_and_bf16_parameters():
    cfg = tiny_cfg(**FULL)
    model = make(cfg)
    batch = make_batch(2, n_fmri=N_F, n_eeg=N_E, t_f=T_F, samples_per_tr=SPT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        terms = loss_terms(batch, out, TrainConfig(), cfg)
    assert all(torch.isfinite(s) and s.dtype == torch.float32 for s, _ in terms.values())
    out = model.to(torch.bfloat16)(batch)          # bf16 parameters (FSDP2 / DeepSpeed mixed precision)
    assert out.recon["eeg"].dtype == torch.bfloat16 and torch.isfinite(out.forecast["fmri"].float()).all()


def test_mismatched_window_lengths_fail_clearly():
    model = make(tiny_cfg())
    w = make_window(N_F, N_E, T_F, SPT)
    w["eeg"].x = w["eeg"].x[:, :-STRIDE]
    with pytest.raises(ValueError, match="same"):
        model(w)


def _train(model, cfg, tc, batch, steps, lr=3e-3):
    balancer = make_balancer(tc, loss_term_names())
    opt = torch.optim.Adam(list(model.parameters()) + list(balancer.parameters()), lr=lr)
    counts = loss_counts(batch, tc, cfg)
    history = []
    for _ in range(steps):
        losses = normalise(loss_terms(batch, model(batch), tc, cfg), counts)
        opt.zero_grad()
        balancer(losses).backward()
        opt.step()
        history.append(float((losses["fmri_recon"] + losses["eeg_recon"]
                              + losses["fmri_forecast"] + losses["eeg_forecast"]).detach()))
    return history


def test_overfits_one_small_batch():
    cfg, tc = tiny_cfg(hidden=32, forecast_steps=1), TrainConfig(balancer="none", loss="mse")
    model = make(cfg)
    batch = make_batch(2, n_fmri=N_F, n_eeg=N_E, t_f=T_F, samples_per_tr=SPT)
    hist = _train(model, cfg, tc, batch, steps=100, lr=3e-3)
    assert hist[-1] < hist[0] / 20, (hist[0], hist[-1])


def test_learns_linear_dynamics_better_than_persistence():
    cfg = tiny_cfg(hidden=32, forecast_steps=2)
    tc = TrainConfig(balancer="none", loss="mse", corr_weight=0.0)
    t_f = 24

    def windows(seeds):
        return Batch.from_data_list([make_window(N_F, N_E, t_f, SPT, seed=s, subject=0, session=0,
                                                 signals=oscillator_signals(N_F, N_E, t_f, SPT, seed=s))
                                     for s in seeds])
    train, test = windows(range(6)), windows(range(100, 103))
    model = make(cfg)
    _train(model, cfg, tc, train, steps=100, lr=5e-3)
    model.eval()
    with torch.no_grad():
        out = model(test)
    for m, step in (("fmri", 1), ("eeg", STRIDE)):
        y = test[m].y[..., 0]
        pred = out.forecast[m][:, :-2, 0]                   # horizon 1: sample (t+1)*step
        target = y[:, step::step][:, :-1]
        last = y[:, step - 1::step][:, :-2]                 # persistence: last seen sample
        mse_model = (pred - target).square().mean()
        mse_persist = (last - target).square().mean()
        assert mse_model < 0.5 * mse_persist, (m, float(mse_model), float(mse_persist))


def test_spectral_norm_bounds_linears_and_survives_checkpointing():
    torch.manual_seed(0)
    block = STBlock(16, 2, 3, 0.0, SPT // STRIDE, SLOTS, spectral_norm=True)
    edges = block_inputs(5)
    h_f, h_e = torch.randn(N_F, T_F, 16), torch.randn(N_E, T_F * SPT // STRIDE, 16)
    for _ in range(30):                              # power iterations converge during training forwards
        block(h_f, h_e, *edges)
    sigma = torch.linalg.matrix_norm(block.ff["fmri"].fc1.weight.detach(), ord=2)
    assert float(sigma) == pytest.approx(1.0, abs=0.05)
    out_f, out_e = torch.utils.checkpoint.checkpoint(block, h_f, h_e, *edges, use_reentrant=False)
    (out_f.sum() + out_e.sum()).backward()           # buffer updates in the recompute do not break autograd
    assert block.ff["fmri"].fc1.parametrizations.weight.original.grad is not None


def test_optimizer_groups_come_from_the_model():
    """Every parameter lands in the group the model declares, with that group's decay and lr — also
    behind activation-checkpoint wrappers (the trainer wraps blocks before building the optimizer)."""
    from twinbrain.train.optim import param_groups
    from twinbrain.train.parallel import apply_activation_checkpointing
    model = make(tiny_cfg(**FULL))
    spec = model.param_groups_spec()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(sum(spec.values(), [])) == sorted(names)
    assert {"subject_embed.weight", "session_embed.weight"} <= set(spec["embedding"])
    assert any(n.startswith("session_affine.gain") for n in spec["embedding"])
    assert any(n.startswith("coupling.") and n.endswith(".u") for n in spec["embedding"])
    for n in ("node_emb.fmri.weight", "predictor.fmri.step_emb", "coupling.fmri__fc__fmri.weight"):
        assert n in spec["no_decay"], n
    assert spec["core"] == [f"linear.{m}.{p}" for m in ("fmri", "eeg") for p in ("coef", "intercept")]
    assert spec["gate"] == ["gate.fmri.weight", "gate.eeg.weight"]
    tc = TrainConfig(weight_decay=0.01, lr=1e-3, emb_lr=3e-3, core_lr_scale=0.1, gate_lr_scale=0.5)
    apply_activation_checkpointing(model.blocks, "full", 1)
    groups = {g["name"]: g for g in param_groups(model, tc)}
    named = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in model.named_parameters()}
    want = {"default": ("decay", 0.01, 1e-3), "no_decay": ("no_decay", 0.0, 1e-3), "embedding": ("embeddings", 0.0, 3e-3),
            "core": ("core", 0.0, 1e-4), "gate": ("gate", 0.0, 5e-4)}
    for spec_name, members in spec.items():
        group, decay, lr = want[spec_name]
        ids = {id(p) for p in groups[group]["params"]}
        assert all(id(named[n]) in ids for n in members), spec_name
        assert groups[group]["weight_decay"] == decay and groups[group]["lr"] == pytest.approx(lr)
    assert sum(len(g["params"]) for g in groups.values()) == len(names)
    assert len(model.embedding_parameters()) == len(spec["embedding"])
    # At scale 1 the gate joins no_decay (same lr and decay), the layout of runs saved before the gate group,
    # so their optimizer state loads into the same groups on resume.
    legacy = {g["name"]: g for g in param_groups(model, dataclasses.replace(tc, gate_lr_scale=1.0))}
    assert "gate" not in legacy and any(p is named["gate.fmri.weight"] for p in legacy["no_decay"]["params"])
    assert any(p is model.shared_parameter() for p in model.parameters())
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2


def test_lr_zero_groups_are_frozen_and_a_closed_gate_skips_the_correction():
    """The trainer freezes the groups trained at lr 0 (``train.core_lr_scale`` / ``gate_lr_scale`` 0, the
    defaults): backward computes nothing for them, the optimizer still lists them (one saved layout), and a
    frozen gate at 0 is closed: the same outputs without decoding the nonlinear forecast correction. A gate
    that is open refuses to close."""
    from twinbrain.train.optim import fixed_groups, param_groups
    cfg, tc = tiny_cfg(**FULL), TrainConfig(balancer="none")
    assert fixed_groups(tc) == ("core", "gate") and fixed_groups(dataclasses.replace(tc, core_lr_scale=0.1)) == ("gate",)
    model = make(cfg)
    batch = make_batch(2, n_fmri=N_F, n_eeg=N_E, t_f=T_F, samples_per_tr=SPT)
    decoded = []
    model.decoder["eeg"].register_forward_hook(lambda mod, args, out: decoded.append(args[0].dim()))
    before = outputs(model(batch))
    assert decoded == [3, 4]                                 # reconstruction [N, L, H], forecasts [N, L, S, H]
    frozen = model.freeze(fixed_groups(tc))
    spec = model.param_groups_spec()
    assert sorted(frozen) == sorted(spec["core"] + spec["gate"]) and all(g.closed for g in model.gate.values())
    decoded.clear()
    out = model(batch)
    assert decoded == [3]
    for k, v in outputs(out).items():
        torch.testing.assert_close(v, before[k])
    losses = normalise(loss_terms(batch, out, tc, cfg), loss_counts(batch, tc, cfg))
    make_balancer(tc, loss_term_names())(losses).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == frozen
    assert sum(len(g["params"]) for g in param_groups(model, tc)) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="cannot close a gate of weight"):
        make(cfg, random_embeddings=True).freeze(("gate",))


def test_build_model_accepts_full_config():
    from twinbrain.config import Config
    cfg = Config()
    cfg.model = dataclasses.replace(tiny_cfg())
    model = build_model(cfg, 2, 2, N_F, N_E, SPT)
    assert model.cfg.hidden == 16
    with pytest.raises(ValueError, match="eeg_stride"):
        build_model(tiny_cfg(eeg_stride=3, eeg_patch=3), 2, 2, N_F, N_E, SPT)


def test_relation_layers_come_from_the_config_choice():
    """model.spatial_layer picks each relation's layer (model/relations.py); the default keeps the
    parameter names every checkpoint holds."""
    from twinbrain.config import CHOICES
    from twinbrain.model.relations import SPATIAL_LAYERS
    assert tuple(SPATIAL_LAYERS) == CHOICES["model.spatial_layer"]
    model = make(tiny_cfg())
    assert all(isinstance(model.coupling[relation_key(r)], Coupling) for r in RELATIONS)
    names = {k for k in model.state_dict() if k.startswith("coupling.")}
    assert names == {f"coupling.{relation_key(r)}.{p}" for r in RELATIONS for p in ("weight", "u", "v", "penalty_weight")}
    with pytest.raises(ValueError, match="model.spatial_layer 'gat'"):
        make(tiny_cfg(spatial_layer="gat"))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_coupling_penalty_is_prior_weighted_l1_carried_by_the_output():
    """The sparsity term travels on the model output (computed inside each Coupling's forward, where ZeRO-3
    has the parameters gathered); a prior of 1 on an entry removes its penalty, the diagonal never counts."""
    cfg = tiny_cfg(coupling_l1=0.5)
    model = make(cfg).eval()
    window = make_window(N_F, N_E, T_F, SPT, seed=3)

    def expected():
        total = 0.0
        for c in model.coupling.values():
            total = total + (c.weight.abs() * c.keep * c.penalty_weight).mean()
        return 0.5 * total

    out = model(window)
    torch.testing.assert_close(out.penalty, expected())
    key = relation_key(RELATIONS[0])
    m_t, m_s = model.coupling[key].n_target, model.coupling[key].n_source
    model.set_prior(key, torch.ones(m_t, m_s))
    lowered = model(window).penalty
    torch.testing.assert_close(lowered, expected())
    assert lowered < out.penalty
    lowered.backward()
    assert model.coupling[relation_key(RELATIONS[1])].weight.grad.abs().sum() > 0
