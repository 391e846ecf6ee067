"""Checkpoint -> weights directory that ``ctvl`` loads (config.json, model.safetensors, prompts.json, card.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from training.config import config_from_dict

log = logging.getLogger(__name__)

LIMITS = """## Limits
- Research software, not a medical device: outputs are not diagnoses.
- Disease scores come from prompt similarity and are only as calibrated as the training data allows.
- Weights trained on the synthetic phantom corpus know phantom anatomy only; they are a demo, not a CT reader.
- Reports name sides, so training uses no left-right flips; inputs must carry correct orientation headers.
"""


def model_from_checkpoint(path: str | Path):
    """Rebuild the model from a training checkpoint (config inside) and load its weights."""
    from ctvl.model import CTVLModel, ModelConfig

    from training.engine import load_checkpoint, load_trainable_state

    ck = load_checkpoint(path)
    model = CTVLModel(ModelConfig.from_dict(ck["model_config"], source=str(path)))
    load_trainable_state(model, ck["model"])
    return model.eval(), ck


def model_from_weights(path: str | Path):
    """An exported weights directory as an export source: (model, {"model_config", "training_section"}), the
    training section being the lines of its card.md that describe the training (kept verbatim; the checkpoint
    that would describe it again is not at hand)."""
    from ctvl.model import load_weights
    from ctvl.model.weights import resolve_weights_dir

    model = load_weights(path)
    card = resolve_weights_dir(path) / "card.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    start, end = text.find("## Training data"), text.find("## Metrics")
    section = text[start:end].rstrip("\n").splitlines() if 0 <= start < end else [
        "## Training data", f"- not recorded (re-exported from {path}, which has no card.md training section)"]
    return model.eval(), {"model_config": model.config.to_dict(), "training_section": section}


def model_card(ck: dict, eval_report: dict | None, calibration: dict | None = None) -> str:
    mc = ck["model_config"]
    lines = [
        f"# {mc.get('name', 'ctvl')} {mc.get('version', '')}".rstrip(),
        "",
        "## Model",
        f"- encoder {mc.get('encoder')}, input {mc.get('input_shape')} voxels at {mc.get('spacing')} mm, "
        f"HU window {mc.get('hu_window')}, shared dim {mc.get('shared_dim')}, text model {mc.get('text_model')}",
        "- preprocessing: " + ("Gaussian anti-aliasing prefilter, then " if mc.get("input_antialias") else "")
        + "linear resampling onto the model grid",
        f"- token-level (MIL) disease scores: {'on' if mc.get('mil_disease') else 'off'}; CT densitometry bands: "
        + (f"{len(mc['density_edges_hu']) + 1} (edges {list(mc['density_edges_hu'])} HU)"
           if mc.get("density_edges_hu") else "off")
        + (", standardised per feature (running statistics)" if mc.get("density_edges_hu") and mc.get("density_norm")
           else ""),
        "- depth-bin text scores: " + ("mean of the bin embedding's and its tokens' (grounded) scores"
                                       if mc.get("token_localization") else "bin embedding")
        + (f"; plus {mc['locate_label_weight']:g} x the heatmap peaks of the labels a text names"
           + (" (on the patient side it names)" if mc.get("locate_laterality") else "")
           + (f", the weight fitted on split '{calibration.get('split')}' ({calibration.get('rule')})"
              if calibration and calibration.get("locate_label_weight") else "")
           if mc.get("locate_label_weight") else ""),
        "- input channels: the windowed image" + "".join(f", re-windowed to {[float(v) for v in w]} HU"
                                                         for w in mc.get("input_windows_hu") or ())
        + "".join(f", Hessian blobness at {float(sc)} mm" for sc in mc.get("input_blob_scales_mm") or ())
        + ("; blobness maximum per token beside the densitometry features" if mc.get("blob_tokens") else "")
        + ("; per-label blobness readout added to the token-level disease logits" if mc.get("blob_readout") else ""),
        "- label heatmaps: " + (f"shift-and-stitch, {list(mc['heatmap_subdivision'])} cells per token (d, h, w)"
                                if tuple(mc.get("heatmap_subdivision") or (1, 1, 1)) != (1, 1, 1) else "token grid")
        + ("; guided by each label's input x gradient on the model grid"
           if (mc.get("heatmap_guidance") or "none") != "none" else ""),
        "",
    ]
    lines += ck["training_section"] if "training_section" in ck else _training_lines(ck)
    lines += ["", "## Metrics"]
    if eval_report:
        c = eval_report["classification"]["mean"]
        lines.append(f"- evaluated on {eval_report.get('data')} split '{eval_report.get('split')}' "
                     f"({eval_report.get('n_volumes')} volumes)")
        lines.append(f"- mean AUROC {c['auroc']:.3f}")
        for rule in ("eval_set", "fixed_on_valid"):
            if rule in c:
                lines.append(f"- mean F1 {c[rule]['f1']:.3f}, accuracy {c[rule]['accuracy']:.3f}, precision "
                             f"{c[rule]['precision']:.3f} (thresholds: {rule})")
        r = eval_report.get("retrieval", {})
        if "R@10" in r:
            lines.append(f"- report->volume R@1/5/10 {r['R@1']:.3f}/{r['R@5']:.3f}/{r['R@10']:.3f} "
                         f"(pools of {r['pool_size']})")
        loc = eval_report.get("localization", {})
        if loc.get("n_pairs"):
            lines.append(f"- snippet localization: median error {loc['median_abs_error_mm']:.1f} mm "
                         f"({loc['n_pairs']} pairs)")
        h = eval_report.get("heatmaps", {})
        if h.get("n_findings"):
            per = h.get("pointing_game_per_finding")
            lines.append(f"- heatmap pointing game {h['pointing_game']:.3f} per (volume, label)"
                         + (f", {per:.3f} per finding" if per is not None else "")
                         + f"; mass in mask {h['mass_in_mask']:.3f}")
    else:
        lines.append("- not evaluated (export with --eval report.json to include metrics)")
    lines += ["", LIMITS]
    return "\n".join(lines)


def _training_lines(ck: dict) -> list[str]:
    """The card's training section, from a training checkpoint."""
    cfg = config_from_dict(ck["config"])
    return [
        "## Training data",
        f"- {cfg.data.root} split '{cfg.data.train_split}' (CT-RATE layout)"
        + (f", phantom corpus generated with ctvl.phantom ({cfg.data.generate.splits})"
           if cfg.data.generate.enabled else ""),
        f"- config '{cfg.name}': {ck['step']} steps, batch {cfg.train.batch_size} x {ck.get('world_size', 1)} "
        f"process(es) x accumulation {cfg.train.grad_accum}, lr {cfg.optim.lr}, autocast {cfg.train.amp} on GPU"
        + (f", steps in {ck['autocast']}" if "autocast" in ck
           else ", bf16 on CPU" if cfg.train.cpu_amp is True else " (CPU: fp32)"),
        "- objectives: " + ", ".join(
            f"{k}{' (report-guided)' if k == 'mil' and cfg.loss.mil.guided else ''} "
            f"(weight {getattr(cfg.loss, k).weight})"
            for k in ("siglip", "disease", "mil", "localization", "token_localization")
            if getattr(cfg.loss, k).enabled),
    ] + ([f"- started from the weights {cfg.init_weights}"
          + (f", with {', '.join(cfg.train.freeze)} frozen" if cfg.train.freeze else "")] if cfg.init_weights else [])


def apply_calibration(model, calibration: dict) -> None:
    """Set the config values of a `training calibrate` fit (validated) on ``model``."""
    from ctvl.errors import CTVLWeightsError

    values = dict(calibration.get("config") or {})
    unknown = sorted(set(values) - {"locate_label_weight", "locate_laterality"})
    if unknown:
        raise CTVLWeightsError("calibration", f"sets unknown config values {unknown}",
                               "use the JSON that `python -m training calibrate --out` wrote")
    cfg = model.config.replace(**values)
    cfg.validate("calibration")
    model.config = cfg


# model config values that change only how the trained weights are read out, never the weights
INFERENCE_SETTINGS = ("heatmap_subdivision", "heatmap_guidance", "locate_peak_radius", "locate_laterality")


def apply_settings(model, items: list[str] | None) -> None:
    """Set ``name=value`` (value as YAML) inference-time config values (`INFERENCE_SETTINGS`, validated)."""
    import yaml
    from ctvl.errors import CTVLInputError, CTVLWeightsError

    values = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or name.strip() not in INFERENCE_SETTINGS:
            raise CTVLInputError("--set", f"{item!r} is not one of {', '.join(INFERENCE_SETTINGS)}=value",
                                 "e.g. --set heatmap_subdivision=[1,4,4]")
        try:
            values[name.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise CTVLInputError("--set", f"{item!r}: value is not YAML ({exc.__class__.__name__})", "") from exc
    if not values:
        return
    try:
        cfg = model.config.replace(**values)
    except (TypeError, ValueError) as exc:
        raise CTVLWeightsError("--set", f"invalid value ({exc})", "") from exc
    cfg.validate("--set")
    model.config = cfg


def _read_json(path: str | Path, flag: str, what: str) -> dict:
    """A JSON object from ``path``, or a one-line CTVLInputError naming ``flag``."""
    from ctvl.errors import CTVLInputError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CTVLInputError(path, f"{flag}: cannot read ({exc.strerror or exc})", f"Give {what}") from None
    except ValueError as exc:
        raise CTVLInputError(path, f"{flag}: not JSON ({exc})", f"Give {what}") from None
    if not isinstance(data, dict):
        raise CTVLInputError(path, f"{flag}: expected a JSON object", f"Give {what}")
    return data


def is_weights_dir(path: str | Path) -> bool:
    """True for an exported weights directory (config.json beside model.safetensors), not a run directory."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()


def export(checkpoint: str | Path, out: str | Path, eval_report: str | Path | None = None,
           calibration: str | Path | None = None, settings: list[str] | None = None) -> Path:
    """Write the weights directory (with a `training calibrate` fit and ``name=value`` inference settings
    applied); returns its path. ``checkpoint``: a training checkpoint, or an exported weights directory
    (`model_from_weights`: new settings, calibration and metrics for weights whose checkpoint is not at hand;
    ``out`` may be that directory itself)."""
    from ctvl.model import save_weights

    model, ck = (model_from_weights if is_weights_dir(checkpoint) else model_from_checkpoint)(checkpoint)
    report = _read_json(eval_report, "--eval", "an evaluation report of `training evaluate`") if eval_report else None
    calib = _read_json(calibration, "--calibration", "the JSON of `training calibrate --out`") if calibration else None
    if calib:
        apply_calibration(model, calib)
    apply_settings(model, settings)
    ck = {**ck, "model_config": model.config.to_dict()}  # the card describes what was written
    path = save_weights(model, out, prompts=None, card=model_card(ck, report, calib))
    log.info("exported %s -> %s", checkpoint, path)
    return Path(path)
