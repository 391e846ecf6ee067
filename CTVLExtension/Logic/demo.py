"""`python -m ctvl.demo` (what `make demo` runs): a phantom chest CT with a report, analysed by the embedded model.

1. generates a synthetic CT + report with ground truth (`ctvl.phantom.generate_case`, fixed seed) in ./demo_out/;
2. prints the true findings and the image references mined from the report (`ctvl.snippets`);
3. runs `ctvl analyze` on it with the embedded demo model and two queries taken from the report;
4. prints true findings vs predicted probabilities, and report/true slices vs located slices.

Without the embedded weights it says so (and how to train them), still shows steps 1-2, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEMO_SEED = 20240
N_QUERIES = 2


def _print_case(case, volume_path: Path) -> list[dict]:
    """Print ground truth and mined references; return per-finding query candidates."""
    from ctvl.snippets import image_to_slice, mine_references

    vol = case.volume
    print(f"Phantom CT: {volume_path}  ({vol.shape_ijk[0]}x{vol.shape_ijk[1]}x{vol.n_slices} voxels, "
          f"spacing {', '.join(f'{s:.2f}' for s in vol.spacing)} mm)")
    print("\nGround truth findings (slices in file order):")
    for f in case.findings:
        size = f" {f.size_mm:.0f} mm" if f.size_mm else ""
        print(f"  - {f.label:<28} slices {f.slice_range[0]:>3}-{f.slice_range[1]:<3} centre {f.centre_slice:>3}"
              f"{size}  | {f.sentence}")
    text = case.report.get("Findings_EN", "")
    refs = mine_references(text)
    print(f"\nImage references mined from the report ({len(refs)}):")
    candidates = []
    for ref in refs:
        try:
            cited = image_to_slice(ref.image, vol.n_slices, vol.slices_toward_superior)
        except Exception as exc:  # an out-of-range citation is shown, not fatal
            cited, note = None, f" ({exc})"
        else:
            note = ""
        where = f"series {ref.series}, " if ref.series is not None else ""
        print(f"  - \"{ref.snippet}\" -> {where}image {ref.image} -> slice {cited}{note}")
        truth = next((f for f in case.findings if f.sentence.startswith(ref.snippet)), None)
        if truth is not None and cited is not None:
            candidates.append({"text": ref.snippet, "cited_slice": cited, "finding": truth})
    return candidates


def _compare(case, result: dict, candidates: list[dict]) -> None:
    probs = {d["name"]: d["probability"] for d in result["diseases"]}
    print("\nTrue findings vs predicted probabilities:")
    print(f"  {'label':<36} {'truth':>5}  {'p':>6}")
    for label, truth in case.labels.items():
        p = probs.get(label)
        mark = "*" if truth else " "
        print(f"  {mark} {label:<34} {truth:>5}  {p:6.3f}" if p is not None else f"  {mark} {label:<34} {truth:>5}")
    print("\nQueries: report-cited / true slices vs located slice:")
    for cand, q in zip(candidates, result["queries"]):
        f = cand["finding"]
        best = q["slices"][0] if q["slices"] else None
        found = f"slice {best['slice']} ({best['position_mm']:.1f} mm)" if best else "-"
        ok = best is not None and f.slice_range[0] <= best["slice"] <= f.slice_range[1]
        print(f"  \"{q['text']}\"\n      cited slice {cand['cited_slice']}, true slices {f.slice_range[0]}-"
              f"{f.slice_range[1]}, located {found} {'(inside)' if ok else '(outside)'}")
        others = ", ".join(str(s["slice"]) for s in q["slices"][1:])
        if others:
            print(f"      runners-up: {others}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctvl.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="phantom seed")
    parser.add_argument("--model", default="demo", help="weights (default: the embedded demo model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from ctvl.errors import CTVLError
    from ctvl.io import write_volume
    from ctvl.phantom import generate_case

    out = Path(args.out)
    case = generate_case(args.seed, 0, force_labels=["Lung nodule"])
    volume_path = write_volume(case.volume, out / case.volume_name, dtype="int16")
    (out / "report.json").write_text(json.dumps(case.report, indent=2) + "\n", encoding="utf-8")
    candidates = _print_case(case, volume_path)
    print("\nReport (Findings):\n  " + case.report.get("Findings_EN", ""))

    from ctvl.inference import load_model

    try:
        load_model(args.model, device=args.device)
    except CTVLError as exc:
        print(f"\nThe embedded demo model is not available yet, so nothing was analysed:\n  {exc}")
        print(f"The phantom CT and its report are in {out}/.")
        return 0

    from ctvl.cli import main as cli_main

    analysis = out / "analysis"
    candidates.sort(key=lambda c: c["finding"].slice_range[1] - c["finding"].slice_range[0])  # focal first
    queries = [c["text"] for c in candidates[:N_QUERIES]]
    argv_cli = ["analyze", str(volume_path), "--model", args.model, "--device", args.device, "--out", str(analysis)]
    for q in queries:
        argv_cli += ["--query", q]
    print(f"\n$ ctvl {' '.join(argv_cli)}")
    sys.stdout.flush()
    code = cli_main(argv_cli)
    if code != 0:
        return code
    result = json.loads((analysis / "result.json").read_text(encoding="utf-8"))
    _compare(case, result, candidates[:N_QUERIES])
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in result["timing_s"].items())
    print(f"\nTiming: {timing}")
    print(f"Overview: {analysis / 'overview.png'}   Heatmaps: {analysis / 'heatmaps'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
