"""Inference speed and memory of `ctvl.inference` on CPU (prints figures; writes results/inference_speed.json).

Usage: .venv/bin/python benchmarks/inference_speed.py [--threads 2] [--sizes 256x100 512x300 512x600] [--quick]

Each measurement runs in a fresh subprocess so that its peak RSS (resource.getrusage) is its own. The CTs are
phantoms (`ctvl.phantom.generate_case`) written once as .nii.gz into --cache. The model is the embedded demo model,
or a randomly initialised model of the demo config when the weights are not there (the run says which).
Targets (2 CPU cores): load + encode + 18 probabilities + 18 model-grid heatmaps <= 15 s and <= 4 GB for
512x512x300; new query locate <= 30 ms, repeated <= 2 ms; new-query heatmap <= 100 ms (model grid),
<= 1.5 s (input grid). Also timed (best of 3, no target): preprocessing onto the demo grid with and without the
anti-aliasing prefilter, and the blobness filter on the demo grid and the 2.2 mm grid (`child_preprocess`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "inference_speed.json"
QUERIES = [
    "solid nodule in the right upper lobe", "ground-glass opacity in the left lower lobe",
    "small pleural effusion on the right", "enlarged mediastinal lymph node", "centrilobular emphysema",
    "bronchial wall thickening in the lower lobes", "calcified plaque of the coronary arteries",
    "consolidation in the lingula", "pericardial effusion", "hiatal hernia", "septal thickening at the bases",
    "atelectasis in the right middle lobe",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _model(threads: int):
    import torch
    from ctvl.errors import CTVLWeightsError
    from ctvl.inference import load_model

    torch.set_num_threads(threads)
    t = time.perf_counter()
    try:
        model, which = load_model("demo", device="cpu"), "embedded demo weights"
    except CTVLWeightsError:
        from ctvl.model import CTVLModel, demo_config

        torch.manual_seed(0)
        model, which = CTVLModel(demo_config()).eval(), "randomly initialised demo config (no demo weights)"
    return model, which, time.perf_counter() - t


def _median_ms(fn, items) -> float:
    times = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def child_pipeline(path: str, threads: int, full: bool) -> dict:
    from ctvl.inference import encode
    from ctvl.io import read_volume

    model, which, t_model = _model(threads)
    t = time.perf_counter()
    model.encode_text(["warm up the text tower"])  # lazy MiniLM load, outside the per-volume figures
    t_text = time.perf_counter() - t
    out = {"model": which, "model_load_s": t_model, "text_tower_load_s": t_text}

    def pipeline() -> dict:
        t0 = time.perf_counter()
        vol = read_volume(path)
        t1 = time.perf_counter()
        enc = encode(vol, model)
        t2 = time.perf_counter()
        enc.disease_probabilities()
        t3 = time.perf_counter()
        enc.prepare_heatmaps(labels=enc.labels())  # as `ctvl analyze` does: all labels' encoder passes at once
        for label in enc.labels():
            enc.heatmap(label, grid="model")
        t4 = time.perf_counter()
        return {"enc": enc, "load_s": t1 - t0, "encode_s": t2 - t1, "probabilities_s": t3 - t2,
                "heatmaps_model_s": t4 - t3, "total_s": t4 - t0, "windows": enc.timing}

    first = pipeline()  # includes the 18 labels' prompt encoding (cached per model afterwards)
    out["shape_kji"] = list(first["enc"].volume.array.shape)
    out["spacing_ijk"] = [round(float(s), 3) for s in first["enc"].volume.spacing]
    out["model_grid_dhw"] = list(first["enc"].model_shape)
    out["cold"] = {k: v for k, v in first.items() if k != "enc"}
    out["peak_rss_mb_after_pipeline"] = peak_rss_mb()
    if not full:
        return out
    del first
    second = pipeline()  # prompts already embedded: the per-volume cost in a running app
    out["warm"] = {k: v for k, v in second.items() if k != "enc"}
    enc = second["enc"]
    out["text_encode_new_ms"] = _median_ms(lambda q: model.encode_text([q + " (text only)"]), QUERIES[:6])
    out["locate_new_ms"] = _median_ms(lambda q: enc.locate(q), QUERIES)
    out["locate_repeat_ms"] = _median_ms(lambda q: enc.locate(q), QUERIES)
    new = [q + " (heatmap)" for q in QUERIES[:6]]
    out["heatmap_new_model_ms"] = _median_ms(lambda q: enc.heatmap(q, grid="model"), new)
    new_in = [q + " (input)" for q in QUERIES[:3]]
    out["heatmap_new_input_ms"] = _median_ms(lambda q: enc.heatmap(q, grid="input"), new_in)
    out["peak_rss_mb_end"] = peak_rss_mb()
    return out


def _best_s(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def child_preprocess(path: str, threads: int) -> dict:
    """Best of 3: `to_model_space` of the CT onto the demo grid without and with the anti-aliasing prefilter (the
    one-pass path for axis-parallel scans, and the SimpleITK smoothing it replaces there), and the blobness filter
    (two scales, one thread) on the demo grid and on the 2.2 mm in-plane grid of benchmarks/fine_grid.flags."""
    import torch
    from ctvl.geometry import antialias, to_model_space
    from ctvl.io import read_volume
    from ctvl.model import demo_config
    from ctvl.model.blobness import HessianBlobness

    torch.set_num_threads(threads)
    vol = read_volume(path)
    mc = demo_config()
    grid = (mc.spacing, mc.input_shape, mc.hu_window)
    out = {"plain_s": _best_s(lambda: to_model_space(vol, *grid)),
           "antialias_s": _best_s(lambda: to_model_space(vol, *grid, antialias_input=True)),
           "antialias_smoothing_first_s": _best_s(lambda: antialias(vol, mc.spacing), repeats=1)}
    scales = tuple(_model(threads)[0].config.input_blob_scales_mm) or (2.5, 4.0)  # the embedded model's
    torch.set_num_threads(1)
    for name, spacing, shape in (("blobness_demo_grid_s", mc.spacing, mc.input_shape),
                                 ("blobness_fine_grid_s", (3.2, 2.2, 2.2), (96, 160, 160))):
        filt, x = HessianBlobness(scales, spacing), torch.rand(1, 1, *shape)
        out[name] = _best_s(lambda filt=filt, x=x: filt(x))
    out["blobness_scales_mm"] = list(scales)
    return out


def child_colipri(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    try:
        from colipri import get_model  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - any import failure means "skipped"
        return {"skipped": f"colipri is not importable ({type(exc).__name__}: {exc})"}
    model = get_model(pretrained=False, image_only=True).eval()
    x = torch.rand(1, 1, 192, 192, 192)
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        model(x)
    return {"encode_s": time.perf_counter() - t}


def run_child(args: list[str], timeout: int = 900) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_ct(cache: Path, size: int, slices: int) -> Path:
    """A phantom of ``size`` x ``size`` x ``slices`` written once; slices relabelled to 1 mm apart, so 600 slices
    (600 mm) are longer than the demo model's field of view and need several windows."""
    path = cache / f"phantom_{size}x{size}x{slices}_1mm.nii.gz"
    if not path.exists():
        from ctvl.geometry import Volume
        from ctvl.io import write_volume
        from ctvl.phantom import generate_case

        t = time.perf_counter()
        case = generate_case(11, 0, shape=(slices, size, size), force_labels=["Lung nodule"])
        matrix = case.volume.ijk_to_ras.copy()
        matrix[:3, 2] /= np.linalg.norm(matrix[:3, 2])
        write_volume(Volume(case.volume.array, matrix), path, dtype="int16")
        print(f"  wrote {path} ({time.perf_counter() - t:.1f} s)", flush=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["256x100", "512x300", "512x600"])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ctvl_bench_cache"))
    parser.add_argument("--quick", action="store_true", help="main 512x300 figures only, no scaling/colipri")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "pipeline":
            result = child_pipeline(rest[0], int(rest[1]), rest[2] == "full")
        elif kind == "preprocess":
            result = child_preprocess(rest[0], int(rest[1]))
        else:
            result = child_colipri(int(rest[0]))
        print(json.dumps(result))
        return 0

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"ctvl inference benchmark, {args.threads} threads, load average {load}, CTs cached in {cache}", flush=True)
    main_ct = make_ct(cache, 512, 300)
    res = run_child(["pipeline", str(main_ct), str(args.threads), "full"])
    cold, warm = res["cold"], res["warm"]
    print(f"model: {res['model']} (load {res['model_load_s']:.2f} s, text tower {res['text_tower_load_s']:.2f} s)")
    print(f"CT {res['shape_kji']} (k,j,i) spacing {res['spacing_ijk']} mm -> model grid {res['model_grid_dhw']}")
    for name, r in (("first volume (prompts embedded)", cold), ("next volume (prompts cached)", warm)):
        print(f"{name}: load {r['load_s']:.2f} + encode {r['encode_s']:.2f} + 18 probabilities "
              f"{r['probabilities_s']:.2f} + 18 heatmaps {r['heatmaps_model_s']:.2f} = {r['total_s']:.2f} s "
              "(target <= 15 s)")
    print(f"peak RSS after the pipeline: {res['peak_rss_mb_after_pipeline']:.0f} MB (target <= 4096 MB); "
          f"at the end (incl. input-grid heatmaps): {res['peak_rss_mb_end']:.0f} MB")
    print(f"locate, new free text: {res['locate_new_ms']:.1f} ms median (target <= 30 ms; of which the text encoder "
          f"alone takes ~{res['text_encode_new_ms']:.1f} ms); repeated: {res['locate_repeat_ms']:.2f} ms "
          "(target <= 2 ms)")
    print(f"heatmap, new free text: model grid {res['heatmap_new_model_ms']:.1f} ms (target <= 100 ms), "
          f"input grid {res['heatmap_new_input_ms']:.0f} ms (target <= 1500 ms)")
    out = {"threads": args.threads, "load_average": os.getloadavg(), "main": res, "scaling": [], "colipri": None}
    if not args.quick:
        pre = out["preprocess"] = run_child(["preprocess", str(main_ct), str(args.threads)])
        print(f"preprocessing onto the demo grid: {pre['plain_s']:.2f} s plain, {pre['antialias_s']:.2f} s "
              f"anti-aliased (smoothing the whole scan first, as oblique scans still do: "
              f"{pre['antialias_smoothing_first_s']:.2f} s); blobness at {pre['blobness_scales_mm']} mm, one thread: "
              f"{pre['blobness_demo_grid_s']:.2f} s on the demo grid, "
              f"{pre['blobness_fine_grid_s']:.2f} s on the 2.2 mm grid")
        print("scaling (fresh process each; first volume, prompts embedded):")
        for size_txt in args.sizes:
            size, slices = (int(v) for v in size_txt.split("x"))
            r = run_child(["pipeline", str(make_ct(cache, size, slices)), str(args.threads), "short"])
            c = r["cold"]
            print(f"  {size}x{size}x{slices} ({r['spacing_ijk']} mm): load {c['load_s']:.2f} s, "
                  f"encode {c['encode_s']:.2f} s "
                  f"(preprocess {c['windows'].get('preprocess', 0):.2f} s), probabilities {c['probabilities_s']:.2f} s,"
                  f" heatmaps {c['heatmaps_model_s']:.2f} s, total {c['total_s']:.2f} s, model grid "
                  f"{r['model_grid_dhw']}, peak RSS {r['peak_rss_mb_after_pipeline']:.0f} MB")
            out["scaling"].append({"size": size_txt, **r})
        col = run_child(["colipri", str(args.threads)])
        out["colipri"] = col
        if "skipped" in col:
            print(f"colipri: skipped: {col['skipped']}")
        else:
            ours = warm["encode_s"]
            print(f"colipri image encoder (random weights, 192^3): {col['encode_s']:.2f} s vs ctvl encode "
                  f"{ours:.2f} s -> ratio {col['encode_s'] / max(ours, 1e-9):.1f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
