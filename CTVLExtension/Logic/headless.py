"""Slicer's slice views without Qt: a scene with colour tables and Red/Yellow/Green `vtkMRMLSliceLogic`s, whose
blended slice images are exactly what the slice views would display (used by the tests and the docs figure)."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


class HeadlessViews:
    """A headless 'application': colour tables + three slice logics, laid out like Slicer's conventional view."""

    def __init__(self, size: int = 96) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.colors = slicer.vtkMRMLColorLogic()
        self.colors.SetMRMLScene(self.scene)
        self.app = slicer.vtkMRMLApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.logics: dict[str, slicer.vtkMRMLSliceLogic] = {}
        collection = vtk.vtkCollection()
        for name, orientation in VIEWS:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app)
            node = logic.AddSliceNode(name)
            node.SetOrientation(orientation)
            node.SetDimensions(size, size, 1)
            self.logics[name] = logic
            collection.AddItem(logic)
        self.app.SetSliceLogics(collection)

    def fit(self) -> None:
        """Fit every view to its background volume (Slicer's 'reset field of view')."""
        for logic in self.logics.values():
            dims = logic.GetSliceNode().GetDimensions()
            logic.FitSliceToAll(dims[0], dims[1])

    def render(self, name: str = "Red") -> np.ndarray:
        """The blended RGBA slice image [rows = XY y, cols = XY x, 4] that the slice view would show."""
        producer = self.logics[name].GetImageDataConnection().GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(0)
        nx, ny, _ = image.GetDimensions()
        return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1).copy()
