"""The disease vocabulary: the 18 CT-RATE multi-abnormality labels (exact CSV column names)."""

from __future__ import annotations

import re

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


# Which labels a finding sentence names (report snippets, not prompts): lower-case regular expressions per label.
# Negated sentences are not excluded: use it on snippets that cite an image (a citation goes with a positive
# finding). A ground-glass nodule is a nodule, not an opacity; coronary calcium is not "arterial wall".
_LABEL_PATTERNS: dict[str, str] = {
    "Medical material": r"catheter|pacemaker|\bstents?\b|\bport\b|\btube\b|\bclips?\b|\bwires?\b|prosthe|device|"
                        r"\bdrain\b|medical material",
    "Arterial wall calcification": r"(aort|arter|vascular|atheroscl).*calc|calc.*(aort|arter)|atheroscl",
    "Cardiomegaly": r"cardiomegal|(heart|cardiac) (size )?(is )?enlarged|enlarged (heart|cardiac)",
    "Pericardial effusion": r"pericardi",
    "Coronary artery wall calcification": r"coronar",
    "Hiatal hernia": r"hiat(al|us)",
    "Lymphadenopathy": r"lymph|adenopath",
    "Emphysema": r"emphysem|bulla",
    "Atelectasis": r"atelecta",
    "Lung nodule": r"nodul|\bmass\b",
    "Lung opacity": r"opacit|ground[- ]glass|infiltrat",
    "Pulmonary fibrotic sequela": r"fibro|\bscar",
    "Pleural effusion": r"pleural (effusion|fluid)|effusion.*pleura",
    "Mosaic attenuation pattern": r"mosaic",
    "Peribronchial thickening": r"peribronch|bronchial wall thick",
    "Consolidation": r"consolidat",
    "Bronchiectasis": r"bronchiecta|dilated bronch",
    "Interlobular septal thickening": r"interlobular|\bseptal thicken",
}
# winner -> (loser, the loser's own words that keep it): "ground-glass nodule" is no opacity, "nodule and
# ground-glass opacity" names both
_SUPERSEDES = {"Coronary artery wall calcification": ("Arterial wall calcification", r"aort"),
               "Lung nodule": ("Lung opacity", r"opacit|infiltrat")}


def snippet_labels(text: str) -> tuple[str, ...]:
    """The CT-RATE labels a finding sentence names, in `LABELS` order: 'Ground-glass nodule in the left upper lobe'
    -> ('Lung nodule',). Empty for a sentence that names none."""
    low = text.lower()
    found = {lab for lab, pat in _LABEL_PATTERNS.items() if re.search(pat, low)}
    found -= {loser for winner, (loser, keep) in _SUPERSEDES.items() if winner in found and not re.search(keep, low)}
    return tuple(lab for lab in LABELS if lab in found)


_SIDES = {"right": re.compile(r"\bright\b"), "left": re.compile(r"\bleft\b")}
_BOTH_SIDES = re.compile(r"\bbilateral(ly)?\b|\bboth\b|\beach\b")


def snippet_side(text: str) -> str | None:
    """The patient side a finding sentence names: 'right' or 'left'; None when it names neither, both, or
    'bilateral'. 'Nodule in the right upper lobe' -> 'right'."""
    low = text.lower()
    if _BOTH_SIDES.search(low):
        return None
    named = [side for side, pat in _SIDES.items() if pat.search(low)]
    return named[0] if len(named) == 1 else None


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
