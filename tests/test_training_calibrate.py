"""training.calibrate: the label-grounded depth scores' weight, fitted on a split and written into the weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch


def _row(text, labels, rng, target=None, valid=None):
    from training.calibrate import SnippetScores

    n = len(text)
    return SnippetScores(label="Lung nodule", text=np.array(text, np.float32), labels=np.array(labels, np.float32),
                         valid=np.ones(n, bool) if valid is None else np.array(valid),
                         bin_coord=np.arange(n) * 2.0, n_slices=2 * n,
                         target=rng[0] if target is None else target, slice_range=rng, slice_mm=5.0)


def test_score_weight_and_fit_by_hand():
    from training.calibrate import fit, score_weight

    # the text prefers bin 0, the named label's heatmap bin 2, where the finding is (slices 4-5)
    rows = [_row([2.0, 0.0, 0.0], [0.0, 0.0, 4.0], (4, 5)),
            _row([0.0, 1.0, 0.0, 9.0], [3.0, 0.0, 0.0, 0.0], (2, 2), valid=[True, True, True, False])]
    s0, s1 = score_weight(rows, 0.0), score_weight(rows, 1.0)
    m0 = [math.log(1 / (math.e**2 + 2)), math.log(math.e / (1 + math.e + 1))]  # bin 3 of row 2 is outside the scan
    m1 = [math.log(math.e**4 / (math.e**2 + 1 + math.e**4)), math.log(math.e / (math.e**3 + math.e + 1))]
    assert s0["log_mass_in_range"] == pytest.approx(np.mean(m0))
    assert s1["log_mass_in_range"] == pytest.approx(np.mean(m1))
    # argmax: w=0 -> bins 0 and 1 (slices 0 and 2: 20 mm off, then inside); w=1 -> bins 2 and 0 (inside, 10 mm off)
    assert s0["within_range_pct"] == 50.0 and s0["median_abs_error_mm"] == pytest.approx(10.0)
    assert s1["within_range_pct"] == 50.0 and s1["median_abs_error_mm"] == pytest.approx(5.0)
    out = fit(rows, (0.0, 1.0))
    assert out["locate_label_weight"] == (1.0 if np.mean(m1) > np.mean(m0) else 0.0)
    assert out["n_pairs"] == 2 and out["named_pairs"] == 2 and len(out["grid"]) == 2


def test_calibrate_writes_a_weight_that_evaluate_then_uses(tmp_path, capsys):
    from ctvl.model import CTVLModel, load_weights, save_weights, tiny_config

    from training.__main__ import main
    from training.calibrate import collect, score_weight, write_into
    from training.evaluate import evaluate
    from training.synthetic import write_small_phantom

    torch.set_num_threads(1)
    root = tmp_path / "ph"
    write_small_phantom(root, n=4, seed=2, split="valid", shape=(40, 64, 64))
    torch.manual_seed(0)
    weights = save_weights(CTVLModel(tiny_config().replace(mil_disease=True)), tmp_path / "w")
    out = tmp_path / "calibration.json"
    assert main(["calibrate", "--weights", str(weights), "--data", str(root), "--out", str(out), "--write"]) == 0
    fitted = json.loads(out.read_text())
    assert fitted["n_pairs"] > 0 and fitted["named_pairs"] > 0 and fitted["split"] == "valid"
    best = fitted["locate_label_weight"]
    assert best == max(fitted["grid"], key=lambda t: t["log_mass_in_range"])["weight"]
    assert load_weights(weights).config.locate_label_weight == best
    assert fitted["config"] == {"locate_label_weight": best, "locate_laterality": False}  # what it was fitted under
    assert "<-" in capsys.readouterr().out
    # evaluate's localization with a written weight is the calibration's argmax figures for that weight; a weight
    # of 1000 lets the labels' heatmap peaks decide, which moves the figures of this untrained model
    rows, mc = collect(str(weights), root, "valid")
    figures = {}
    for w in (best, 1000.0):
        write_into(weights, {"locate_label_weight": w})
        rep = evaluate(str(weights), root, split="valid", heatmaps=False, bootstrap=0)["localization"]
        want = score_weight(rows, w, mc.locate_peak_radius)
        assert rep["n_pairs"] == len(rows) == fitted["n_pairs"]
        assert rep["median_abs_error_mm"] == pytest.approx(want["median_abs_error_mm"])
        assert rep["within_range_pct"] == pytest.approx(want["within_range_pct"])
        figures[w] = (want["median_abs_error_mm"], want["within_range_pct"])
    assert figures[best] != figures[1000.0]


def test_cli_calibrate_refuses_missing_weights_in_one_line(tmp_path, capsys):
    from training.__main__ import main

    assert main(["calibrate", "--weights", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
