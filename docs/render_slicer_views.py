"""Render what the CTVL module shows in Slicer's slice views, with Slicer's own MRML slice logic (slicer-core, no
Qt), to docs/slicer_views.png: the module's scene calls on the sample phantom with the embedded demo model.

    .venv/bin/python docs/render_slicer_views.py [--seed 3] [--query "..."] [--out docs/slicer_views.png]

The three panels are the blended images of the Red/Yellow/Green `vtkMRMLSliceLogic`s after 'Analyze' (heatmap of
the top finding as foreground) and 'Find in scan' (views jumped to the best slice); this is the pixel content the
slice views display, not a screenshot of the Qt application.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("render_slicer_views")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=3, help="phantom sample seed (the module's Sample Data)")
    parser.add_argument("--query", default=None, help="find-in-scan text (default: the phantom report's first "
                        "sentence that names a finding)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("slicer_views.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ctvl import scene as sc
    from ctvl.atomic import atomic_file
    from ctvl.headless import HeadlessViews
    from ctvl.inference import load_model
    from ctvl.model.text import split_sentences
    from ctvl.workflow import analyze

    views = HeadlessViews(size=320)
    ct_node = sc.add_phantom_volume(views.scene, seed=args.seed)
    findings = ct_node.GetAttribute("CTVL.ReportFindings") or ""
    query = args.query or next((s for s in split_sentences(findings) if "(series" in s.lower()),
                               "nodule in the right upper lobe")
    volume = sc.volume_from_node(ct_node)
    model = load_model(args.model, device="cpu")
    _, results = analyze(volume, lambda: model, query=query)
    sc.apply_results(views.scene, ct_node, results)
    views.fit()
    best = results.hits[0]
    sc.jump_to_slice(views.scene, ct_node, best.slice, ras_point=results.peak_ras)
    images = {name: views.render(name) for name in ("Red", "Yellow", "Green")}

    ranked = sorted(results.probabilities.items(), key=lambda kv: -kv[1])[:6]
    fig = plt.figure(figsize=(12, 4.6), facecolor="black")
    for n, (name, image) in enumerate(images.items()):
        ax = fig.add_subplot(1, 4, n + 1)
        ax.imshow(np.flipud(image[..., :3]), interpolation="nearest")  # XY y grows upward in VTK
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(1, 4, 4)
    ax.set_facecolor("black")
    ax.axis("off")
    lines = [f"heatmap shown: {results.shown_heatmap}", "", "top probabilities:"]
    lines += [f"  {p:.2f}  {label}" for label, p in ranked]
    lines += ["", "find in scan:", f"  {query[:48]}{'…' if len(query) > 48 else ''}"]
    lines += [f"  slice {h.slice}  ({h.position_mm:.1f} mm)  score {h.score:.2f}" for h in results.hits[:5]]
    ax.text(0.0, 1.0, "\n".join(lines), color="white", fontsize=8, va="top", family="monospace",
            transform=ax.transAxes)
    fig.suptitle(f"CTVL in Slicer's slice views (slicer-core slice logic), phantom seed {args.seed}, "
                 f"model '{args.model}'", color="white", fontsize=10)
    fig.tight_layout()
    with atomic_file(args.out) as fh:
        fig.savefig(fh, format="png", facecolor="black", dpi=100)
    log.info("wrote %s (query %r -> slice %d)", args.out, query, best.slice)
    return args.out


if __name__ == "__main__":
    main()
