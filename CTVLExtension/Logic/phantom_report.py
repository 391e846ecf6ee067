"""CT-RATE-style report text for a phantom case: varied wording, stated negatives, image references.

Image numbers follow the phantom convention: image 1 = the most superior slice (see `ctvl.phantom`).
"""

from __future__ import annotations

import numpy as np

SINGLE_REF = ["(series {s}, image {i})", "(se {s} im {i})", "(image {i} of series {s})", "({s}:{i})",
              "(Se {s} Im {i})", "(ser {s} img {i})", "(image #{i})", "(image {i})", "({s}/{i})",
              "on image {i} of series {s}", "(series {s} image {i})", "(Series {s}, Image {i})"]
RANGE_REF = ["(images {a} through {b})", "(series {s}, images {a}-{b})", "(se {s} im {a}-{b})",
             "on images {a} to {b}", "(series {s}, images {a} through {b})"]
FOCAL = {"Lung nodule", "Consolidation", "Atelectasis", "Lymphadenopathy", "Pleural effusion", "Hiatal hernia",
         "Medical material", "Lung opacity", "Pericardial effusion", "Pulmonary fibrotic sequela", "Bronchiectasis",
         "Coronary artery wall calcification", "Arterial wall calcification"}
RANGE_OK = {"Pleural effusion", "Consolidation", "Lung opacity", "Atelectasis", "Emphysema", "Bronchiectasis",
            "Interlobular septal thickening", "Pericardial effusion", "Peribronchial thickening"}

NEGATIVES = {
    "Pleural effusion": ["No pleural effusion.", "No pleural effusion was detected.",
                         "There is no pleural effusion or thickening."],
    "Pericardial effusion": ["Pericardial effusion-thickening was not observed.", "No pericardial effusion."],
    "Cardiomegaly": ["Heart size is normal.", "Heart contour and size are normal.",
                     "Cardiac size is within normal limits."],
    "Lymphadenopathy": ["No mediastinal or hilar lymphadenopathy.",
                        "No lymph node in pathological size and appearance was detected in the mediastinum."],
    "Lung nodule": ["No nodule or mass was seen in either lung.", "No pulmonary nodule was detected."],
    "Consolidation": ["No consolidation.", "There is no infiltration or consolidation in the lung parenchyma."],
    "Emphysema": ["No emphysematous change.", "No emphysema."],
    "Hiatal hernia": ["No hiatal hernia.", "Esophagus is normal in calibre; no hiatal hernia."],
    "Medical material": [],
    "Arterial wall calcification": ["Thoracic aorta diameter is normal with no wall calcification."],
    "Coronary artery wall calcification": ["No coronary artery calcification."],
    "Atelectasis": ["No atelectasis."],
    "Lung opacity": ["No ground-glass opacity.", "No active infiltration in the lungs."],
    "Bronchiectasis": ["No bronchiectasis."],
}
NORMAL = ["Trachea and both main bronchi are patent.", "Trachea, both main bronchi are open.",
          "Mediastinal main vascular structures are of normal calibre.", "Esophagus calibre is normal.",
          "No upper abdominal abnormality in the sections.", "Bone structures are unremarkable.",
          "No lytic or destructive lesion in the bones within the field of view."]
CLINICAL = ["Not given.", "Cough.", "Shortness of breath.", "Fever, cough.", "Chest pain.", "Follow-up.",
            "Dyspnea.", "Malignancy screening.", "Chronic obstructive pulmonary disease follow-up.", "Trauma."]
TECHNIQUE = ["Non-contrast images were obtained in the axial plane with {t} mm section thickness.",
             "Thorax CT without contrast, axial {t} mm sections.",
             "Non-contrast chest CT was performed; axial images were reconstructed at {t} mm."]


def _lobe(f) -> str:
    if f.lobe is None or f.side is None or f.side == "bilateral":
        return ""
    lobe = "upper" if f.lobe == "middle" and f.side == "left" else f.lobe
    return f"{f.side} {lobe} lobe"


def _loc(f, rng) -> str:
    lobe = _lobe(f)
    if lobe:
        return str(rng.choice([f"in the {lobe}", f"in the {lobe} of the lung".replace(" lobe of the lung", " lobe")]))
    if f.side in ("right", "left"):
        return f"in the {f.side} lung" if rng.random() < 0.5 else f"on the {f.side}"
    return "bilaterally" if f.side == "bilateral" else ""


def _sentence(f, rng) -> str:
    d = f.details
    sz = f"{f.size_mm:.0f} mm" if f.size_mm else ""
    loc = _loc(f, rng)
    lab = f.label
    pick = lambda opts: str(rng.choice(opts))  # noqa: E731
    if lab == "Lung nodule":
        kind = d.get("type", "solid")
        return pick([f"A {sz} {kind} nodule is seen {loc} {{ref}}.",
                     f"{kind.capitalize()} nodule measuring {sz} {loc} {{ref}}.",
                     f"There is a {sz} {kind} pulmonary nodule {loc} {{ref}}.", f"Nodule {loc}, {sz}, {kind} {{ref}}."])
    if lab == "Consolidation":
        return pick([f"Consolidation with air bronchograms {loc} {{ref}}.",
                     f"There is an area of consolidation {loc} measuring about {sz} {{ref}}.",
                     f"Airspace consolidation is noted {loc} {{ref}}."])
    if lab == "Lung opacity":
        return pick([f"Ground-glass opacity {loc} {{ref}}.",
                     f"A patchy ground glass density area is seen {loc} {{ref}}.",
                     f"Increased density consistent with ground-glass opacity {loc} {{ref}}."])
    if lab == "Atelectasis":
        kind = "linear" if d.get("type") == "linear" else "subsegmental"
        return pick([f"{kind.capitalize()} atelectasis {loc} {{ref}}.", f"There is {kind} atelectasis {loc} {{ref}}.",
                     f"Atelectatic changes are seen {loc} {{ref}}."])
    if lab == "Pleural effusion":
        size = d.get("size", "small")
        return pick([f"{size.capitalize()} pleural effusion on the {f.side} {{ref}}.",
                     f"There is a {size} {f.side} pleural effusion {{ref}}, measuring {sz} in thickness.",
                     f"{f.side.capitalize()}-sided {size} pleural effusion {{ref}}."])
    if lab == "Emphysema":
        kind = d.get("type", "centrilobular")
        return pick([f"{kind.capitalize()} emphysematous changes in both lungs {{ref}}.",
                     f"{kind.capitalize()} emphysema is present {{ref}}.",
                     f"There are {kind} emphysema areas {{ref}}."])
    if lab == "Mosaic attenuation pattern":
        return pick(["Mosaic attenuation pattern in both lungs.", "There is a mosaic attenuation pattern.",
                     "Heterogeneous lung attenuation with a mosaic pattern."])
    if lab == "Pulmonary fibrotic sequela":
        return pick([f"Fibrotic sequelae {loc} {{ref}}.", f"Linear fibrotic bands {loc} {{ref}}.",
                     f"Parenchymal fibrotic changes are seen {loc} {{ref}}."])
    if lab == "Interlobular septal thickening":
        return pick(["Interlobular septal thickening in the lower lobes {ref}.",
                     "Thickening of the interlobular septa is seen bilaterally {ref}.",
                     "Subpleural interlobular septal thickening {ref}."])
    if lab == "Bronchiectasis":
        return pick([f"Cylindrical bronchiectasis {loc} {{ref}}.", f"Bronchiectatic changes {loc} {{ref}}.",
                     f"Dilated bronchi consistent with bronchiectasis {loc} {{ref}}."])
    if lab == "Peribronchial thickening":
        return pick([f"Peribronchial thickening {loc} {{ref}}.", f"Bronchial wall thickening is noted {loc} {{ref}}."])
    if lab == "Cardiomegaly":
        return pick(["Cardiomegaly.", "The heart is enlarged.", "Heart size is increased (cardiomegaly).",
                     f"Cardiomegaly with a transverse cardiac diameter of {sz}."])
    if lab == "Pericardial effusion":
        return pick([f"Pericardial effusion measuring {sz} {{ref}}.",
                     f"There is pericardial effusion up to {sz} {{ref}}.",
                     f"Fluid in the pericardial space, {sz} thick {{ref}}."])
    if lab == "Arterial wall calcification":
        return pick(["Atherosclerotic calcifications in the aortic wall {ref}.",
                     "Calcific plaques are seen in the wall of the thoracic aorta {ref}.",
                     "Aortic wall calcification {ref}."])
    if lab == "Coronary artery wall calcification":
        return pick(["Coronary artery calcification {ref}.", "Calcific plaques in the coronary arteries {ref}.",
                     "Calcification of the coronary artery walls {ref}."])
    if lab == "Hiatal hernia":
        return pick([f"Hiatal hernia measuring {sz} {{ref}}.", f"A {sz} sliding hiatal hernia is seen {{ref}}.",
                     "Hiatal hernia {ref}."])
    if lab == "Lymphadenopathy":
        st = d.get("station", "mediastinal")
        return pick([f"Enlarged {st} lymph node with a short axis of {sz} {{ref}}.",
                     f"Lymphadenopathy in the {st} station, {sz} {{ref}}.",
                     f"A {sz} lymph node is seen in the {st} region {{ref}}."])
    if lab == "Medical material":
        kind = d.get("type", "device")
        side = f" on the {f.side}" if f.side else ""
        return pick([f"A {kind}{side} is noted {{ref}}.", f"{kind.capitalize()}{side} {{ref}}.",
                     f"Status post {kind} placement{side} {{ref}}."])
    return f"{lab} {{ref}}."


def _reference(f, rng, series: int, n: int, toward_sup: bool) -> tuple[str, tuple[int, int]]:
    from ctvl.phantom import slice_to_image

    ia = slice_to_image(f.slice_range[0], n, toward_sup)
    ib = slice_to_image(f.slice_range[1], n, toward_sup)
    a, b = min(ia, ib), max(ia, ib)
    if f.label in RANGE_OK and b - a >= 4 and rng.random() < 0.4:
        return str(rng.choice(RANGE_REF)).format(s=series, a=a, b=b), (a, b)
    i = slice_to_image(f.centre_slice, n, toward_sup)
    fmts = SINGLE_REF if series < 100 else [x for x in SINGLE_REF if x not in ("({s}:{i})", "({s}/{i})")]
    return str(rng.choice(fmts)).format(s=series, i=i), (i, i)


def make_report(rng: np.random.Generator, findings: list, labels: dict, latent: dict, volume) -> dict:
    """Fill each finding's sentence/reference/images and return the four CT-RATE report fields."""
    n, toward_sup = volume.n_slices, volume.slices_toward_superior
    series = int(rng.choice([2, 3, 4, 5, 6, 201]))
    lung_labels, other = [], []
    for f in findings:
        text = _sentence(f, rng)
        if "{ref}" in text:
            if f.label in FOCAL or f.label in RANGE_OK or rng.random() < 0.5:
                ref, imgs = _reference(f, rng, series, n, toward_sup)
                f.reference, f.images = ref, imgs
                text = text.replace("{ref}", ref)
            else:
                text = text.replace(" {ref}", "")
        text = " ".join(text.split()).replace(" .", ".").replace(" ,", ",")
        f.sentence = text[0].upper() + text[1:]
        lung = f.label not in {"Cardiomegaly", "Pericardial effusion", "Arterial wall calcification", "Hiatal hernia",
                               "Coronary artery wall calcification", "Lymphadenopathy", "Medical material"}
        (lung_labels if lung else other).append(f.sentence)
    seen: set = set()
    negs = [str(rng.choice(v)) for k, v in NEGATIVES.items() if v and not labels.get(k) and rng.random() < 0.45]
    normal = [s for s in NORMAL if rng.random() < 0.5]
    if labels.get("Hiatal hernia"):
        normal = [s for s in normal if "Esophagus" not in s]
    rng.shuffle(negs)
    med = [s for s in other + negs[: len(negs) // 2] + normal[:3] if not (s in seen or seen.add(s))]
    lungs = lung_labels + negs[len(negs) // 2:]
    findings_text = " ".join(med[:1] + lungs + med[1:] + normal[3:])
    if rng.random() < 0.5:
        findings_text = " ".join(lungs + med + normal[3:])
    pos = [f for f in findings]
    if pos:
        parts, done = [], set()
        for f in pos:
            if f.label in done and f.label not in ("Lung nodule",):
                continue
            done.add(f.label)
            loc = _lobe(f) or (f.side or "")
            if f.label == "Lung nodule":
                parts.append(f"{loc.capitalize() or 'Pulmonary'} nodule".strip())
            elif f.label == "Pleural effusion":
                parts.append(f"{(f.side or '').capitalize()} pleural effusion".strip())
            else:
                parts.append(f.label.capitalize() if f.label != "Lymphadenopathy" else "Mediastinal lymphadenopathy")
        impressions = " ".join(f"{p}." for p in parts)
    else:
        impressions = str(rng.choice(["No significant pathology.", "Normal chest CT.",
                                      "No acute thoracic pathology."]))
    thick = round(float(volume.spacing[2]), 1)
    return {
        "ClinicalInformation_EN": str(rng.choice(CLINICAL)),
        "Technique_EN": str(rng.choice(TECHNIQUE)).format(t=thick),
        "Findings_EN": findings_text,
        "Impressions_EN": impressions,
    }
