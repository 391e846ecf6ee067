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


# ----------------------------------------------------------------------------- prompt templates
# Noun phrases per label: (with article, for "There is ..."; bare, for "No ...").
_PHRASES: dict[str, tuple[str, str]] = {
    "Medical material": ("medical material such as a tube, catheter or clip", "medical material"),
    "Arterial wall calcification": ("arterial wall calcification", "arterial wall calcification"),
    "Cardiomegaly": ("cardiomegaly", "cardiomegaly"),
    "Pericardial effusion": ("a pericardial effusion", "pericardial effusion"),
    "Coronary artery wall calcification": ("coronary artery calcification", "coronary artery calcification"),
    "Hiatal hernia": ("a hiatal hernia", "hiatal hernia"),
    "Lymphadenopathy": ("lymphadenopathy", "lymphadenopathy"),
    "Emphysema": ("emphysema", "emphysema"),
    "Atelectasis": ("atelectasis", "atelectasis"),
    "Lung nodule": ("a lung nodule", "lung nodule"),
    "Lung opacity": ("a lung opacity", "lung opacity"),
    "Pulmonary fibrotic sequela": ("pulmonary fibrotic sequelae", "pulmonary fibrotic sequelae"),
    "Pleural effusion": ("a pleural effusion", "pleural effusion"),
    "Mosaic attenuation pattern": ("a mosaic attenuation pattern", "mosaic attenuation pattern"),
    "Peribronchial thickening": ("peribronchial thickening", "peribronchial thickening"),
    "Consolidation": ("consolidation", "consolidation"),
    "Bronchiectasis": ("bronchiectasis", "bronchiectasis"),
    "Interlobular septal thickening": ("interlobular septal thickening", "interlobular septal thickening"),
}

POSITIVE_TEMPLATES: tuple[str, ...] = (
    "{label}.",
    "There is {a}.",
    "{Bare} is present.",
    "Findings consistent with {bare}.",
    "Chest CT shows {a}.",
)
NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "No {bare}.",
    "There is no {bare}.",
    "{Bare} is not present.",
    "No evidence of {bare}.",
    "Chest CT shows no {bare}.",
)


def _phrases(label: str) -> tuple[str, str]:
    if label in _PHRASES:
        return _PHRASES[label]
    text = label.strip().rstrip(".")
    return text.lower(), text.lower()


def disease_prompts(label: str) -> tuple[list[str], list[str]]:
    """Positive and negative prompts for a label (one of LABELS, or any free-text finding)."""
    a, bare = _phrases(label)
    fields = {"label": label.strip().rstrip("."), "a": a, "bare": bare, "Bare": bare[:1].upper() + bare[1:]}
    return [t.format(**fields) for t in POSITIVE_TEMPLATES], [t.format(**fields) for t in NEGATIVE_TEMPLATES]


def prompt_table(labels: tuple[str, ...] | list[str] = LABELS) -> dict[str, dict[str, list[str]]]:
    """{label: {"positive": [...], "negative": [...]}}: the content of a weights folder's prompts.json."""
    return {label: dict(zip(("positive", "negative"), disease_prompts(label))) for label in labels}
