"""Static check of the Slicer module against slicer-core's real classes (CTVLExtension.py cannot be imported
outside Slicer: no slicer.app, qt, ctk or ScriptedLoadableModule there).

Parses CTVLExtension.py and ctvl/scene.py with ``ast`` and checks that every ``slicer.util.X`` exists (and
accepts the keywords used), every ``slicer.X`` / ``slicer.vtkMRMLClass.Constant`` exists, every capitalised
method called on an object exists on some MRML/VTK class, and the .ui file and the widget agree.
Names that only exist in the Slicer application are allow-listed below, each with its reason.
"""

from __future__ import annotations

import ast
import inspect
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
slicer_util = pytest.importorskip("slicer.util")
import vtk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "CTVLExtension" / "CTVLExtension.py"
SCENE = ROOT / "CTVLExtension" / "Logic" / "scene.py"
UI = ROOT / "CTVLExtension" / "Resources" / "UI" / "CTVLExtension.ui"

# slicer.X that exist only inside the Slicer application (not in slicer-core)
GUI_ONLY_SLICER = {
    "app": "qSlicerApplication instance, created by the Slicer executable",
    "mrmlScene": "the application's scene, created by the Slicer executable",
    "modules": "loaded-module registry of the application (slicer.modules.volumerendering, .plots)",
    "packaging": "slicer.packaging.pip_ensure exists from Slicer 5.12 on; guarded with hasattr",
    "i18n": "translation helpers (tr/translate) of the Slicer Python package",
    "parameterNodeWrapper": "typed parameter nodes, part of the application's Python package",
    "ScriptedLoadableModule": "scripted module base classes, part of the application's Python package",
}
# Capitalised calls that are not MRML/VTK methods, with the reason they are fine
NON_MRML_CALLS = {
    "PyTorchUtilsLogic": "class of the PyTorch extension's PyTorchUtils module (guarded import)",
    "SampleDataLogic": "class of Slicer's SampleData module",
    "CTVLExtensionLogic": "this module's logic class",
    "CTVLExtensionParameterNode": "this module's parameter node class",
    "QTimer": "Qt class",
    "QColor": "Qt class",
    "QBrush": "Qt class",
    "QTableWidgetItem": "Qt class",
    "Requirement": "packaging.requirements.Requirement",
    "Path": "pathlib.Path",
    "BackgroundJob": "ctvl.jobs class",
    "JobMonitor": "ctvl.jobs class",
    "ModelCache": "ctvl.workflow class",
    "EncodingCache": "ctvl.workflow class",
    "AnalysisResults": "ctvl.workflow class",
    "CTVLInputError": "ctvl.errors class",
    "CTVLDependencyError": "ctvl.errors class",
    "Volume": "ctvl.geometry class",
}
VTK_CLASSES = ("vtkMatrix4x4", "vtkGeneralTransform", "vtkStringArray", "vtkDoubleArray", "vtkIntArray", "vtkTable",
               "vtkImageData", "vtkCollection", "vtkAbstractArray")


def _method_universe() -> set[str]:
    names: set[str] = set()
    for cls_name in dir(slicer):
        if cls_name.startswith(("vtkMRML", "vtkSlicer")):
            names.update(dir(getattr(slicer, cls_name)))
    for cls_name in VTK_CLASSES:
        names.update(dir(getattr(vtk, cls_name)))
    return names


def _attr_chain(node: ast.AST) -> list[str]:
    chain = []
    while isinstance(node, ast.Attribute):
        chain.insert(0, node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        chain.insert(0, node.id)
        return chain
    return []


def _trees() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in (MODULE, SCENE)}


def test_module_is_python39_syntax():
    ast.parse(MODULE.read_text(encoding="utf-8"), feature_version=(3, 9))
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body), \
        "parameterNodeWrapper evaluates annotations; keep them real (no `from __future__ import annotations`)"
    for node in ast.walk(tree):
        annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
        if annotation is not None:
            assert not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)), \
                f"PEP 604 union in an annotation at line {node.lineno} (not Python 3.9)"


def test_slicer_util_functions_exist_with_the_keywords_used():
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            chain = _attr_chain(node.func) if isinstance(node, ast.Call) else []
            if chain[:2] == ["slicer", "util"] and len(chain) == 3:
                function = getattr(slicer_util, chain[2], None)
                assert function is not None, f"{name}:{node.lineno}: slicer.util.{chain[2]} does not exist"
                params = inspect.signature(function).parameters
                accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
                for keyword in node.keywords:
                    assert accepts_any or keyword.arg in params, \
                        f"{name}:{node.lineno}: slicer.util.{chain[2]} has no keyword {keyword.arg!r}"


def test_slicer_names_and_mrml_constants_exist():
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            chain = _attr_chain(node) if isinstance(node, ast.Attribute) else []
            if len(chain) < 2 or chain[0] != "slicer" or chain[1] == "util":
                continue
            if chain[1] in GUI_ONLY_SLICER:
                if chain[1] == "mrmlScene" and len(chain) >= 3 and chain[2][0].isupper():
                    assert hasattr(slicer.vtkMRMLScene, chain[2]), f"{name}:{node.lineno}: {'.'.join(chain)}"
                continue
            assert hasattr(slicer, chain[1]), f"{name}:{node.lineno}: slicer.{chain[1]} not in slicer-core"
            if len(chain) >= 3:
                assert hasattr(getattr(slicer, chain[1]), chain[2]), f"{name}:{node.lineno}: {'.'.join(chain)}"


def test_capitalised_method_calls_exist_on_mrml_or_vtk_classes():
    universe = _method_universe()
    modules = {"slicer", "vtk", "qt", "ctk", "np", "scene", "workflow", "jobs", "dependencies", "SampleData",
               "PyTorchUtils", "logging", "os", "sys", "importlib", "pathlib", "traceback", "sc"}
    unknown = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):  # every imported module name (top level or inside functions)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules.update((a.asname or a.name).split(".")[0] for a in node.names)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method = node.func.attr
            if not method[:1].isupper() or method in NON_MRML_CALLS:
                continue
            chain = _attr_chain(node.func.value)
            if chain[:2] == ["slicer", "util"]:
                continue  # checked by test_slicer_util_functions_exist_with_the_keywords_used
            if chain and chain[0] in modules and len(chain) == 1:
                continue  # module.Class(...) constructor, checked by the slicer.X test or allow-listed
            if method not in universe:
                unknown.append(f"{name}:{node.lineno}: .{method}()")
    assert not unknown, "methods not found on any MRML/VTK class:\n" + "\n".join(unknown)


def _parameter_fields() -> set[str]:
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "CTVLExtensionParameterNode":
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError("CTVLExtensionParameterNode not found")


def test_ui_file_and_widget_agree():
    root = ET.parse(UI).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("name")
    assert set(bound) == _parameter_fields(), "every parameter has exactly one widget in the .ui"
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    missing = used - set(widgets)
    assert not missing, f"widgets used by CTVLExtensionWidget but absent from the .ui: {sorted(missing)}"
    assert widgets.get("verifySnippetsCollapsibleButton") == "ctkCollapsibleButton"
    # the threshold slider starts where the scene's heatmap display does (the parameter default names it too)
    from ctvl.scene import HEATMAP_THRESHOLD

    slider = next(w for w in root.iter("widget") if w.get("name") == bound["heatmapThreshold"])
    values = {prop.get("name"): prop.findtext("double") for prop in slider.findall("property")}
    assert float(values["value"]) == HEATMAP_THRESHOLD and float(values["maximum"]) == 1.0
    assert "heatmapThreshold: Annotated[float, WithinRange(0.0, 1.0)] = scene.HEATMAP_THRESHOLD" in \
        MODULE.read_text(encoding="utf-8")
    assert widgets.get("verifySnippetsContainer") == "QWidget"
    for cls in {c for c in widgets.values()} - {"QLabel", "QPushButton", "QComboBox", "QLineEdit", "QWidget",
                                                "QCheckBox", "QProgressBar", "QTableWidget", "QListWidget"}:
        assert any(cw.findtext("class") == cls for cw in root.iter("customwidget")), f"{cls} not declared"


def test_scene_imports_only_mrml_vtk_numpy_and_ctvl():
    tree = ast.parse(SCENE.read_text(encoding="utf-8"))
    allowed = {"__future__", "logging", "collections.abc", "numpy", "slicer", "slicer.util", "vtk", "ctvl.errors",
               "ctvl.geometry", "ctvl.workflow", "ctvl.io", "ctvl.phantom", "dataclasses", "typing"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
        else:
            continue
        assert set(names) <= allowed, f"scene.py line {node.lineno} imports {names}"


def test_extension_build_files_name_existing_files():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "find_package(Slicer",
                "add_subdirectory(CTVLExtension)", "Slicer_EXTENSION_CPACK"):
        assert key in top
    for url in re.findall(r"https://raw\.githubusercontent\.com/[^/\s]+/[^/\s]+/[^/\s]+/([^\s\"]+)", top):
        assert (ROOT / url).is_file(), f"EXTENSION icon/screenshot URL names a file the repository lacks: {url}"
    module_cmake = (ROOT / "CTVLExtension" / "CMakeLists.txt").read_text(encoding="utf-8")
    for resource in re.findall(r"Resources/[\w/.]+", module_cmake):
        assert (ROOT / "CTVLExtension" / resource).exists(), resource
    assert (ROOT / "LICENSE.txt").read_text(encoding="utf-8").lstrip().startswith("Apache License")
    from PIL import Image

    assert Image.open(ROOT / "CTVLExtension" / "Resources" / "Icons" / "CTVLExtension.png").size == (128, 128)
