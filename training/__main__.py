"""``python -m training train|evaluate|calibrate|export|text-features`` (train also runs under ``torchrun
--nproc_per_node N``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ctvl.errors import CTVLError, CTVLInputError


def _train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.engine import train
    from training.utils import dist_info

    overrides = list(args.override or [])
    if args.data:
        overrides.append(f"data.root={args.data}")
        overrides.append("data.generate.enabled=false")
    cfg = load_config(args.config, overrides)
    out = Path(args.out or Path("runs") / cfg.name)
    summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if dist_info()[0] == 0:
        done = f"last loss {summary['losses'][-1]:.4f}" if summary["losses"] else "no step run: the data is prepared"
        print(f"trained {summary['step']} steps -> {out} ({done})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, format_table
    from training.utils import atomic_write_bytes

    report = evaluate(
        args.weights, args.data, split=args.split, val_split=args.val_split, baseline=args.baseline,
        batch_size=args.batch_size, pool_size=args.pool_size, max_volumes=args.max_volumes,
        threshold_rule=args.threshold_rule, device=args.device, cache_dir=args.cache_dir, workers=args.workers,
        heatmaps=not args.no_heatmaps, bootstrap=max(args.bootstrap, 0),
    )
    atomic_write_bytes(Path(args.out), json.dumps(report, indent=1, default=float).encode())
    print(format_table(report))
    print(f"report -> {args.out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import calibrate, format_fit, write_into
    from training.utils import atomic_write_bytes

    report = calibrate(args.weights, args.data, split=args.split, batch_size=args.batch_size, device=args.device,
                       max_volumes=args.max_volumes, workers=args.workers)
    print(format_fit(report))
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(report, indent=1).encode())
        print(f"calibration -> {args.out}")
    if args.write:
        print(f"locate_label_weight {report['locate_label_weight']} -> {write_into(args.weights, report['config'])}")
    return 0


def _text_features(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.engine import build_model
    from training.text_features import build_table, corpus_sentences, prompt_sentences, save_table, tower_settings

    cfg = load_config(args.config, list(args.override or []))
    root = Path(args.data or cfg.data.root)
    for split in args.splits:
        if not (root / "radiology_text_reports" / f"{split}_reports.csv").is_file():
            raise CTVLError(f"{root}: no reports for split {split!r} (radiology_text_reports/{split}_reports.csv)")
    model = build_model(cfg)
    sentences = prompt_sentences(model) + corpus_sentences(model, root, args.splits, tuple(cfg.data.report_fields))
    features, unique = build_table(model, sentences)
    path = save_table(args.out, features, unique, tower_settings(model))
    print(f"{len(unique)} sentences ({', '.join(args.splits)} + prompts) -> {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.engine import latest_checkpoint
    from training.export import export, is_weights_dir

    ckpt = Path(args.checkpoint)
    if ckpt.is_dir() and not is_weights_dir(ckpt):
        found = latest_checkpoint(ckpt)
        if found is None:
            raise CTVLInputError(ckpt, "no checkpoint found (expected checkpoints/step_*.pt)",
                                 "Give a run directory, a checkpoint .pt or an exported weights directory")
        ckpt = found
    path = export(ckpt, args.out, args.eval, args.calibration, args.set)
    print(f"weights -> {path}")
    return 0


def _count(minimum: int):
    """An argparse type: a whole number >= ``minimum`` (``--max-volumes 0`` is refused, not read as "all")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("--config", required=True)
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--data", help="dataset root (overrides data.root, disables auto-generation)")
    t.add_argument("--override", action="append", metavar="KEY=VALUE", help="e.g. train.max_steps=10 (repeatable)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=_train)
    e = sub.add_parser("evaluate", help="CT-RATE protocol + localization/heatmap checks")
    e.add_argument("--weights", help="weights dir or 'demo' (not needed with --baseline)")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="valid")
    e.add_argument("--val-split", help="split used to fix thresholds (e.g. valid when evaluating test)")
    e.add_argument("--out", default="report.json")
    e.add_argument("--baseline", choices=["random", "prevalence", "mask"],
                   help="mask: oracle heatmaps (the phantom masks) on the token grid of --weights")
    e.add_argument("--batch-size", type=_count(1), default=4)
    e.add_argument("--pool-size", type=_count(1), default=100)
    e.add_argument("--max-volumes", type=_count(1))
    e.add_argument("--threshold-rule", choices=["youden", "f1"], default="youden")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")
    e.add_argument("--cache-dir")
    e.add_argument("--workers", type=_count(1), default=1)
    e.add_argument("--no-heatmaps", action="store_true")
    e.add_argument("--bootstrap", type=_count(0), default=1000,
                   help="draws for the 95%% intervals over volumes (0: none)")
    e.set_defaults(run=_evaluate)
    c = sub.add_parser("calibrate", help="fit the label-grounded depth scores' weight on a validation split")
    c.add_argument("--weights", required=True, help="weights dir (exported) or 'demo'")
    c.add_argument("--data", required=True)
    c.add_argument("--split", default="valid", help="never the split you report")
    c.add_argument("--out", help="write the fit (grid and chosen weight) to this JSON, for `export --calibration`")
    c.add_argument("--write", action="store_true", help="also set the weight in the weights dir's config.json")
    c.add_argument("--batch-size", type=_count(1), default=4)
    c.add_argument("--max-volumes", type=_count(1))
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.add_argument("--workers", type=_count(1), default=1)
    c.set_defaults(run=_calibrate)
    f = sub.add_parser("text-features", help="a table of the frozen text tower's sentence features "
                                             "(train.text_features)")
    f.add_argument("--config", required=True, help="the training config (its model.text_* settings)")
    f.add_argument("--data", help="dataset root (default: the config's data.root)")
    f.add_argument("--splits", nargs="+", default=["train", "valid", "test"])
    f.add_argument("--out", required=True, help="the table, a .safetensors file")
    f.add_argument("--override", action="append", metavar="KEY=VALUE")
    f.set_defaults(run=_text_features)
    x = sub.add_parser("export", help="checkpoint -> weights directory")
    x.add_argument("checkpoint", help="a checkpoint .pt, a run directory (latest checkpoint), or an exported "
                                      "weights directory (new settings, calibration, metrics; card keeps its training)")
    x.add_argument("--out", required=True)
    x.add_argument("--eval", help="evaluation report.json to put in card.md")
    x.add_argument("--calibration", help="calibration.json of `training calibrate` (sets its config values)")
    x.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="an inference-time config value (heatmap_subdivision, heatmap_guidance, "
                        "locate_peak_radius, locate_laterality), e.g. "
                        "--set heatmap_subdivision=[1,4,4]; repeatable")
    x.set_defaults(run=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from ctvl.allocator import ENV, retain_freed_memory

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if retain_freed_memory():  # ~2x faster CPU steps (ctvl.allocator)
        logging.getLogger("training").info("glibc keeps freed memory for reuse (%s=0 turns it off)", ENV)
    try:
        return args.run(args)
    except CTVLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
