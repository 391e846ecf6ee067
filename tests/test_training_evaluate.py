"""training.evaluate on a tiny phantom set: report structure, thresholds, baselines, heatmap checks, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ctvl.prompts import LABELS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ctvl.model import CTVLModel, save_weights, tiny_config

    from training.synthetic import write_small_phantom

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ph")
    write_small_phantom(root, n=6, seed=2, split="valid", shape=(40, 64, 64))
    write_small_phantom(root, n=4, seed=3, split="train", shape=(40, 64, 64))
    torch.manual_seed(0)
    weights = save_weights(CTVLModel(tiny_config()), root / "w")
    return root, weights


def test_model_report(setup):
    from training.evaluate import evaluate, format_table

    root, weights = setup
    rep = evaluate(str(weights), root, split="valid", val_split="train", pool_size=100)
    assert rep["n_volumes"] == 6 and rep["retrieval"]["pool_size"] == 6
    c = rep["classification"]
    assert set(c["per_label"]) and {"eval_set", "fixed_on_valid"} <= set(c["mean"])
    both = [r["auroc"] for r in c["per_label"].values() if 0 < r["positives"] < r["n"]]
    assert c["mean"]["n_labels"] == len(both) and c["mean"]["auroc"] == pytest.approx(np.mean(both))
    assert "flatters" in rep["threshold_rule"]["eval_set"]
    assert rep["localization"]["ground_truth"] == "phantom slice ranges"
    assert rep["localization"]["n_pairs"] >= 0
    h = rep["heatmaps"]
    assert h["n_findings"] >= 1 and 0 <= h["pointing_game"] <= 1 and 0 <= h["mass_in_mask"] <= 1
    assert h["n_volume_labels"] <= h["n_findings"] and set(h["per_label"]) <= set(LABELS)
    assert sum(r["n"] for r in h["per_label"].values()) == h["n_volume_labels"]
    assert h["pointing_game"] <= h["pointing_game_within_tolerance"] <= 1 and h["median_peak_distance_mm"] >= 0
    for r in h["per_label"].values():  # each miss is counted, and has a 3-vector direction
        assert r["misses"] == round(r["n"] * (1 - r["pointing_game"]))
        assert len(r.get("miss_offset_ras_mm", [0, 0, 0])) == 3
    loc = rep["localization"]
    assert sum(r["n"] for r in loc["per_label"].values()) == loc["n_pairs"]
    # without the MIL score the shipped probability is the pooled zero-shot score itself
    assert set(rep["score_branches"]) == {"pooled"}
    assert rep["score_branches"]["pooled"]["mean_auroc"] == pytest.approx(c["mean"]["auroc"])
    table = format_table(rep)
    assert "MEAN" in table and "retrieval" in table and "pooled embedding alone" in table
    assert all(f"  {name}" in table for name in h["per_label"]) and "misses" in table
    json.dumps(rep)  # serialisable


def test_score_branches_are_the_halves_of_the_shipped_score(setup, tmp_path):
    from ctvl.model import CTVLModel, load_weights, save_weights
    from sklearn.metrics import roc_auc_score

    from training.data import Preprocess
    from training.evaluate import ModelPredictor, _batches, _dataset, score_branches

    root, weights = setup
    cfg = load_weights(weights).config.replace(mil_disease=True)
    torch.manual_seed(1)
    model = load_weights(save_weights(CTVLModel(cfg), tmp_path / "w"))
    ds = _dataset(root, "valid", Preprocess.from_model_config(cfg), cfg.downsample()[0], None, None, 1)
    out = ModelPredictor(model, torch.device("cpu"))(next(_batches(ds, 3)), [[], [], []])
    assert set(out["branches"]) == {"pooled", "mil"}
    shipped = np.log(out["probs"]) - np.log1p(-out["probs"])
    np.testing.assert_allclose(shipped, (out["branches"]["pooled"] + out["branches"]["mil"]) / 2, atol=1e-4)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (40, len(LABELS))).astype(np.float64)
    y[:5, 0] = np.nan  # a missing label is left out, not counted as negative
    y[:, 1] = 1  # one class only: undefined
    s = rng.normal(size=y.shape) + y * 0.5
    rep = score_branches({"pooled": s}, y)["pooled"]
    assert rep["per_label_auroc"][LABELS[0]] == pytest.approx(roc_auc_score(y[5:, 0], s[5:, 0]))
    assert np.isnan(rep["per_label_auroc"][LABELS[1]])
    want = np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(2, len(LABELS))] + [roc_auc_score(y[5:, 0],
                                                                                                      s[5:, 0])])
    assert rep["mean_auroc"] == pytest.approx(want)


def test_pointing_counts_a_hit_on_any_instance_of_the_label_and_per_finding():
    from training.evaluate import pointing

    mask = np.zeros((4, 6, 6), np.uint8)
    mask[1, 1:3, 1:3] = 5  # nodule A
    mask[2, 3:5, 3:5] = 7  # nodule B
    heat = np.zeros(mask.shape, np.float32)
    heat[2, 4, 4] = 3.0  # peak on B
    heat[1, 1, 1] = 1.0
    row, hits = pointing(heat, mask, [5, 7])
    assert row["hit"] and hits == [False, True] and row["peak_distance_mm"] == 0.0
    assert row["peak_offset_vox"] == [0, 0, 0]
    assert row["mask_fraction"] == (mask > 0).mean()
    pos = np.maximum(heat - heat.mean(), 0)
    assert row["mass_in_mask"] == pytest.approx(pos[mask > 0].sum() / pos.sum())
    row, hits = pointing(heat, mask, [5], spacing=(2.5, 1.5, 1.5))  # the peak misses the only instance
    assert not row["hit"] and hits == [False]
    # nearest voxel of A to the peak (2, 4, 4) is (1, 2, 2): (1, 2, 2) voxels at (2.5, 1.5, 1.5) mm
    assert row["peak_distance_mm"] == pytest.approx(np.sqrt(2.5**2 + 2 * 3.0**2))
    assert row["peak_offset_vox"] == [1, 2, 2]  # from that voxel to the peak, in array axes
    row, hits = pointing(heat, mask, [9])  # label absent from the mask
    assert row is None and hits == []


def test_miss_offsets_are_in_patient_coordinates_and_summarised_per_label():
    from training.evaluate import _summarise_points, offset_ras_mm

    # stored LPS (i -> -R, j -> -A) at 0.8 x 0.8 x 2 mm: one step up the array's first axis (k) is 2 mm superior
    lps = np.diag([-0.8, -0.8, 2.0, 1.0])
    assert offset_ras_mm([1, 0, 0], lps) == [0.0, 0.0, 2.0]
    assert offset_ras_mm([0, 2, -1], lps) == [0.8, -1.6, 0.0]
    rows = [{"label": "Atelectasis", "hit": False, "peak_distance_mm": d, "mass_in_mask": 0.0, "mask_fraction": 0.1,
             "peak_offset_ras_mm": [0.0, 0.5 * d, -d]} for d in (4.0, 6.0, 20.0)]
    rows.append({"label": "Atelectasis", "hit": True, "peak_distance_mm": 0.0, "mass_in_mask": 0.5,
                 "mask_fraction": 0.1, "peak_offset_ras_mm": [0.0, 0.0, 0.0]})
    rows.append({"label": "Lung nodule", "hit": True, "peak_distance_mm": 0.0, "mass_in_mask": 0.5,
                 "mask_fraction": 0.1, "peak_offset_ras_mm": [0.0, 0.0, 0.0]})
    per = _summarise_points(rows, [])["per_label"]
    assert per["Atelectasis"]["misses"] == 3 and per["Atelectasis"]["miss_offset_ras_mm"] == [0.0, 3.0, -6.0]
    assert per["Lung nodule"] == {"n": 1, "pointing_game": 1.0, "median_peak_distance_mm": 0.0, "misses": 0}


def test_baselines(setup):
    from training.evaluate import evaluate

    root, _ = setup
    for kind in ("random", "prevalence"):
        rep = evaluate(None, root, split="valid", baseline=kind, heatmaps=True)
        assert rep["baseline"] == kind
        aucs = [r["auroc"] for r in rep["classification"]["per_label"].values() if not np.isnan(r["auroc"])]
        if kind == "prevalence":
            assert all(a == 0.5 for a in aucs)  # a constant score ranks nothing
    # the mask baseline: the heatmaps are the masks' token occupancy (random heatmaps put ~0.3% of their mass there)
    rand = evaluate(None, root, split="valid", baseline="random", heatmaps=True)["heatmaps"]
    oracle = evaluate(None, root, split="valid", baseline="mask", heatmaps=True)["heatmaps"]
    assert oracle["n_volume_labels"] == rand["n_volume_labels"] >= 1
    assert oracle["pointing_game"] > rand["pointing_game"] and oracle["mass_in_mask"] > 10 * rand["mass_in_mask"] > 0


def test_mask_occupancy_is_each_tokens_share_of_the_instances():
    from ctvl.geometry import Volume

    from training.evaluate import mask_occupancy

    arr = np.zeros((4, 8, 8), np.uint8)
    arr[0:2, 0:4, 0:2] = 3  # half of token (0, 0, 0)
    arr[2:4, 4:8, 4:8] = 5  # all of token (1, 1, 1)
    arr[3, 0, 0] = 9  # another label's instance
    affine = np.diag([2.0, 2.0, 3.0, 1.0])  # i (columns) and j at 2 mm, k (slices) at 3 mm
    occ = mask_occupancy(Volume(arr, affine), [3, 5], affine, (4, 8, 8), (2, 4, 4))
    expected = np.zeros((2, 2, 2))
    expected[0, 0, 0], expected[1, 1, 1] = 0.5, 1.0
    np.testing.assert_allclose(occ, expected)


def test_mask_occupancy_on_the_stitched_grid_is_the_token_box_at_every_cell():
    from ctvl.geometry import Volume

    from training.evaluate import mask_occupancy

    rng = np.random.default_rng(0)
    arr = rng.choice([0, 3, 5], size=(4, 8, 8), p=[0.6, 0.2, 0.2]).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    occ = mask_occupancy(Volume(arr, affine), [3], affine, (4, 8, 8), (2, 4, 4), (2, 2, 4))
    assert occ.shape == (4, 4, 8)
    on = arr == 3
    for f in np.ndindex(*occ.shape):  # the box of a token moved by f * p/n voxels, clamped at the far edge
        idx = [np.clip(np.arange(f[a] * s, f[a] * s + p), 0, n - 1) for a, (s, p, n) in enumerate(
            zip((1, 2, 1), (2, 4, 4), arr.shape))]
        assert occ[f] == pytest.approx(on[np.ix_(*idx)].mean())


def test_model_heatmaps_come_on_the_stitched_grid(setup, tmp_path):
    from ctvl.model import CTVLModel, load_weights, save_weights

    from training.data import Preprocess
    from training.evaluate import ModelPredictor, _batches, _dataset, evaluate

    root, weights = setup
    model = load_weights(weights)
    fine = save_weights(CTVLModel(model.config.replace(heatmap_subdivision=(1, 2, 4))), tmp_path / "w")
    stitched = load_weights(fine)
    stitched.load_state_dict(model.state_dict())
    ds = _dataset(root, "valid", Preprocess.from_model_config(model.config), model.config.downsample()[0], None,
                  None, 1)
    batch = next(_batches(ds, 2))
    labs = [[LABELS.index("Lung nodule"), LABELS.index("Atelectasis")], []]
    coarse = ModelPredictor(model, torch.device("cpu"))(batch, labs)
    out = ModelPredictor(stitched, torch.device("cpu"))(batch, labs)
    d, h, w = model.config.token_grid()
    for lab in labs[0]:
        assert out["heat"][0][lab].shape == (d, 2 * h, 4 * w)
        np.testing.assert_allclose(out["heat"][0][lab][:, ::2, ::4], coarse["heat"][0][lab], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["probs"], coarse["probs"])  # classification stays on the tokens
    rep = evaluate(str(fine), root, split="valid", bootstrap=0)
    assert rep["heatmaps"]["n_volume_labels"] == evaluate(str(weights), root, split="valid",
                                                          bootstrap=0)["heatmaps"]["n_volume_labels"]


def test_cli_evaluate_and_export(setup, tmp_path, capsys):
    from training.__main__ import main

    root, weights = setup
    out = tmp_path / "report.json"
    assert main(["evaluate", "--weights", str(weights), "--data", str(root), "--split", "valid", "--out", str(out),
                 "--no-heatmaps"]) == 0
    rep = json.loads(out.read_text())
    assert rep["heatmaps"] == {"n_findings": 0}
    assert "MEAN" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_evaluate_refuses_cuda_without_a_gpu_in_one_line(setup, tmp_path, capsys):
    from training.__main__ import main

    root, weights = setup
    out = tmp_path / "report.json"
    assert main(["evaluate", "--weights", str(weights), "--data", str(root), "--device", "cuda",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0] and not out.exists()


@pytest.mark.parametrize("flag,value,problem", [("--max-volumes", "0", "must be at least 1"),
                                                 ("--batch-size", "-2", "must be at least 1"),
                                                 ("--bootstrap", "many", "expected a whole number")])
def test_cli_evaluate_refuses_counts_out_of_range(tmp_path, capsys, flag, value, problem):
    from training.__main__ import main

    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_:  # argparse: usage line + the error, exit status 2
        main(["evaluate", "--weights", "demo", "--data", str(tmp_path), "--out", str(out), flag, value])
    assert exit_.value.code == 2 and problem in capsys.readouterr().err and not out.exists()


def test_intervals_resample_volumes_and_bracket_the_figures():
    from training.evaluate import intervals
    from training.metrics import mean_auroc

    rng = np.random.default_rng(0)
    names = [f"v{i}" for i in range(40)]
    labels = (rng.random((40, 3)) < 0.5).astype(float)
    probs = rng.random((40, 3)) + 0.5 * labels
    # v0 holds 30 snippets 50 mm off, every other volume one 5 mm off: the median is 5 mm unless a draw holds v0
    # twice (about a quarter of the draws), so the interval spans 5-50 mm; resampling snippets would stay near 5
    loc = [{"volume": "v0", "err_mm": 50.0, "within": False} for _ in range(30)]
    loc += [{"volume": n, "err_mm": 5.0, "within": True} for n in names[1:]]
    points = [{"volume": n, "hit": i % 2 == 0} for i, n in enumerate(names)]
    ci = intervals(names, probs, labels, loc, points, n_boot=500, seed=0)
    assert ci["auroc"][0] < mean_auroc(labels, probs) < ci["auroc"][1]
    assert ci["loc_median_mm"][0] == 5.0 and ci["loc_median_mm"][1] == 50.0  # v0 drawn 0 or >= 2 times
    assert 0 < ci["loc_within_pct"][0] < ci["loc_within_pct"][1] <= 100
    assert ci["pointing_game"][0] < 0.5 < ci["pointing_game"][1]
    assert "40 volumes" in ci["method"]
    assert intervals(names, probs, labels, [], [], n_boot=50)["loc_median_mm"] is None


def test_guided_heatmaps_are_scored_on_the_model_grid(setup, tmp_path, monkeypatch):
    """With heatmap_guidance the label maps lie on the model grid (values in [0, 1]) and the pointing game reads
    them through the model affine: model-grid maps equal to the phantom masks hit every pair whose mask survives
    the coarse test grid (8 mm voxels; a 2-voxel nodule can fall between them)."""
    from ctvl.io import read_volume
    from ctvl.model import CTVLModel, load_weights, save_weights

    import training.evaluate as ev
    from training.data import Preprocess

    root, weights = setup
    torch.manual_seed(0)
    cfg = load_weights(weights).config.replace(mil_disease=True, heatmap_guidance="input_x_gradient")
    path = save_weights(CTVLModel(cfg), tmp_path / "guided")
    ds = ev._dataset(root, "valid", Preprocess.from_model_config(cfg), cfg.downsample()[0], None, None, 1)
    batch = next(ev._batches(ds, 2))
    labs = [[LABELS.index("Lung nodule"), LABELS.index("Atelectasis")], []]
    out = ev.ModelPredictor(load_weights(path), torch.device("cpu"))(batch, labs)
    for lab in labs[0]:
        heat = out["heat"][0][lab]
        assert heat.shape == cfg.input_shape and heat.min() >= 0 and heat.max() <= 1
    assert out["heat"][1] == {}

    gt = ev.load_ground_truth(root, "valid")
    plain_call = ev.ModelPredictor.__call__
    on_grid = []  # one flag per (volume, label) pair: its mask has a voxel on the model grid

    def oracle_call(self, batch, heat_labels):  # the masks on the model grid in place of the guided maps
        out = plain_call(self, batch, heat_labels)
        for b, idx in enumerate(batch["index"]):
            r = ds.records[int(idx)]
            mask = read_volume(ev._mask_path(root, "valid", r.name, gt[r.name]), validate=False)
            for lab in out["heat"][b]:
                values = [int(f["mask_value"]) for f in gt[r.name]["findings"]
                          if f.get("label") == LABELS[lab] and f.get("mask_value")]
                oracle = ev.mask_occupancy(mask, values, np.asarray(ds._info(r)["model_ijk_to_ras"]),
                                           cfg.input_shape, (1, 1, 1))
                out["heat"][b][lab] = oracle
                on_grid.append(bool(oracle.max() > 0))
        return out

    monkeypatch.setattr(ev.ModelPredictor, "__call__", oracle_call)
    h = ev.evaluate(str(path), root, split="valid", bootstrap=0)["heatmaps"]
    assert len(on_grid) == h["n_volume_labels"] and sum(on_grid) >= 3
    assert round(h["pointing_game"] * h["n_volume_labels"]) == sum(on_grid)
