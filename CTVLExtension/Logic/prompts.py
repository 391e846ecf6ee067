"""The disease vocabulary: the 18 CT-RATE multi-abnormality labels (exact CSV column names)."""

from __future__ import annotations

LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)


def label_slug(label: str) -> str:
    """File-name-safe form of a label: 'Lung nodule' -> 'lung_nodule'."""
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")
