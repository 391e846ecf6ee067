"""`ctvl mine` options for the model's opinion: ``--model``, ``--device``, ``--sort disagreement``,
``--tolerance-mm`` (owner: snippet verification; `ctvl.commands.mine` calls these two functions).

With ``--model`` every volume (found under ``--volumes-root``) is encoded once and each snippet located; records get
``model_slice``, ``model_score``, ``model_error_mm``, ``agree`` (see `ctvl.verify.with_model_predictions`).
``--sort disagreement`` lists the doubtful pairs first, so annotators can start with them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from typing import Any

from ctvl.errors import CTVLInputError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model agreement")
    group.add_argument("--model", default=None,
                       help="also predict each snippet's slice with this model ('demo' or a weights folder); "
                            "needs --volumes-root")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")
    group.add_argument("--sort", default="csv", choices=("csv", "disagreement"),
                       help="output order: CSV order, or most doubtful first (needs --model)")
    group.add_argument("--tolerance-mm", type=float, default=10.0,
                       help="model and mined slice agree when their positions differ by at most this (mm)")


def apply(records: Iterable[dict[str, Any]], args: argparse.Namespace) -> Iterable[dict[str, Any]]:
    """Records with the model's predictions (streamed), sorted when asked; unchanged without ``--model``."""
    model_name = getattr(args, "model", None)
    sort = getattr(args, "sort", "csv")
    if model_name is None:
        if sort == "disagreement":
            raise CTVLInputError("--sort disagreement", "needs the model's predictions",
                                 "add --model demo (or a weights folder) and --volumes-root")
        return records
    root = getattr(args, "volumes_root", None)
    if not root:
        raise CTVLInputError("--model", "needs the volumes to encode", "add --volumes-root DIR (CT-RATE layout)")
    from ctvl import verify
    from ctvl.inference import encode, load_model

    model = load_model(model_name, device=getattr(args, "device", "auto"))
    stats = verify.AgreementStats()
    args.agreement_stats = stats  # for the caller's summary line
    out = verify.with_model_predictions(records, root, lambda volume: encode(volume, model),
                                        tolerance_mm=args.tolerance_mm, stats=stats)
    return verify.sort_by_disagreement(out) if sort == "disagreement" else out


def summary(args: argparse.Namespace) -> str:
    """One line about the model agreement ('' without --model)."""
    stats = getattr(args, "agreement_stats", None)
    if stats is None:
        return ""
    d = stats.as_dict()
    agreement = "n/a" if d["agreement"] is None else f"{100 * d['agreement']:.1f}%"
    return (f"model agrees with the mined slice (<= {args.tolerance_mm:g} mm) for {agreement} of {d['compared']} "
            f"pairs; {d['volumes_encoded']} volumes encoded, {d['volumes_missing']} missing")
