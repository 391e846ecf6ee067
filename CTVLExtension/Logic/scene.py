"""MRML glue: the only module of `ctvl` that imports Slicer/MRML (works in Slicer and with slicer-core).

Every function takes the ``scene`` (a ``vtkMRMLScene``) or nodes as parameters; nothing here touches Qt,
``slicer.app`` or ``slicer.mrmlScene``. Result nodes carry attributes so a re-run finds and replaces them:

- ``CTVL.Role``: ``probabilities`` (table), ``heatmap`` (float volume), ``slice-scores`` (table),
  ``slice-score-series`` (plot series), ``slice-score-chart`` (plot chart);
- ``CTVL.SourceVolumeID``: the CT node's ID; ``CTVL.Label``: the disease label or query text of a heatmap.

Geometry: result volumes get the CT node's own IJK->RAS and the same parent transform, so they overlay exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import slicer
import slicer.util
import vtk
from ctvl.errors import CTVLInputError
from ctvl.geometry import Volume
from ctvl.workflow import AnalysisResults

log = logging.getLogger(__name__)

ROLE = "CTVL.Role"
SOURCE = "CTVL.SourceVolumeID"
LABEL = "CTVL.Label"
ROLE_PROBABILITIES = "probabilities"
ROLE_HEATMAP = "heatmap"
ROLE_SCORES = "slice-scores"
ROLE_SERIES = "slice-score-series"
ROLE_CHART = "slice-score-chart"
RESULT_ROLES = (ROLE_PROBABILITIES, ROLE_HEATMAP, ROLE_SCORES, ROLE_SERIES, ROLE_CHART)

# Preferred heatmap colour maps, first one present in the scene wins (file-based tables exist only in Slicer).
HEATMAP_COLOR_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
)
PROBABILITY_LEVELS = ((0.7, "high"), (0.4, "moderate"), (0.0, "low"))


# --------------------------------------------------------------------------------------------- volumes


def _matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def node_ijk_to_ras(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The node's own (local) IJK->RAS 4x4 matrix."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _matrix_to_array(matrix)


def check_volume_node(node: slicer.vtkMRMLNode | None) -> None:
    """Raise CTVLInputError unless ``node`` is a 3D scalar (non-label) volume node with image data."""
    if node is None:
        raise CTVLInputError(None, "No volume selected", "Select a CT volume in 'Input volume' or load Sample Data")
    name = node.GetName() or node.GetID()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise CTVLInputError(name, "is a label map, not a CT image", "select the CT volume it was drawn on")
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLDiffusionTensorVolumeNode"):
        raise CTVLInputError(name, "is an RGB/vector volume, not a CT image", "select a scalar CT volume")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise CTVLInputError(name, f"is a {node.GetClassName()}, not a scalar volume", "select a CT volume")
    image = node.GetImageData()
    if image is None:
        raise CTVLInputError(name, "has no image data", "load the volume again")
    if image.GetNumberOfScalarComponents() != 1:
        raise CTVLInputError(name, f"has {image.GetNumberOfScalarComponents()} components per voxel (RGB/vector)",
                             "select a scalar CT volume")
    dims = image.GetDimensions()
    if min(dims) <= 1:
        raise CTVLInputError(name, f"is a 2D image ({dims[0]}x{dims[1]}x{dims[2]} voxels)",
                             "load the whole CT series as one 3D volume")


def volume_from_node(node: slicer.vtkMRMLNode | None, validate: bool = True) -> Volume:
    """Copy a scalar volume node into a ``Volume`` (array [k, j, i], the node's IJK->RAS).

    ``validate`` also runs ``ctvl.io.validate_ct`` (rejects MR, 0..255 images, too few slices, ...).
    The array is a copy, so a worker thread may use it while the scene changes.
    """
    check_volume_node(node)
    transform = node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise CTVLInputError(node.GetName(), "is under a non-linear transform",
                             "harden the transform (Data module) before analysis")
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    volume = Volume(array, node_ijk_to_ras(node))
    if validate:
        from ctvl.io import validate_ct

        validate_ct(volume, node.GetName())
    return volume


def update_node_from_volume(node: slicer.vtkMRMLVolumeNode, volume: Volume) -> slicer.vtkMRMLVolumeNode:
    """Write ``volume``'s voxels and exact IJK->RAS into an existing volume node."""
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(volume.ijk_to_ras, dtype=np.float64)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    return node


def node_from_volume(scene: slicer.vtkMRMLScene, volume: Volume, name: str,
                     class_name: str = "vtkMRMLScalarVolumeNode",
                     attributes: Mapping[str, str] | None = None) -> slicer.vtkMRMLVolumeNode:
    """Add a new volume node holding ``volume`` (exact geometry) with default display nodes."""
    node = scene.AddNewNodeByClass(class_name, name)
    for key, value in (attributes or {}).items():
        node.SetAttribute(key, str(value))
    update_node_from_volume(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


def slice_geometry(node: slicer.vtkMRMLVolumeNode) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """``(ijk_to_ras, dims_ijk, slice_axis_ijk)`` of a volume node without copying voxels."""
    ijk_to_ras = node_ijk_to_ras(node)
    dims = tuple(int(d) for d in node.GetImageData().GetDimensions())
    direction = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    return ijk_to_ras, dims, int(np.argmax(np.abs(direction[2, :])))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- result nodes


def find_result_nodes(scene: slicer.vtkMRMLScene, source_node: slicer.vtkMRMLNode | None = None,
                      roles: Iterable[str] | None = None, label: str | None = None) -> list[slicer.vtkMRMLNode]:
    """Nodes written by ctvl (optionally: for one source volume, of some roles, with one label)."""
    roles = set(roles) if roles is not None else set(RESULT_ROLES)
    found = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node is None or node.GetAttribute(ROLE) not in roles:
            continue
        if source_node is not None and node.GetAttribute(SOURCE) != source_node.GetID():
            continue
        if label is not None and node.GetAttribute(LABEL) != label:
            continue
        found.append(node)
    return found


def _tag(node: slicer.vtkMRMLNode, role: str, source_node: slicer.vtkMRMLNode, label: str | None = None) -> None:
    node.SetAttribute(ROLE, role)
    node.SetAttribute(SOURCE, source_node.GetID())
    if label is not None:
        node.SetAttribute(LABEL, label)


def _get_or_add(scene: slicer.vtkMRMLScene, class_name: str, name: str, role: str,
                source_node: slicer.vtkMRMLNode, label: str | None = None,
                reuse: bool = True) -> slicer.vtkMRMLNode:
    if reuse:
        existing = find_result_nodes(scene, source_node, [role], label)
        if existing:
            existing[0].SetName(name)
            return existing[0]
    node = scene.AddNewNodeByClass(class_name, name)
    _tag(node, role, source_node, label)
    return node


def remove_node(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLNode) -> None:
    """Remove a node with its display and storage nodes."""
    extra = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetNumberOfStorageNodes"):
        extra += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for other in extra:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


def remove_results(scene: slicer.vtkMRMLScene, source_node: slicer.vtkMRMLNode,
                   roles: Iterable[str] | None = None) -> int:
    """Remove the result nodes of ``source_node`` (all roles by default); returns how many."""
    nodes = find_result_nodes(scene, source_node, roles)
    ids = {n.GetID() for n in nodes}
    for composite in _composite_nodes(scene):
        if composite.GetForegroundVolumeID() in ids:
            composite.SetForegroundVolumeID(None)
    for node in nodes:
        remove_node(scene, node)
    return len(nodes)


# --------------------------------------------------------------------------------------------- heatmaps


def _composite_nodes(scene: slicer.vtkMRMLScene) -> list[slicer.vtkMRMLSliceCompositeNode]:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def _slice_nodes(scene: slicer.vtkMRMLScene) -> list[slicer.vtkMRMLSliceNode]:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))]


def heatmap_color_id(scene: slicer.vtkMRMLScene) -> str | None:
    """The first preferred heatmap colour node present in the scene."""
    for color_id in HEATMAP_COLOR_IDS:
        if scene.GetNodeByID(color_id) is not None:
            return color_id
    return None


HEATMAP_THRESHOLD = 0.95  # default share of a heatmap's voxels left transparent: its top 5% are coloured
_QUANTILE_SAMPLES = 1_000_000  # voxels read for the threshold quantile (a 512x512x300 heatmap has 79 million)


def heatmap_cutoff(heatmap_node: slicer.vtkMRMLScalarVolumeNode, threshold: float) -> tuple[float, float]:
    """(value at the ``threshold`` quantile of the heatmap's voxels, maximum); a regular subsample of at most
    `_QUANTILE_SAMPLES` voxels gives the quantile. Quantile, not a fraction of the range: a heatmap's minimum lies
    far outside the body, and a cut at a fraction of the range coloured most of the scan."""
    values = slicer.util.arrayFromVolume(heatmap_node).reshape(-1)
    hi = float(values.max())
    step = max(1, values.size // _QUANTILE_SAMPLES)
    cut = float(np.quantile(values[::step], float(np.clip(threshold, 0.0, 1.0))))
    return min(cut, hi), hi


def set_heatmap_display(scene: slicer.vtkMRMLScene, heatmap_node: slicer.vtkMRMLScalarVolumeNode,
                        opacity: float = 0.5, threshold: float = HEATMAP_THRESHOLD) -> None:
    """Colour map over [cut, max] with the voxels below the cut transparent, the cut being the ``threshold``
    quantile of the heatmap's values (0.95: its top 5% coloured; 0: all), and foreground ``opacity`` in every slice
    view that shows this heatmap."""
    display = heatmap_node.GetDisplayNode()
    if display is None:
        heatmap_node.CreateDefaultDisplayNodes()
        display = heatmap_node.GetDisplayNode()
    cut, hi = heatmap_cutoff(heatmap_node, threshold)
    top = hi if hi > cut else cut + 1e-6
    with slicer.util.NodeModify(display):
        color_id = heatmap_color_id(scene)
        if color_id:
            display.SetAndObserveColorNodeID(color_id)
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(cut, top)
        display.SetAutoThreshold(False)
        display.SetLowerThreshold(cut)
        display.SetUpperThreshold(top + 1.0)
        display.SetApplyThreshold(threshold > 0)
        display.SetInterpolate(True)
    for composite in _composite_nodes(scene):
        if composite.GetForegroundVolumeID() == heatmap_node.GetID():
            composite.SetForegroundOpacity(float(np.clip(opacity, 0.0, 1.0)))


def show_heatmap(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLScalarVolumeNode, heatmap_volume: Volume,
                 label: str, opacity: float = 0.5, threshold: float = HEATMAP_THRESHOLD,
                 reuse: bool = True) -> slicer.vtkMRMLScalarVolumeNode:
    """Write (or update) the heatmap node of ``label`` and show it as the foreground over ``ct_node``."""
    if heatmap_volume.array.shape[:3] != tuple(reversed(ct_node.GetImageData().GetDimensions())):
        raise CTVLInputError(label, "heatmap is not on the CT's voxel grid", "compute it with grid='input'")
    name = f"{ct_node.GetName()} - {label} heatmap"
    node = _get_or_add(scene, "vtkMRMLScalarVolumeNode", name, ROLE_HEATMAP, ct_node, label, reuse)
    update_node_from_volume(node, heatmap_volume.with_array(heatmap_volume.array.astype(np.float32, copy=False)))
    node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    for composite in _composite_nodes(scene):
        with slicer.util.NodeModify(composite):
            composite.SetBackgroundVolumeID(ct_node.GetID())
            composite.SetForegroundVolumeID(node.GetID())
    set_heatmap_display(scene, node, opacity, threshold)
    return node


# --------------------------------------------------------------------------------------------- slices


def slice_ras_point(ct_node: slicer.vtkMRMLVolumeNode, slice_index: int,
                    ras_point: Sequence[float] | None = None) -> np.ndarray:
    """Local RAS of a point on slice ``slice_index``: the slice centre, or ``ras_point`` moved onto the slice."""
    check_volume_node(ct_node)
    ijk_to_ras, dims, axis = slice_geometry(ct_node)
    if not 0 <= int(slice_index) < dims[axis]:
        raise CTVLInputError(ct_node.GetName(), f"slice {slice_index} is outside 0..{dims[axis] - 1}",
                             "pick a slice inside the volume")
    if ras_point is None:
        ijk = (np.array(dims, dtype=np.float64) - 1.0) / 2.0
    else:
        ras = np.append(np.asarray(ras_point, dtype=np.float64)[:3], 1.0)
        ijk = (np.linalg.inv(ijk_to_ras) @ ras)[:3]
    ijk[axis] = float(slice_index)
    return (ijk_to_ras @ np.append(ijk, 1.0))[:3]


def jump_to_slice(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLVolumeNode, slice_index: int,
                  ras_point: Sequence[float] | None = None) -> np.ndarray:
    """Move every slice view onto slice ``slice_index`` of ``ct_node``, centred on ``ras_point`` (local RAS,
    projected onto that slice) or on the slice centre. Returns the world RAS point the views are centred on.

    For an axial view of an axis-aligned CT the slice offset equals the slice's RAS S (``position_mm``).
    """
    point = slice_ras_point(ct_node, slice_index, ras_point)
    transform = ct_node.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkGeneralTransform()
        transform.GetTransformToWorld(to_world)
        point = np.array(to_world.TransformPoint(*(float(c) for c in point)), dtype=np.float64)
    for slice_node in _slice_nodes(scene):
        slice_node.JumpSliceByCentering(float(point[0]), float(point[1]), float(point[2]))
    return point


# --------------------------------------------------------------------------------------------- tables, plots


def probability_level(probability: float) -> str:
    """Colour cue for a probability: 'high' / 'moderate' / 'low'."""
    for bound, level in PROBABILITY_LEVELS:
        if probability >= bound:
            return level
    return "low"


def _set_columns(table_node: slicer.vtkMRMLTableNode, columns: Sequence[tuple[str, vtk.vtkAbstractArray]]) -> None:
    table = table_node.GetTable()
    with slicer.util.NodeModify(table_node):
        table.Initialize()
        for name, array in columns:
            array.SetName(name)
            table.AddColumn(array)
        table_node.Modified()


def write_probability_table(scene: slicer.vtkMRMLScene, probs: Mapping[str, float],
                            source_node: slicer.vtkMRMLNode, reuse: bool = True) -> slicer.vtkMRMLTableNode:
    """Table node 'Finding | Probability | Level | Bar', sorted by probability (highest first)."""
    table_node = _get_or_add(scene, "vtkMRMLTableNode", f"{source_node.GetName()} - CTVL findings",
                             ROLE_PROBABILITIES, source_node, reuse=reuse)
    names, values, levels, bars = vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkStringArray(), \
        vtk.vtkStringArray()
    for label, p in sorted(probs.items(), key=lambda item: (-float(item[1]), item[0])):
        names.InsertNextValue(label)
        values.InsertNextValue(float(p))
        levels.InsertNextValue(probability_level(float(p)))
        bars.InsertNextValue("█" * int(round(float(p) * 10)) + "░" * (10 - int(round(float(p) * 10))))
    _set_columns(table_node, [("Finding", names), ("Probability", values), ("Level", levels), ("Bar", bars)])
    table_node.SetColumnDescription("Probability", "zero-shot probability from the vision-language model")
    table_node.SetColumnDescription("Level", "high >= 0.7 > moderate >= 0.4 > low")
    table_node.SetUseColumnNameAsColumnHeader(True)
    return table_node


def read_probability_table(table_node: slicer.vtkMRMLTableNode) -> list[tuple[str, float]]:
    """``[(label, probability), ...]`` in table order."""
    table = table_node.GetTable()
    names, values = table.GetColumnByName("Finding"), table.GetColumnByName("Probability")
    if names is None or values is None:
        return []
    return [(names.GetValue(r), float(values.GetValue(r))) for r in range(table.GetNumberOfRows())]


def write_score_plot(scene: slicer.vtkMRMLScene, scores: Sequence[float], positions: Sequence[float], text: str,
                     source_node: slicer.vtkMRMLNode, reuse: bool = True) -> slicer.vtkMRMLPlotChartNode:
    """Score vs slice position for ``text``: a table (Slice, Position (mm), Score), a series and a chart node."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1)
    if scores.shape != positions.shape:
        raise ValueError(f"{len(scores)} scores for {len(positions)} positions")
    base = source_node.GetName()
    table_node = _get_or_add(scene, "vtkMRMLTableNode", f"{base} - CTVL slice scores", ROLE_SCORES,
                             source_node, reuse=reuse)
    index, pos, score = vtk.vtkIntArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray()
    for k, (p, s) in enumerate(zip(positions, scores)):
        index.InsertNextValue(k)
        pos.InsertNextValue(float(p))
        score.InsertNextValue(float(s))
    _set_columns(table_node, [("Slice", index), ("Position (mm)", pos), ("Score", score)])
    table_node.SetAttribute(LABEL, text)

    series = _get_or_add(scene, "vtkMRMLPlotSeriesNode", f"'{text}'", ROLE_SERIES, source_node, reuse=reuse)
    series.SetAttribute(LABEL, text)
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName("Slice")
    series.SetYColumnName("Score")
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    series.SetColor(0.9, 0.4, 0.1)

    chart = _get_or_add(scene, "vtkMRMLPlotChartNode", f"{base} - CTVL score vs slice", ROLE_CHART, source_node,
                        reuse=reuse)
    chart.SetAttribute(LABEL, text)
    chart.RemoveAllPlotSeriesNodeIDs()
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"'{text}': score per slice")
    chart.SetXAxisTitle("Slice index")
    chart.SetYAxisTitle("Score")
    chart.SetLegendVisibility(False)
    return chart


# --------------------------------------------------------------------------------------------- transaction


def _composite_state(scene: slicer.vtkMRMLScene) -> list[tuple[slicer.vtkMRMLNode, str, str, float]]:
    return [(c, c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
            for c in _composite_nodes(scene)]


def _restore_composite_state(state: list[tuple[slicer.vtkMRMLNode, str, str, float]]) -> None:
    for composite, background, foreground, opacity in state:
        composite.SetBackgroundVolumeID(background)
        composite.SetForegroundVolumeID(foreground)
        composite.SetForegroundOpacity(opacity)


def apply_results(scene: slicer.vtkMRMLScene, source_node: slicer.vtkMRMLScalarVolumeNode, results: AnalysisResults,
                  opacity: float = 0.5, threshold: float = HEATMAP_THRESHOLD) -> dict[str, slicer.vtkMRMLNode]:
    """Write all results of one run as new nodes, then drop the previous run's nodes of the same roles.

    Transactional: if anything fails, the nodes added so far are removed and the views restored, so the scene
    is as it was. Returns ``{"table": ..., "heatmap:<label>": ..., "chart": ...}``.
    """
    check_volume_node(source_node)
    roles = {ROLE_PROBABILITIES} if results.probabilities else set()
    if results.heatmaps:
        roles.add(ROLE_HEATMAP)
    if results.query is not None:
        roles |= {ROLE_SCORES, ROLE_SERIES, ROLE_CHART}
    old = find_result_nodes(scene, source_node, roles)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    views = _composite_state(scene)
    written: dict[str, slicer.vtkMRMLNode] = {}
    try:
        if results.probabilities:
            written["table"] = write_probability_table(scene, results.probabilities, source_node, reuse=False)
        for label, heatmap in results.heatmaps.items():
            written[f"heatmap:{label}"] = show_heatmap(scene, source_node, heatmap, label, opacity, threshold,
                                                       reuse=False)
        shown = results.shown_heatmap
        if shown is not None and f"heatmap:{shown}" in written:
            _show_node(scene, source_node, written[f"heatmap:{shown}"], opacity, threshold)
        if results.query is not None:
            if results.slice_scores is None or results.slice_positions is None:
                raise ValueError("query results need slice_scores and slice_positions")
            written["chart"] = write_score_plot(scene, results.slice_scores, results.slice_positions,
                                                results.query, source_node, reuse=False)
    except BaseException:
        after = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in after:
            if node is not None and node.GetID() not in before and node.GetScene() is scene:
                scene.RemoveNode(node)
        _restore_composite_state(views)
        raise
    old_ids = {n.GetID() for n in old}
    for composite in _composite_nodes(scene):
        if composite.GetForegroundVolumeID() in old_ids:
            composite.SetForegroundVolumeID(None)
    for node in old:
        remove_node(scene, node)
    return written


def _show_node(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLNode, heatmap_node: slicer.vtkMRMLNode,
               opacity: float, threshold: float) -> None:
    for composite in _composite_nodes(scene):
        composite.SetBackgroundVolumeID(ct_node.GetID())
        composite.SetForegroundVolumeID(heatmap_node.GetID())
    set_heatmap_display(scene, heatmap_node, opacity, threshold)


def show_existing_heatmap(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLNode, label: str,
                          opacity: float = 0.5, threshold: float = HEATMAP_THRESHOLD) -> slicer.vtkMRMLNode | None:
    """Show the stored heatmap node of ``label`` (e.g. after a scene reload); None if there is none."""
    nodes = find_result_nodes(scene, ct_node, [ROLE_HEATMAP], label)
    if not nodes:
        return None
    _show_node(scene, ct_node, nodes[0], opacity, threshold)
    return nodes[0]


# --------------------------------------------------------------------------------------------- sample data


def add_phantom_volume(scene: slicer.vtkMRMLScene, seed: int = 0, name: str = "CTVLChestPhantom"
                       ) -> slicer.vtkMRMLScalarVolumeNode:
    """Generate the synthetic chest CT locally (``ctvl.phantom``, no download) and add it as a volume node."""
    from ctvl.phantom import generate_case

    case = generate_case(seed)
    volume = case.volume.with_array(np.asarray(case.volume.array).astype(np.int16, copy=False))
    node = node_from_volume(scene, volume, name, attributes={"CTVL.Phantom": "1"})
    report = getattr(case, "report", None) or {}
    if isinstance(report, dict) and report.get("Findings_EN"):
        node.SetAttribute("CTVL.ReportFindings", str(report["Findings_EN"]))
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(1500.0, -500.0)  # lung window
    return node


# --- snippet verification ---
# Reserved for the snippet-verification workflow (owner: annotations engineer). Do not edit above this line
# from that workflow, and keep its functions below this marker.

ROLE_VERIFY_MARK = "verify-model-slice"


def _verify_mark_node(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLVolumeNode,
                      create: bool = True) -> slicer.vtkMRMLMarkupsFiducialNode | None:
    nodes = find_result_nodes(scene, ct_node, [ROLE_VERIFY_MARK])
    if nodes or not create:
        return nodes[0] if nodes else None
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{ct_node.GetName()} - model slice")
    _tag(node, ROLE_VERIFY_MARK, ct_node)
    node.CreateDefaultDisplayNodes()
    node.SetLocked(True)  # a marker, not something the annotator should drag
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(1.0, 0.85, 0.0)
        display.SetColor(1.0, 0.85, 0.0)
    return node


def mark_model_slice(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLVolumeNode, slice_index: int | None,
                     label: str = "model") -> slicer.vtkMRMLMarkupsFiducialNode | None:
    """Show the model's predicted slice as one locked fiducial at that slice's centre (reused per CT node).

    ``slice_index=None`` removes the mark. Returns the markups node (None when removed).
    """
    if slice_index is None:
        remove_verify_marks(scene, ct_node)
        return None
    point = slice_ras_point(ct_node, int(slice_index))
    node = _verify_mark_node(scene, ct_node)
    node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    with slicer.util.NodeModify(node):
        node.RemoveAllControlPoints()
        node.AddControlPoint(float(point[0]), float(point[1]), float(point[2]), label)
    return node


def remove_verify_marks(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLVolumeNode) -> None:
    """Remove the model-slice mark of ``ct_node`` (e.g. when the verification session closes)."""
    for node in find_result_nodes(scene, ct_node, [ROLE_VERIFY_MARK]):
        remove_node(scene, node)


def show_verify_row(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLVolumeNode, mined_slice: int | None,
                    model_slice: int | None, model_score: float | None = None) -> np.ndarray | None:
    """Jump the slice views to the mined slice (or to the model's when there is none) and mark the model's slice.

    Returns the world RAS point the views are centred on (None if neither slice is known).
    """
    label = "model" if model_slice is None else f"model: slice {model_slice}"
    if model_score is not None:
        label += f" ({model_score:.2f})"
    mark_model_slice(scene, ct_node, model_slice, label)
    target = mined_slice if mined_slice is not None else model_slice
    if target is None:
        return None
    return jump_to_slice(scene, ct_node, int(target))


def current_slice_index(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLVolumeNode,
                        layout_name: str = "Red") -> int:
    """The slice of ``ct_node`` under the centre of slice view ``layout_name`` (for "Correct: use current slice").

    Raises CTVLInputError when there is no such view or the view is off the volume.
    """
    check_volume_node(ct_node)
    view = next((n for n in _slice_nodes(scene) if n.GetLayoutName() == layout_name), None)
    if view is None:
        raise CTVLInputError(layout_name, "no such slice view", "show the Red slice view")
    slice_to_ras = _matrix_to_array(view.GetSliceToRAS())
    point = slice_to_ras[:3, 3]
    transform = ct_node.GetParentTransformNode()
    if transform is not None:
        from_world = vtk.vtkGeneralTransform()
        transform.GetTransformFromWorld(from_world)
        point = np.array(from_world.TransformPoint(*(float(c) for c in point)), dtype=np.float64)
    ijk_to_ras, dims, axis = slice_geometry(ct_node)
    ijk = (np.linalg.inv(ijk_to_ras) @ np.append(point, 1.0))[:3]
    index = int(np.floor(ijk[axis] + 0.5))
    if not 0 <= index < dims[axis]:
        raise CTVLInputError(ct_node.GetName(), f"the {layout_name} view is off the volume (slice {index})",
                             "scroll the view onto the volume")
    return index


def show_snippet_heatmap(scene: slicer.vtkMRMLScene, ct_node: slicer.vtkMRMLScalarVolumeNode, encoding,
                         snippet: str, opacity: float = 0.5, threshold: float = HEATMAP_THRESHOLD
                         ) -> slicer.vtkMRMLScalarVolumeNode:
    """Overlay the heatmap of ``snippet`` (from a `ctvl.inference.VolumeEncoding` of this CT) on the views."""
    heatmap = encoding.heatmap(snippet, grid="input")
    return show_heatmap(scene, ct_node, heatmap, snippet, opacity=opacity, threshold=threshold)
