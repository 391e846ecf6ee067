"""ctvl.scene against the real MRML of slicer-core: geometry round trip, heatmap overlay (rendered by
vtkMRMLSliceLogic headless), slice jumps, table/plot nodes, re-run without duplicates, transactional apply."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from ctvl import scene as sc  # noqa: E402
from ctvl.errors import CTVLInputError  # noqa: E402
from ctvl.geometry import Volume  # noqa: E402
from ctvl.headless import HeadlessViews  # noqa: E402
from ctvl.jobs import BackgroundJob, JobMonitor, JobState  # noqa: E402
from ctvl.prompts import LABELS  # noqa: E402
from ctvl.workflow import AnalysisResults, analyze, find_in_scan  # noqa: E402

SliceHitLike = namedtuple("SliceHitLike", "slice position_mm score")

# ------------------------------------------------------------------------------------------- fixtures


class Views(HeadlessViews):
    """Slicer's three slice views without Qt (ctvl.headless), plus inspection helpers."""

    def node_ids(self) -> set[str]:
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    def views_state(self) -> list[tuple]:
        out = []
        for logic in self.logics.values():
            c = logic.GetSliceCompositeNode()
            out.append((c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity()))
        return out

    def xy_to_ras(self, name: str = "Red") -> np.ndarray:
        return slicer.util.arrayFromVTKMatrix(self.logics[name].GetSliceNode().GetXYToRAS())


@pytest.fixture()
def views() -> Views:
    return Views()


def lps_geometry(spacing=(0.8, 0.7, 2.5), origin=(40.0, 30.0, -60.0)) -> np.ndarray:
    """Axis-aligned LPS (i -> -R, j -> -A, k -> +S) with anisotropic voxels."""
    m = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    m[:3, 3] = origin
    return m


def oblique_geometry() -> np.ndarray:
    angle = np.deg2rad(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    lps = np.diag([-1.0, -1.0, -1.0])  # k toward inferior too
    m = np.eye(4)
    m[:3, :3] = rot @ lps @ np.diag([0.9, 0.6, 3.0])
    m[:3, 3] = [12.5, -7.25, 101.0]
    return m


def make_ct(shape_kji=(24, 40, 48), geometry=None, seed=0) -> tuple[Volume, tuple[int, int, int]]:
    """Air box with a soft-tissue body and one 'lesion' cube; returns the volume and the lesion centre (i, j, k)."""
    rng = np.random.default_rng(seed)
    array = np.full(shape_kji, -1000, dtype=np.int16)
    array[2:-2, 5:-5, 5:-5] = 30 + rng.integers(-20, 20, size=array[2:-2, 5:-5, 5:-5].shape)
    lesion = (34, 12, 15)  # i, j, k
    i, j, k = lesion
    array[k - 1:k + 2, j - 2:j + 3, i - 2:i + 3] = 300
    return Volume(array, geometry if geometry is not None else lps_geometry()), lesion


def lesion_heatmap(ct: Volume, lesion: tuple[int, int, int], sigma: float = 2.0) -> Volume:
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in ct.array.shape], indexing="ij")
    i, j, k = lesion
    heat = np.exp(-(((ii - i) ** 2 + (jj - j) ** 2 + (kk - k) ** 2) / (2 * sigma**2)))
    return ct.with_array(heat.astype(np.float32))


class FakeEncoding:
    """Same methods as ctvl.inference.VolumeEncoding, with a known answer: the lesion of ``make_ct``."""

    def __init__(self, volume: Volume, lesion: tuple[int, int, int]) -> None:
        self.volume, self.lesion = volume, lesion

    def disease_probabilities(self, labels=None):
        probs = {label: 0.05 + 0.01 * n for n, label in enumerate(LABELS)}
        probs["Lung nodule"] = 0.93
        return probs

    def heatmap(self, label_or_text, grid="model"):
        return lesion_heatmap(self.volume, self.lesion)

    def slice_scores(self, text):
        k = self.lesion[2]
        return np.exp(-0.5 * ((np.arange(self.volume.n_slices) - k) / 2.0) ** 2).astype(np.float32)

    def locate(self, text, top_k=5):
        scores = self.slice_scores(text)
        z = self.volume.slice_positions_mm()
        order = np.argsort(-scores)[:top_k]
        return [SliceHitLike(int(k), float(z[k]), float(scores[k])) for k in order]


# ------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("geometry", [lps_geometry(), oblique_geometry()], ids=["lps-anisotropic", "oblique"])
def test_volume_node_round_trip_keeps_exact_geometry(views, geometry):
    ct, _ = make_ct(geometry=geometry)
    node = sc.node_from_volume(views.scene, ct, "ct")
    back = sc.volume_from_node(node, validate=False)
    np.testing.assert_array_equal(back.array, ct.array)
    assert back.array.dtype == np.int16
    np.testing.assert_allclose(back.ijk_to_ras, ct.ijk_to_ras, atol=1e-9)
    # the node reports the same spacing/origin Slicer shows in the Volumes module
    np.testing.assert_allclose(node.GetSpacing(), ct.spacing, atol=1e-9)
    np.testing.assert_allclose(node.GetOrigin(), ct.origin, atol=1e-9)
    # update in place keeps the node, changes voxels and geometry
    other = Volume(np.zeros((5, 6, 7), np.float32), oblique_geometry())
    sc.update_node_from_volume(node, other)
    again = sc.volume_from_node(node, validate=False)
    assert again.array.shape == (5, 6, 7)
    np.testing.assert_allclose(again.ijk_to_ras, other.ijk_to_ras, atol=1e-9)


def test_bad_nodes_give_one_line_messages(views):
    scene = views.scene
    with pytest.raises(CTVLInputError, match="No volume selected"):
        sc.volume_from_node(None)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    slicer.util.updateVolumeFromArray(label, np.zeros((20, 8, 8), np.uint8))
    with pytest.raises(CTVLInputError, match="label map"):
        sc.volume_from_node(label)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((20, 8, 8, 3), np.uint8))
    with pytest.raises(CTVLInputError, match="RGB"):
        sc.volume_from_node(rgb)
    flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "xray")
    slicer.util.updateVolumeFromArray(flat, np.zeros((1, 64, 64), np.int16))
    with pytest.raises(CTVLInputError, match="2D image") as err:
        sc.volume_from_node(flat)
    assert "\n" not in str(err.value)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(CTVLInputError, match="no image data"):
        sc.volume_from_node(empty)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    with pytest.raises(CTVLInputError, match="not a scalar volume"):
        sc.volume_from_node(model)


def test_mr_volume_is_rejected_by_validate_ct(views):
    pytest.importorskip("ctvl.io")
    mr = Volume(np.random.default_rng(0).integers(0, 800, size=(40, 32, 32)).astype(np.int16), lps_geometry())
    node = sc.node_from_volume(views.scene, mr, "T1")
    with pytest.raises(CTVLInputError):
        sc.volume_from_node(node)


# ------------------------------------------------------------------------------------------- heatmap overlay


@pytest.mark.parametrize("geometry", [lps_geometry(), oblique_geometry()], ids=["lps-anisotropic", "oblique"])
def test_heatmap_overlays_the_lesion_in_the_rendered_slice(views, geometry):
    ct, lesion = make_ct(geometry=geometry)
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    heat = sc.show_heatmap(views.scene, ct_node, lesion_heatmap(ct, lesion), "Lung nodule", opacity=0.8,
                           threshold=0.99)  # its strongest 1% coloured
    np.testing.assert_allclose(sc.node_ijk_to_ras(heat), ct.ijk_to_ras, atol=1e-9)
    red = views.logics["Red"]
    comp = red.GetSliceCompositeNode()
    assert comp.GetBackgroundVolumeID() == ct_node.GetID() and comp.GetForegroundVolumeID() == heat.GetID()
    assert comp.GetForegroundOpacity() == pytest.approx(0.8)
    display = heat.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetColorNodeID() == sc.heatmap_color_id(views.scene)

    lesion_ras = ct.ijk_to_ras_points(np.array(lesion, dtype=float))[0]
    red.GetSliceNode().SetOrientation("Axial")
    red.FitSliceToAll()
    sc.jump_to_slice(views.scene, ct_node, lesion[2] if ct.slice_axis_ijk == 2 else 0, ras_point=lesion_ras)
    with_heat = views.render().astype(int)
    comp.SetForegroundOpacity(0.0)
    without = views.render().astype(int)

    # pixel of the lesion centre through XYToRAS (the transform the slice view uses)
    xy_to_ras = views.xy_to_ras()
    ras_to_xy = np.linalg.inv(xy_to_ras)
    x, y = (ras_to_xy @ np.append(lesion_ras, 1.0))[:2]
    x, y = int(round(x)), int(round(y))
    diff = np.abs(with_heat[..., :3] - without[..., :3]).sum(-1)
    assert diff[y, x] > 30, "heatmap not visible at the lesion"
    # the coloured region is where the lesion is, not elsewhere (thresholded away far from the lesion)
    ys, xs = np.nonzero(diff > 30)
    ras_pts = (xy_to_ras @ np.stack([xs, ys, np.zeros_like(xs), np.ones_like(xs)]).astype(float))[:3].T
    dist = np.linalg.norm(ras_pts - lesion_ras, axis=1)
    assert dist.max() < 4.0 * float(np.max(ct.spacing)) * 2.0
    # the heatmap is coloured, the CT is grey
    assert np.ptp(without[y, x, :3]) == 0
    assert np.ptp(with_heat[y, x, :3]) > 20


def test_heatmap_display_opacity_and_threshold_update(views):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    heat = sc.show_heatmap(views.scene, ct_node, lesion_heatmap(ct, lesion), "Lung nodule")
    values = lesion_heatmap(ct, lesion).array
    for q in (0.5, 0.9, sc.HEATMAP_THRESHOLD):  # the cut is the quantile of the voxels; the colours span cut..max
        sc.set_heatmap_display(views.scene, heat, opacity=0.25, threshold=q)
        display = heat.GetDisplayNode()
        cut = float(np.quantile(values, q))
        assert display.GetLowerThreshold() == pytest.approx(cut, rel=1e-5) and display.GetApplyThreshold()
        assert display.GetWindowLevelMin() == pytest.approx(cut, rel=1e-5)
        assert display.GetWindowLevelMax() == pytest.approx(float(values.max()))
        shown = float((values >= display.GetLowerThreshold()).mean())
        assert shown == pytest.approx(1 - q, abs=0.01)
    assert all(s[2] == pytest.approx(0.25) for s in views.views_state())
    sc.set_heatmap_display(views.scene, heat, threshold=0.0)  # 0: every voxel coloured
    assert not heat.GetDisplayNode().GetApplyThreshold()
    flat = sc.show_heatmap(views.scene, ct_node, ct.with_array(np.ones(ct.array.shape, np.float32)), "flat")
    assert flat.GetDisplayNode().GetWindowLevelMax() > flat.GetDisplayNode().GetWindowLevelMin()  # no zero window
    with pytest.raises(CTVLInputError, match="grid"):
        sc.show_heatmap(views.scene, ct_node, Volume(np.zeros((3, 3, 3), np.float32)), "Lung nodule")


# ------------------------------------------------------------------------------------------- slice jumps


@pytest.mark.parametrize("geometry", [lps_geometry(), oblique_geometry()], ids=["lps-anisotropic", "oblique"])
def test_find_jumps_views_to_best_slice(views, geometry):
    ct, lesion = make_ct(geometry=geometry)
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    enc = FakeEncoding(ct, lesion)
    found = find_in_scan(enc, "  nodule in the left lung ")
    assert found.best.slice == lesion[ct.slice_axis_ijk]
    point = sc.jump_to_slice(views.scene, ct_node, found.best.slice, ras_point=found.peak_ras)
    red = views.logics["Red"].GetSliceNode()
    # the point lies on the best slice ...
    ijk = ct.ras_to_ijk_points(point)[0]
    assert ijk[ct.slice_axis_ijk] == pytest.approx(found.best.slice, abs=1e-6)
    # ... every view passes through it (and the axial offset is its RAS S)
    assert red.GetSliceOffset() == pytest.approx(point[2], abs=1e-6)
    for logic in views.logics.values():
        to_ras = slicer.util.arrayFromVTKMatrix(logic.GetSliceNode().GetSliceToRAS())
        normal, origin = to_ras[:3, 2], to_ras[:3, 3]
        assert float(np.dot(point - origin, normal)) == pytest.approx(0.0, abs=1e-6)
    if geometry is lps_geometry or np.allclose(geometry, lps_geometry()):
        assert red.GetSliceOffset() == pytest.approx(found.best.position_mm, abs=1e-6)
        np.testing.assert_allclose(point, ct.ijk_to_ras_points(np.array(lesion, float))[0], atol=1e-6)


def test_jump_to_slice_centre_and_under_transform(views):
    ct, _ = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    for k in (0, 7, ct.n_slices - 1):
        sc.jump_to_slice(views.scene, ct_node, k)
        assert views.logics["Red"].GetSliceNode().GetSliceOffset() == pytest.approx(ct.slice_positions_mm()[k])
    with pytest.raises(CTVLInputError, match="outside"):
        sc.jump_to_slice(views.scene, ct_node, ct.n_slices)
    transform = views.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.array(
        [[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 10.0], [0, 0, 0, 1]])))
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    sc.jump_to_slice(views.scene, ct_node, 3)
    assert views.logics["Red"].GetSliceNode().GetSliceOffset() == pytest.approx(ct.slice_positions_mm()[3] + 10)


# ------------------------------------------------------------------------------------------- tables and plots


def test_probability_table_sorted_and_replaced(views):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    probs = FakeEncoding(ct, lesion).disease_probabilities()
    table = sc.write_probability_table(views.scene, probs, ct_node)
    rows = sc.read_probability_table(table)
    assert len(rows) == 18 and rows[0] == ("Lung nodule", pytest.approx(0.93))
    assert [p for _, p in rows] == sorted(probs.values(), reverse=True)
    levels = table.GetTable().GetColumnByName("Level")
    assert levels.GetValue(0) == "high" and levels.GetValue(17) == "low"
    again = sc.write_probability_table(views.scene, {"Emphysema": 0.5}, ct_node)
    assert again is table and sc.read_probability_table(table) == [("Emphysema", 0.5)]
    assert len(sc.find_result_nodes(views.scene, ct_node, [sc.ROLE_PROBABILITIES])) == 1


def test_score_plot_holds_the_curve(views):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    enc = FakeEncoding(ct, lesion)
    scores, positions = enc.slice_scores("x"), ct.slice_positions_mm()
    chart = sc.write_score_plot(views.scene, scores, positions, "nodule", ct_node)
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    series = chart.GetNthPlotSeriesNode(0)
    table = series.GetTableNode()
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "Score"), scores, rtol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "Position (mm)"), positions)
    assert series.GetXColumnName() == "Slice" and series.GetYColumnName() == "Score"
    assert chart.GetAttribute(sc.LABEL) == "nodule"
    sc.write_score_plot(views.scene, scores[::-1], positions, "effusion", ct_node)
    assert len(sc.find_result_nodes(views.scene, ct_node, [sc.ROLE_CHART, sc.ROLE_SERIES, sc.ROLE_SCORES])) == 3
    with pytest.raises(ValueError):
        sc.write_score_plot(views.scene, scores[:-1], positions, "x", ct_node)


# ------------------------------------------------------------------------------------------- apply / re-run / cancel


def run_analysis(views, ct_node, enc, query="nodule", cancel_at=None):
    volume = sc.volume_from_node(ct_node, validate=False)
    outcome = {}

    def work(progress, cancelled):
        def fake_encode(volume, model, progress=None, cancel=None):
            for n in range(5):
                if cancel_at is not None and n == cancel_at:
                    job.cancel()
                progress(n / 5, "encoding")
            return enc

        return analyze(volume, lambda: object(), progress, cancelled, query=query, encode_fn=fake_encode)

    job = BackgroundJob(work, "analysis")
    monitor = JobMonitor(job.start(),
                         on_done=lambda r: outcome.setdefault("nodes", sc.apply_results(views.scene, ct_node, r[1])),
                         on_error=lambda e, tb: outcome.setdefault("error", e),
                         on_cancelled=lambda: outcome.setdefault("cancelled", True))
    status = monitor.run_until_done(timeout_s=30)
    return status, outcome


def test_rerun_replaces_results_without_duplicates(views):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    enc = FakeEncoding(ct, lesion)
    status, outcome = run_analysis(views, ct_node, enc)
    assert status.state is JobState.SUCCEEDED, outcome
    first = sc.find_result_nodes(views.scene, ct_node)
    assert sorted(n.GetAttribute(sc.ROLE) for n in first) == sorted(
        [sc.ROLE_PROBABILITIES, sc.ROLE_HEATMAP, sc.ROLE_SCORES, sc.ROLE_SERIES, sc.ROLE_CHART])
    n_nodes = views.scene.GetNumberOfNodes()
    heat = outcome["nodes"]["heatmap:Lung nodule"]
    assert views.logics["Red"].GetSliceCompositeNode().GetForegroundVolumeID() == heat.GetID()
    status, outcome = run_analysis(views, ct_node, enc)
    assert status.state is JobState.SUCCEEDED
    assert views.scene.GetNumberOfNodes() == n_nodes
    assert len(sc.find_result_nodes(views.scene, ct_node)) == len(first)
    assert sc.remove_results(views.scene, ct_node) == len(first)
    assert views.logics["Red"].GetSliceCompositeNode().GetForegroundVolumeID() is None


def test_cancel_leaves_scene_unchanged(views):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    before, state = views.node_ids(), views.views_state()
    status, outcome = run_analysis(views, ct_node, FakeEncoding(ct, lesion), cancel_at=2)
    assert status.state is JobState.CANCELLED and outcome == {"cancelled": True}
    assert views.node_ids() == before and views.views_state() == state


def test_failed_apply_rolls_back(views):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    enc = FakeEncoding(ct, lesion)
    sc.apply_results(views.scene, ct_node, AnalysisResults(enc.disease_probabilities()))
    before, state = views.node_ids(), views.views_state()
    bad = AnalysisResults(enc.disease_probabilities(), {"Lung nodule": enc.heatmap("x"),
                                                        "Emphysema": Volume(np.zeros((2, 2, 2), np.float32))})
    with pytest.raises(CTVLInputError):
        sc.apply_results(views.scene, ct_node, bad)
    assert views.node_ids() == before and views.views_state() == state


def test_stored_heatmap_is_shown_again_by_label(views):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    enc = FakeEncoding(ct, lesion)
    nodes = sc.apply_results(views.scene, ct_node, AnalysisResults({}, {"Emphysema": enc.heatmap("x")}))
    for logic in views.logics.values():
        logic.GetSliceCompositeNode().SetForegroundVolumeID(None)
    shown = sc.show_existing_heatmap(views.scene, ct_node, "Emphysema", 0.4, 0.2)
    assert shown is nodes["heatmap:Emphysema"]
    assert views.views_state()[0][1] == shown.GetID()
    assert sc.show_existing_heatmap(views.scene, ct_node, "Cardiomegaly") is None


def test_results_survive_scene_save_and_reload(views, tmp_path):
    ct, lesion = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    enc = FakeEncoding(ct, lesion)
    sc.apply_results(views.scene, ct_node, AnalysisResults(enc.disease_probabilities()))
    table = sc.find_result_nodes(views.scene, ct_node, [sc.ROLE_PROBABILITIES])[0]
    storage = table.CreateDefaultStorageNode()
    views.scene.AddNode(storage)
    table.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "findings.tsv"))
    assert storage.WriteData(table)
    ct_storage = ct_node.CreateDefaultStorageNode()
    views.scene.AddNode(ct_storage)
    ct_node.SetAndObserveStorageNodeID(ct_storage.GetID())
    ct_storage.SetFileName(str(tmp_path / "ct.nrrd"))
    assert ct_storage.WriteData(ct_node)
    views.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert views.scene.Commit()

    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    ct2 = loaded.GetFirstNodeByName("ct")
    tables = sc.find_result_nodes(loaded, ct2, [sc.ROLE_PROBABILITIES])
    assert len(tables) == 1
    assert sc.read_probability_table(tables[0])[0] == ("Lung nodule", pytest.approx(0.93))


def test_phantom_sample_volume(views):
    pytest.importorskip("ctvl.phantom")
    node = sc.add_phantom_volume(views.scene, seed=0)
    volume = sc.volume_from_node(node, validate=False)
    assert volume.n_slices >= 16 and node.GetAttribute("CTVL.Phantom") == "1"


def test_real_inference_end_to_end_with_tiny_model(views):
    """Real ctvl.inference with a tiny randomly initialised model: job -> apply -> find, on a CT node."""
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("ctvl.model")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = model_mod.CTVLModel(model_mod.tiny_config()).eval()
    ct, lesion = make_ct(shape_kji=(24, 40, 48))
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    volume = sc.volume_from_node(ct_node)  # validate_ct passes on the synthetic CT
    progress = []
    job = BackgroundJob(lambda p, c: analyze(volume, lambda: model, p, c, query="nodule in the left lung"))
    outcome = {}
    JobMonitor(job.start(), on_progress=lambda f, m: progress.append(f),
               on_done=lambda r: outcome.setdefault("r", r),
               on_error=lambda e, tb: outcome.setdefault("error", tb)).run_until_done(timeout_s=120)
    assert "error" not in outcome, outcome.get("error")
    encoding, results = outcome["r"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    nodes = sc.apply_results(views.scene, ct_node, results)
    assert len(sc.read_probability_table(nodes["table"])) == len(LABELS)
    heat = nodes[f"heatmap:{results.shown_heatmap}"]
    np.testing.assert_allclose(sc.node_ijk_to_ras(heat), ct.ijk_to_ras)
    assert slicer.util.arrayFromVolume(heat).shape == ct.array.shape
    best = results.hits[0]
    point = sc.jump_to_slice(views.scene, ct_node, best.slice, ras_point=results.peak_ras)
    assert views.logics["Red"].GetSliceNode().GetSliceOffset() == pytest.approx(best.position_mm, abs=1e-4)
    assert point[2] == pytest.approx(ct.slice_positions_mm()[best.slice], abs=1e-4)
