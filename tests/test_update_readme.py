"""benchmarks.update_readme: the quality table's cells, from a result file's headline rows."""

from __future__ import annotations

from benchmarks.update_readme import probe_line, quality_section, resolution_line


def _quality() -> dict:
    model = {"auroc": 0.8041, "auroc_pooled": 0.7512, "auroc_mil": None, "R@10": 0.68, "pointing_game": 0.331,
             "loc_median_mm": 11.43,
             "intervals": {"method": "percentile bootstrap over the 100 volumes, 1000 draws, 95%",
                           "auroc": [0.771, 0.836], "loc_median_mm": [9.6, 12.8], "pointing_game": None}}
    prevalence = {"auroc": 0.5, "R@10": 0.12, "pointing_game": 0.0, "loc_median_mm": 52.0}
    mask = {**prevalence, "pointing_game": 0.829}
    per_label = {"per_label": {"Lung nodule": {"auroc": 0.75}}}
    return {"split": "test", "val_split": "valid", "headline": {"model": model, "prevalence": prevalence, "mask": mask},
            "reports": {"model": {"classification": per_label,
                                  "score_branches": {"pooled": {"per_label_auroc": {"Lung nodule": 0.61}}}},
                        "mask": {"heatmaps": {}}}}


def test_model_cells_carry_their_interval_and_the_oracle_only_its_heatmap_rows():
    lines = quality_section(_quality())
    auroc = next(x for x in lines if x.startswith("| mean AUROC"))
    assert auroc.split(" | ")[1:4] == ["0.804 [0.771–0.836]", "0.500", "–"]
    loc = next(x for x in lines if x.startswith("| snippet localization, median"))
    assert "11.4 [9.6–12.8]" in loc
    pointing = next(x for x in lines if x.startswith("| pointing game, focal"))
    assert pointing.split(" | ")[1:4] == ["0.331", "0.000", "0.829"]  # no interval computed: the figure alone
    assert any("95% intervals" in x and "100 volumes" in x for x in lines)


def test_branch_rows_show_the_model_alone_and_a_missing_branch_as_a_dash():
    lines = quality_section(_quality())
    pooled = next(x for x in lines if x.startswith("| … of the pooled zero-shot score alone"))
    assert pooled.split(" | ")[1:4] == ["0.751", "–", "–"]  # baselines have no score branches
    assert next(x for x in lines if x.startswith("| … of the token-level")).split(" | ")[1] == "–"
    nodule = next(x for x in lines if x.startswith("| Lung nodule |"))
    assert nodule.split(" | ")[1:4] == ["0.750", "0.610", "–"]


def test_probe_line_names_the_best_probe_and_the_models_weakest_labels():
    nan = float("nan")
    fp = {"labels": ["A", "B", "C", "D", "E", "F", "G"],
          "model_valid": [0.9, 0.5, 0.95, 0.6, nan, 0.99, 0.7], "model_train": [1.0] * 7,
          "probe_x_valid": [0.8, 0.6, 0.9, 0.5, nan, 0.9, 0.6], "probe_x_train": [1.0] * 7,
          "probe_y_valid": [0.7, 0.55, 0.7, 0.65, nan, 0.8, 0.5], "probe_y_train": [1.0] * 7}
    line = probe_line(fp)
    assert "at most 0.717 (x)" in line and "against the model's 0.773" in line
    # the five weakest by the model's AUROC, a label without one last; each with the best probe on that label
    assert line.endswith("b 0.50 / 0.60, d 0.60 / 0.65, g 0.70 / 0.60, a 0.90 / 0.80, c 0.95 / 0.90.")


def test_resolution_line_shows_each_voxel_source_on_the_short_labels():
    labels = ["Emphysema", "Pulmonary fibrotic sequela", "Bronchiectasis", "Peribronchial thickening"]
    rp = {"labels": labels, "native": [0.9, 0.52, 0.61, 0.62], "model_grid": [0.9, 0.62, 0.70, 0.60],
          "model_grid_antialiased": [1.0, 0.60, 0.60, 0.65]}
    line = resolution_line(rp)
    assert "0.662 on the scans' own voxels, 0.705 on the model grid, 0.713 on the anti-aliased model grid" in line
    assert "pulmonary fibrotic sequela 0.52 / 0.62 / 0.60; bronchiectasis 0.61 / 0.70 / 0.60" in line
    assert "do not read them better (mean change -0.06)" in line
    rp["native"] = [0.9, 0.80, 0.80, 0.80]
    assert "read them better (mean change +0.16)" in resolution_line(rp)


def test_speed_section_shows_the_preprocessing_rows_when_measured():
    from benchmarks.update_readme import speed_section

    run = {"total_s": 8.0}
    main = {"model": "m", "cold": run, "warm": run, "peak_rss_mb_end": 1024.0, "locate_new_ms": 15.0,
            "locate_repeat_ms": 0.3, "heatmap_new_model_ms": 20.0, "heatmap_new_input_ms": 300.0}
    s = {"threads": 2, "main": main, "scaling": [], "colipri": {"skipped": "no"}}
    assert not any("anti-aliased" in row for row in speed_section(s))  # a --quick run measures no preprocessing
    s["preprocess"] = {"plain_s": 0.15, "antialias_s": 0.19, "antialias_smoothing_first_s": 5.7,
                       "blobness_demo_grid_s": 0.1, "blobness_fine_grid_s": 0.82}
    rows = "\n".join(speed_section(s))
    assert "| 0.15 s / 0.19 s / 5.70 s |" in rows and "| 0.10 s / 0.82 s |" in rows
