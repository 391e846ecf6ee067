"""Snippet verification in the MRML scene (slicer-core): jump to the mined slice, model-slice fiducial,
"use current slice", snippet heatmap, and a full verify loop writing the annotation file."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from ctvl import annotations as ann  # noqa: E402
from ctvl import scene as sc  # noqa: E402
from ctvl import verify  # noqa: E402
from ctvl.errors import CTVLInputError  # noqa: E402
from ctvl.geometry import Volume  # noqa: E402
from ctvl.headless import HeadlessViews  # noqa: E402


class Views(HeadlessViews):
    """Headless Red/Yellow/Green slice logics on a fresh scene (ctvl.headless)."""

    def __init__(self) -> None:
        super().__init__(size=64)

    def red(self):
        return self.logics["Red"].GetSliceNode()


@pytest.fixture()
def views() -> Views:
    return Views()


def make_ct(n_slices: int = 30, toward_superior: bool = True) -> Volume:
    m = np.diag([-0.8, -0.8, 2.5 if toward_superior else -2.5, 1.0])
    m[:3, 3] = [20.0, 15.0, -40.0]
    array = np.full((n_slices, 24, 24), -1000, dtype=np.int16)
    array[:, 4:-4, 4:-4] = 40
    return Volume(array, m)


class FakeEncoding:
    def __init__(self, volume: Volume, best: int) -> None:
        self.volume, self.best = volume, best

    def locate(self, text, top_k=5):
        z = self.volume.slice_positions_mm()
        from types import SimpleNamespace

        return [SimpleNamespace(slice=self.best, position_mm=float(z[self.best]), score=0.7)][:top_k]

    def heatmap(self, text, grid="model"):
        kk = np.arange(self.volume.n_slices)[:, None, None]
        return self.volume.with_array(np.exp(-((kk - self.best) ** 2) / 8.0) * np.ones(self.volume.array.shape))


def test_fiducial_markups_exist_in_slicer_core(views):
    node = views.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe")
    assert node is not None and node.IsA("vtkMRMLMarkupsFiducialNode")


def test_show_row_jumps_to_mined_and_marks_model_slice(views):
    ct = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    z = ct.slice_positions_mm()
    sc.show_verify_row(views.scene, ct_node, mined_slice=5, model_slice=12, model_score=0.81)
    assert views.red().GetSliceOffset() == pytest.approx(z[5])
    marks = sc.find_result_nodes(views.scene, ct_node, [sc.ROLE_VERIFY_MARK])
    assert len(marks) == 1 and marks[0].IsA("vtkMRMLMarkupsFiducialNode")
    mark = marks[0]
    assert mark.GetNumberOfControlPoints() == 1 and mark.GetNthControlPointLabel(0) == "model: slice 12 (0.81)"
    pos = [0.0, 0.0, 0.0]
    mark.GetNthControlPointPosition(0, pos)
    assert pos[2] == pytest.approx(z[12])
    assert ct.ras_to_ijk_points(pos)[0][2] == pytest.approx(12)
    # next row: the same node is reused; no mined slice -> jump to the model's slice
    sc.show_verify_row(views.scene, ct_node, mined_slice=None, model_slice=20)
    assert len(sc.find_result_nodes(views.scene, ct_node, [sc.ROLE_VERIFY_MARK])) == 1
    assert views.red().GetSliceOffset() == pytest.approx(z[20])
    # no model prediction -> mark removed, still jumps
    sc.show_verify_row(views.scene, ct_node, mined_slice=3, model_slice=None)
    assert sc.find_result_nodes(views.scene, ct_node, [sc.ROLE_VERIFY_MARK]) == []
    assert sc.show_verify_row(views.scene, ct_node, None, None) is None


@pytest.mark.parametrize("toward_superior", [True, False])
def test_current_slice_follows_the_red_view(views, toward_superior):
    ct = make_ct(toward_superior=toward_superior)
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    for k in (0, 9, ct.n_slices - 1):
        sc.jump_to_slice(views.scene, ct_node, k)
        assert sc.current_slice_index(views.scene, ct_node) == k
    z = ct.slice_positions_mm()
    views.red().SetSliceOffset(float(z[4] + 0.4 * (z[5] - z[4])))  # between slices: nearest
    assert sc.current_slice_index(views.scene, ct_node) == 4
    views.red().SetSliceOffset(float(max(z) + 100))
    with pytest.raises(CTVLInputError, match="off the volume"):
        sc.current_slice_index(views.scene, ct_node)
    with pytest.raises(CTVLInputError, match="no such slice view"):
        sc.current_slice_index(views.scene, ct_node, "Blue")


def test_current_slice_under_transform(views):
    ct = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    transform = views.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.array(
        [[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 10.0], [0, 0, 0, 1]])))
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    sc.jump_to_slice(views.scene, ct_node, 7)
    assert sc.current_slice_index(views.scene, ct_node) == 7
    mark = sc.mark_model_slice(views.scene, ct_node, 7)
    assert mark.GetTransformNodeID() == transform.GetID()


def test_snippet_heatmap_overlay(views):
    ct = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    node = sc.show_snippet_heatmap(views.scene, ct_node, FakeEncoding(ct, 11), "nodule in the right lung")
    assert views.logics["Red"].GetSliceCompositeNode().GetForegroundVolumeID() == node.GetID()
    assert int(np.argmax(slicer.util.arrayFromVolume(node)[:, 12, 12])) == 11


def test_verify_loop_in_scene_writes_annotations(views, tmp_path):
    """What the widget does: rows -> select -> jump/mark -> keys -> annotation file -> resume."""
    ct = make_ct()
    ct_node = sc.node_from_volume(views.scene, ct, "ct")
    report = "Nodule in the right upper lobe (series 2, image 3). Effusion on the left (series 2, image 20)."
    rows = verify.rows_from_report(report, ct.n_slices, ct.slices_toward_superior)
    verify.add_model_predictions(rows, FakeEncoding(ct, 27))
    path = tmp_path / "verify.jsonl"
    with ann.AnnotationStore(path, annotator="tester") as store:
        session = verify.VerifySession(store, "ct.nii.gz", "r7", rows, n_slices=ct.n_slices,
                                       on_change=lambda s: sc.show_verify_row(
                                           views.scene, ct_node, s.current.mined_slice, s.current.model_slice))
        session.select(session.index)
        assert views.red().GetSliceOffset() == pytest.approx(ct.slice_positions_mm()[27])  # image 3 -> slice 27
        session.handle_key("A")
        assert views.red().GetSliceOffset() == pytest.approx(ct.slice_positions_mm()[10])  # image 20 -> slice 10
        sc.jump_to_slice(views.scene, ct_node, 12)  # the annotator scrolls to the right slice
        session.handle_key("C", current_slice=lambda: sc.current_slice_index(views.scene, ct_node))
    records = ann.read_records(path)
    assert [(r["status"], r["verified_slice"], r["model_slice"]) for r in records] == [
        ("accepted", 27, 27), ("corrected", 12, 27)]
    assert all(r["volume"] == "ct.nii.gz" and r["report_id"] == "r7" for r in records)
