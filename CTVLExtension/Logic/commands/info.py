"""`ctvl info`: the model's name, version, device, input geometry and labels."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ctvl.commands._common import add_model_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show the model, its version, device and labels", description=__doc__)
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def model_info(model: Any, model_arg: str) -> dict[str, Any]:
    from ctvl import __version__
    from ctvl.inference import model_device, model_input_spec
    from ctvl.prompts import LABELS

    spacing, shape, window = model_input_spec(model)
    cfg = model.config
    return {
        "ctvl": __version__,
        "model": {"name": str(getattr(cfg, "name", "unknown")), "version": str(getattr(cfg, "version", "unknown")),
                  "source": model_arg, "encoder": getattr(cfg, "encoder", None)},
        "device": str(model_device(model)),
        "input_shape_dhw": list(shape),
        "spacing_dhw_mm": list(spacing),
        "hu_window": list(window),
        "antialias": bool(getattr(cfg, "input_antialias", False)),  # Gaussian prefilter before resampling
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "labels": list(getattr(cfg, "labels", None) or LABELS),
    }


def run(args: argparse.Namespace) -> int:
    from ctvl.inference import load_model

    info = model_info(load_model(args.model, device=args.device), args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["model"]
    print(f"model:    {m['name']} {m['version']} ({m['source']}, encoder {m['encoder']})")
    print(f"device:   {info['device']}")
    print(f"input:    {info['input_shape_dhw']} voxels at {info['spacing_dhw_mm']} mm, HU window {info['hu_window']}"
          + (", anti-aliased" if info["antialias"] else ""))
    print(f"params:   {info['parameters']:,}")
    print(f"labels ({len(info['labels'])}):")
    for label in info["labels"]:
        print(f"  {label}")
    return 0
