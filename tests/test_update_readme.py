"""benchmarks.update_readme: the quality table's cells, from a result file's headline rows."""

from __future__ import annotations

from benchmarks.update_readme import quality_section


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
