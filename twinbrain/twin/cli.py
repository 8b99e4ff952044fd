"""``twinbrain twin VERB --checkpoint P ...``: ask a trained twin and write arrays, JSON and figures.

Verbs (every one takes ``--checkpoint``, ``--out DIR`` (default ``RUN/twin/<verb>``), ``--device``,
``--subject``, ``--split``, ``--window``, ``--windows 0,3,7`` (ids among the selected windows),
``--progress``, and ``--data.KEY VALUE`` for where the training cohort is now (location keys only:
the cohort is rebuilt from the checkpoint's saved config, or from the cohort recorded in its run, and
must match the checkpoint's fingerprint)):

    forecast     [--steps S]                                   forecast_<m>.npy, forecast.json, forecast.png
    perturb      --targets 0,5|NAME [--amplitude A] [--duration D] [--onset O] [--modality M] [--num-steps N]
                                                               {baseline,perturbed,delta}_<m>.npy, perturb.json,
                                                               response.png, brain.png
    ec           [--method perturbation|jacobian|coupling|linear] [--modality M] [--amplitude A] [--absolute]
                 [--horizon H] [--max-windows W] (progress bar)  ec.npy, ec.json (node names), ec.png
                 perturbation: Δforecast per unit stimulus; jacobian: its small-amplitude limit (autodiff);
                 coupling: the learned latent coupling C; linear: the linear core's lag-1 matrix (fMRI);
                 the last two read the model (no windows; --subject gives that subject's personal matrix)
    personalize  --subject ID [--steps] [--lr] [--adapt-fraction] [--section.key VALUE ...]
                 ID: a held-out (val/test) subject of the cohort (its never-trained rows are fitted), or
                 a new subject whose data the overrides describe (e.g. --sim.n_subjects 9 for simulated
                 subject 09, or --data.bids_root DIR)   model.pt, personalize.json (warns if the
                 held-out forecast got worse)
``--modality`` defaults to fMRI, or EEG for an EEG-only twin.
    attribute    --target NODE [--modality M] [--horizon H] [--method grad_x_input|integrated_gradients]
                 [--ig-steps K] [--at-step T]                  attr_<m>.npy, attribute.json, attribute.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from twinbrain.config import ConfigError, config_from_dict, deep_update, parse_overrides
from twinbrain.schema import MODALITIES
from twinbrain.twin.loader import CheckpointError

VERBS = ("forecast", "perturb", "ec", "personalize", "attribute")
# ``--method`` is shared by two verbs; each has its own choices and default (first entry).
METHODS = {"ec": ("perturbation", "jacobian", "coupling", "linear"),
           "attribute": ("grad_x_input", "integrated_gradients")}


def _parser() -> argparse.ArgumentParser:
    from twinbrain.config_help import config_help
    p = argparse.ArgumentParser(prog="twinbrain twin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=config_help(("data", "sim"), title="config fields personalize may override "
                                                   "(the new subject's data; the model is fixed by the checkpoint)"))
    p.add_argument("verb", choices=VERBS)
    p.add_argument("--checkpoint", required=True, help="export: RUN/best/model.pt (or RUN, RUN/best)")
    p.add_argument("--out", help="output folder (default RUN/twin/<verb>)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--subject", help="subject id (personalize: the NEW subject)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--window", type=int, default=0, help="index of the window among the selected ones")
    p.add_argument("--windows", help="comma-separated window ids of the split to use (ec: averaged over them)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "off"],
                   help="progress bars on stderr (auto: on a terminal)")
    p.add_argument("--steps", type=int, help="forecast steps (forecast) / optimisation steps (personalize)")
    p.add_argument("--modality", choices=list(MODALITIES), help="default: fmri, or eeg for an EEG-only twin")
    p.add_argument("--targets", help="comma-separated node slots or names to stimulate")
    p.add_argument("--amplitude", type=float, default=1.0, help="stimulus, z-units of the node's signal")
    p.add_argument("--duration", type=int, default=1, help="stimulus length in input steps (TRs / samples)")
    p.add_argument("--onset", type=int, help="first stimulated input step (default: T - duration)")
    p.add_argument("--num-steps", type=int, help="perturb: forecast steps (> S rolls out)")
    p.add_argument("--horizon", type=int, default=1, help="ec: steps averaged; attribute: step explained")
    p.add_argument("--absolute", action="store_true", help="ec: |EC| instead of signed")
    p.add_argument("--max-windows", type=int, default=16, help="ec: windows averaged (0 = all)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--adapt-fraction", type=float, default=0.5)
    p.add_argument("--target", help="attribute: node slot or name")
    p.add_argument("--method", help="ec: " + "|".join(METHODS["ec"]) + " (default perturbation); attribute: "
                   + "|".join(METHODS["attribute"]) + " (default grad_x_input)")
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--at-step", type=int, help="attribute: latent step the forecast is made at (default last)")
    return p


def _out_dir(args, twin) -> Path:
    if args.out:
        out = Path(args.out)
    else:
        out = Path(twin.path).resolve().parent.parent / "twin" / args.verb
    out.mkdir(parents=True, exist_ok=True)
    return out


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _ids(args) -> list[int] | None:
    if not args.windows:
        return None
    try:
        return [int(x) for x in args.windows.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--windows {args.windows!r}: give comma-separated window ids, e.g. 0,3,7") from None


def _window(twin, args):
    ws = twin.windows(subject=args.subject, split=args.split, ids=_ids(args))
    if not 0 <= args.window < len(ws):
        raise ValueError(f"--window {args.window}: split '{args.split}' has {len(ws)} windows")
    return ws[args.window]


def _progress(args) -> bool:
    return args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())


def _method(args) -> str:
    """``--method`` of the verb: its default when not given; a method of another verb is an error."""
    choices = METHODS[args.verb]
    if args.method is None:
        return choices[0]
    if args.method not in choices:
        raise ValueError(f"--method {args.method!r} is not a method of '{args.verb}'; choose one of "
                         f"{', '.join(choices)}")
    return args.method


def ec_in_chunks(twin, windows, *, modality: str, amplitude: float, signed: bool, horizon: int,
                 progress: bool, chunk: int = 4, method: str = "perturbation") -> np.ndarray:
    """:meth:`Twin.effective_connectivity` over ``windows`` in chunks, with a progress bar: each chunk's
    mean is weighted by its count of windows in which both nodes are present, which gives exactly the
    mean over all windows."""
    from tqdm.auto import tqdm
    n = twin.n_nodes(modality)
    acc, cnt = np.zeros((n, n)), np.zeros((n, n))
    with tqdm(total=len(windows), desc="ec", unit="window", disable=not progress) as bar:
        for a in range(0, len(windows), chunk):
            part = [windows[k] for k in range(a, min(len(windows), a + chunk))]
            ec = twin.effective_connectivity(part, modality=modality, amplitude=amplitude, signed=True,
                                             horizon=horizon, method=method)
            masks = np.stack([w[modality].mask.numpy().astype(float) for w in part])      # [W, N]
            c = masks.T @ masks                                                            # [N, N]
            acc += np.nan_to_num(ec) * c
            cnt += c
            bar.update(len(part))
    out = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
    return out if signed else np.abs(out)


def _forecast(twin, args, out: Path) -> str:
    from twinbrain.twin.plots import plot_forecast
    w = _window(twin, args)
    f = twin.forecast(w, args.steps)
    for k in ("fmri", "eeg", "fmri_std", "eeg_std"):
        if k in f:
            np.save(out / f"forecast_{k}.npy", f[k])
    _dump(out / "forecast.json", {"subject": args.subject, "split": args.split, "window": args.window,
                                  "steps": f["steps"], "tr": f["tr"], "eeg_sfreq": f["eeg_sfreq"], "units": "z",
                                  "shapes": {k: list(f[k].shape) for k in MODALITIES},
                                  "region_names": twin.node_names("fmri"), "channel_names": twin.node_names("eeg")})
    m = args.modality
    plot_forecast(w[m].x[..., 0].numpy(), f[m], out / "forecast.png", twin.sample_period_s(m), std=f.get(f"{m}_std"),
                  names=twin.node_names(m), title=f"{'fMRI' if m == 'fmri' else 'EEG'} forecast (z)")
    return f"forecast of {f['steps']} steps: fMRI {f['fmri'].shape}, EEG {f['eeg'].shape} -> {out}"


def _perturb(twin, args, out: Path) -> str:
    from twinbrain.twin.plots import plot_brain, plot_response
    if not args.targets:
        raise ValueError("perturb needs --targets (comma-separated slots or names)")
    w = _window(twin, args)
    res = twin.perturb(w, args.targets.split(","), amplitude=args.amplitude, duration_steps=args.duration,
                       onset=args.onset, modality=args.modality, num_steps=args.num_steps)
    for kind in ("baseline", "perturbed", "delta"):
        for m, arr in res[kind].items():
            np.save(out / f"{kind}_{m}.npy", arr)
    d = res["delta"][args.modality]
    peak = np.abs(d).max(1)
    top = [int(i) for i in np.argsort(-peak, kind="stable")[:5]]
    names = twin.node_names(args.modality)
    info = {k: v for k, v in res.items() if k not in ("baseline", "perturbed", "delta")}
    info["top_responders"] = [{"node": i, "name": names[i], "peak_abs_delta": float(peak[i])} for i in top]
    _dump(out / "perturb.json", info)
    plot_response(res, out / "response.png", names=names)
    if args.modality == "fmri":
        rel = ("fmri", "fc", "fmri")
        plot_brain(d.mean(1), w["fmri"].pos.numpy(), out / "brain.png", w[rel].edge_index.numpy(),
                   w[rel].edge_weight.numpy(), names=names, highlight=res["targets"],
                   title="mean Δ fMRI forecast", label="Δ (z)")
    return (f"stimulated {res['target_names']} ({args.modality}, amplitude {args.amplitude:g}); top responders: "
            + ", ".join(f"{names[i]} {peak[i]:.3g}" for i in top) + f" -> {out}")


def _ec(twin, args, out: Path) -> str:
    from twinbrain.twin.plots import plot_ec
    method = _method(args)
    if method in ("coupling", "linear"):       # read from the model: no windows, no stimulus
        ec = twin.effective_connectivity(modality=args.modality, signed=not args.absolute, method=method,
                                         subject=args.subject)
        info = {"method": method, "signed": not args.absolute, "subject": args.subject,
                "units": "latent coupling (no signal units)" if method == "coupling" else
                "forecast z-units per input z-unit, one step"}
        source = f"the model's {method} matrix"
    else:
        ws = twin.windows(subject=args.subject, split=args.split, ids=_ids(args), limit=args.max_windows)
        ec = ec_in_chunks(twin, ws, modality=args.modality, amplitude=args.amplitude, signed=not args.absolute,
                          horizon=args.horizon, progress=_progress(args), method=method)
        info = {"method": method, "signed": not args.absolute, "horizon": args.horizon, "windows": len(ws),
                "window_ids": list(ws.index), "split": args.split, "subject": args.subject}
        if method == "perturbation":
            info["amplitude"] = args.amplitude
        source = f"{len(ws)} windows ({method})"
    names = twin.node_names(args.modality)
    truth = twin.truth() if args.modality == "fmri" else None
    line = ""
    if truth is not None:
        from twinbrain.scoring.validity import offdiag_pearson
        info["truth_coupling_pearson_offdiag"] = offdiag_pearson(ec, truth.coupling)
        line = f"; off-diagonal Pearson r with the true coupling {info['truth_coupling_pearson_offdiag']:.3f}"
    twin.save_ec(ec, out / "ec.npy", args.modality, **info)
    modules = twin.modules() if args.modality == "fmri" else None
    plot_ec(ec, names, out / "ec.png", modules=modules, title=f"{args.modality} effective connectivity")
    if args.modality == "fmri":
        from twinbrain.twin.exports import coords_mm, twin_node_table
        from twinbrain.twin.plots import plot_ec_glass_brain
        pos = coords_mm(twin_node_table(twin, "fmri"))
        if np.isfinite(pos).all(1).sum() >= 2:              # positions known (MNI mm)
            plot_ec_glass_brain(ec, pos, out / "ec_glass_brain.png")
    return f"EC {ec.shape} from {source}{line} -> {out}"


def _personalize(twin, args, overrides: list[str], out: Path) -> str:
    from twinbrain.data.source import load_cohort
    from twinbrain.twin.personalize import summary
    if not args.subject:
        raise ValueError("personalize needs --subject (a held-out subject of the cohort, or a new one whose data "
                         "the --section.key overrides describe)")
    if not overrides and args.subject in twin.meta["subject_map"]:
        cohort = twin.data.cohort              # a held-out subject of the training cohort
    elif not overrides:
        raise ValueError(f"subject '{args.subject}' is not in the model ({', '.join(twin.meta['subject_map'])}); "
                         f"describe where its data are with overrides, e.g. --data.bids_root DIR")
    else:
        values = twin.cfg.to_dict()
        deep_update(values, parse_overrides(overrides))
        cohort = load_cohort(config_from_dict(values))
    new, report = twin.personalize(cohort, subject=args.subject, steps=args.steps or 100, lr=args.lr,
                                   adapt_fraction=args.adapt_fraction)
    path = new.save(out / "model.pt")
    _dump(out / "personalize.json", report)
    if report.get("warning"):
        print(f"warning: {report['warning']}", file=sys.stderr)
    return summary(report) + f"\npersonalised twin -> {path}"


def _attribute(twin, args, out: Path) -> str:
    from twinbrain.twin.plots import plot_attribution
    if args.target is None:
        raise ValueError("attribute needs --target (node slot or name)")
    w = _window(twin, args)
    res = twin.attribute(w, args.target, modality=args.modality, horizon=args.horizon, method=_method(args),
                         steps=args.ig_steps, at_step=args.at_step)
    for m in MODALITIES:
        np.save(out / f"attr_{m}.npy", res[m])
    _dump(out / "attribute.json", {k: v for k, v in res.items() if k not in MODALITIES})
    m = args.modality
    plot_attribution(res[m], out / "attribute.png", twin.sample_period_s(m), names=twin.node_names(m),
                     title=f"{res['method']}: {res['modality']} {res['target_name']}, horizon {res['horizon']}")
    return f"attribution of {res['target_name']} ({res['method']}), value {res['value']:.4g} -> {out}"


def main(argv: list[str] | None = None) -> int:
    from twinbrain.twin.twin import Twin
    args, rest = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        # --data.* location overrides find the training cohort (every verb); personalize alone also takes
        # overrides describing a new subject's data.
        values = parse_overrides(rest) if rest else {}
        if args.verb == "personalize":
            where, rest = [], rest
        else:
            if set(values) - {"data"}:
                raise ValueError(f"unrecognised arguments {rest}: verbs other than personalize take only --data.* "
                                 f"overrides (where the training cohort is now)")
            where, rest = rest, []
        twin = Twin.from_checkpoint(args.checkpoint, args.device, data=where)
        if args.modality is None:
            args.modality = "fmri" if twin.n_nodes("fmri") else "eeg"
        out = _out_dir(args, twin)
        if args.verb == "personalize":
            print(_personalize(twin, args, rest, out))
        else:
            print({"forecast": _forecast, "perturb": _perturb, "ec": _ec, "attribute": _attribute}[args.verb](
                twin, args, out))
    except (ValueError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"twinbrain twin {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
