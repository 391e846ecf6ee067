"""The 18 CT-RATE abnormalities painted into a synthetic chest (`phantom_anatomy.Anatomy`), each with a mask.

Every generator paints HU into ``anat.hu`` and its instance value into the coarse mask, and records a raw finding
dict (label, generation-slice range and centre, row/column range, side, lobe, size, details for the report).
"""

from __future__ import annotations

import numpy as np
from ctvl.phantom_anatomy import (
    AIRWAY,
    BONE,
    ESOPHAGUS,
    HEART,
    LUNG_L,
    LUNG_R,
    MEDIASTINUM,
    MUSCLE,
    VESSEL,
    Anatomy,
    _tube,
    polyline,
    smooth_noise,
)
from ctvl.prompts import LABELS

FLUID = 20  # tissue code for effusions

# marginal prevalence targets (CT-RATE-like) before the normal-case share is removed
BASE_RATE = {
    "Medical material": 0.10, "Arterial wall calcification": 0.26, "Cardiomegaly": 0.10,
    "Pericardial effusion": 0.07, "Coronary artery wall calcification": 0.24, "Hiatal hernia": 0.12,
    "Lymphadenopathy": 0.24, "Emphysema": 0.20, "Atelectasis": 0.24, "Lung nodule": 0.45, "Lung opacity": 0.36,
    "Pulmonary fibrotic sequela": 0.25, "Pleural effusion": 0.11, "Mosaic attenuation pattern": 0.08,
    "Peribronchial thickening": 0.10, "Consolidation": 0.16, "Bronchiectasis": 0.09,
    "Interlobular septal thickening": 0.08,
}
NORMAL_SHARE = 0.17


def sample_labels(rng: np.random.Generator, force: list[str], normal: bool | None = None):
    """Labels with realistic co-occurrence from a few latent factors (age, smoking, heart failure, infection, ILD)."""
    age = int(np.clip(rng.normal(58, 14), 22, 90))
    latent = dict(age=age, sex=str(rng.choice(["M", "F"])), smoker=bool(rng.random() < 0.4),
                  cardiac=bool(rng.random() < 0.12 + 0.004 * max(age - 50, 0)), infection=bool(rng.random() < 0.25),
                  ild=bool(rng.random() < 0.1))
    is_normal = (rng.random() < NORMAL_SHARE) if normal is None else normal
    labels = dict.fromkeys(LABELS, 0)
    if force:
        is_normal = False
    if not is_normal:
        old = (age - 58) / 14
        mult = {
            "Arterial wall calcification": 1.0 + 0.6 * old, "Coronary artery wall calcification": 1.0 + 0.6 * old,
            "Emphysema": 2.0 if latent["smoker"] else 0.35, "Lung nodule": 1.2 if latent["smoker"] else 0.9,
            "Cardiomegaly": 3.0 if latent["cardiac"] else 0.5, "Pleural effusion": 3.0 if latent["cardiac"] else 0.6,
            "Pericardial effusion": 2.5 if latent["cardiac"] else 0.7,
            "Interlobular septal thickening": 3.0 if latent["cardiac"] or latent["ild"] else 0.4,
            "Consolidation": 2.6 if latent["infection"] else 0.5, "Lung opacity": 1.6 if latent["infection"] else 0.8,
            "Lymphadenopathy": 1.4 if latent["infection"] else 0.9,
            "Pulmonary fibrotic sequela": 2.5 if latent["ild"] else 0.85, "Bronchiectasis": 3 if latent["ild"] else 0.8,
            "Medical material": 2.0 if latent["cardiac"] else 0.8,
        }
        for lab in LABELS:
            p = BASE_RATE[lab] / (1 - NORMAL_SHARE) * max(mult.get(lab, 1.0), 0.1)
            labels[lab] = int(rng.random() < min(p, 0.95))
        if labels["Pleural effusion"] and rng.random() < 0.6:
            labels["Atelectasis"] = 1
        if not any(labels.values()):
            labels[str(rng.choice(LABELS))] = 1
    for lab in force:
        labels[lab] = 1
    return labels, latent


class _Ctx:
    def __init__(self, anat: Anatomy, mask: np.ndarray, rng: np.random.Generator) -> None:
        self.anat, self.mask, self.rng, self.out = anat, mask, rng, []
        self.g = anat.grid
        self._lung_idx = None

    def add(self, label: str, sl, region: np.ndarray, centre=None, **info) -> bool:
        """Record a finding whose voxels are ``region`` inside grid slices ``sl``; returns False if empty."""
        idx = np.nonzero(region)
        if idx[0].size == 0:
            return False
        value = len(self.out) + 1
        self.mask[sl][region] = value
        off = [s.start or 0 for s in sl]
        g = idx[0] + off[0]
        if centre is not None:
            gc = self.g.index(*centre)[0]
            gc = int(np.clip(gc, g.min(), g.max()))
        else:
            counts = np.bincount(g - g.min())
            gc = int(g.min() + np.argmax(counts))
        if centre is not None and not np.any(g == gc):
            gc = int(g[np.argmin(np.abs(g - gc))])
        self.out.append(dict(label=label, g_range=(int(g.min()), int(g.max())), g_centre=gc,
                             rc_range=((int(idx[1].min() + off[1]), int(idx[1].max() + off[1])),
                                       (int(idx[2].min() + off[2]), int(idx[2].max() + off[2]))), **info))
        return True

    def lung_idx(self):
        if self._lung_idx is None:
            self._lung_idx = np.nonzero(self.anat.lung)
        return self._lung_idx

    def lung_point(self, margin: float = 5.0, side: str | None = None, zone=None, tries: int = 200):
        """A random lung point (x, y, z mm) at least ``margin`` mm inside the lung."""
        g, r, c = self.lung_idx()
        grid, t = self.g, self.anat.tissue
        for _ in range(tries):
            i = self.rng.integers(len(g))
            p = np.array([grid.X[0, 0, c[i]], grid.Y[0, r[i], 0], grid.Z[g[i], 0, 0]], np.float32)
            if side == "right" and t[g[i], r[i], c[i]] != LUNG_R or side == "left" and t[g[i], r[i], c[i]] != LUNG_L:
                continue
            if zone is not None and not zone(p):
                continue
            ok = True
            steps = ((margin, 0, 0), (-margin, 0, 0), (0, margin, 0), (0, -margin, 0), (0, 0, margin), (0, 0, -margin))
            for d in steps:
                q = grid.index(*(p + np.array(d)))
                if t[q] not in (LUNG_R, LUNG_L):
                    ok = False
                    break
            if ok:
                return p
        return np.array([grid.X[0, 0, c[0]], grid.Y[0, r[0], 0], grid.Z[g[0], 0, 0]], np.float32)

    def where(self, p) -> dict:
        side = "right" if self.anat.tissue[self.g.index(*p)] == LUNG_R or p[0] < 0 else "left"
        return dict(side=side, lobe=self.anat.lobe(*p))

    def ball(self, c, radii):
        """Grid slices and normalised radius^2 of an ellipsoid (x, y, z semi-axes in mm)."""
        floor = 0.6 * np.array([self.g.dxy, self.g.dxy, self.g.dz], np.float32)
        radii = np.maximum(np.asarray(radii, np.float32), floor)
        sl = self.g.box(np.asarray(c) - radii - 2, np.asarray(c) + radii + 2)
        X, Y, Z = self.g.coords(sl)
        return sl, ((X - c[0]) / radii[0]) ** 2 + ((Y - c[1]) / radii[1]) ** 2 + ((Z - c[2]) / radii[2]) ** 2


def _lungs_of(ctx: _Ctx, sl) -> np.ndarray:
    t = ctx.anat.tissue[sl]
    return (t == LUNG_R) | (t == LUNG_L)


def nodule(ctx: _Ctx) -> None:
    rng = ctx.rng
    for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
        d = float(rng.choice([rng.uniform(5, 8), rng.uniform(8, 15), rng.uniform(15, 30)], p=[0.15, 0.6, 0.25]))
        kind = str(rng.choice(["solid", "ground-glass", "part-solid"], p=[0.7, 0.18, 0.12]))
        c = ctx.lung_point(margin=d / 2 + 2)
        sl, r2 = ctx.ball(c, [d / 2] * 3)
        r = np.sqrt(r2) + 0.12 * smooth_noise(rng, r2.shape, 2)
        reg = (r <= 1) & (ctx.anat.tissue[sl] != BONE)
        hv = ctx.anat.hu[sl]
        if kind == "solid":
            hv[reg] = rng.uniform(20, 55)
        else:
            hv[reg] = np.maximum(hv[reg], rng.uniform(-560, -380))
            if kind == "part-solid":
                core = reg & (r <= 0.45)
                hv[core] = rng.uniform(20, 45)
        ctx.add("Lung nodule", sl, reg, centre=c, size_mm=d, details={"type": kind}, **ctx.where(c))


def _patch(ctx: _Ctx, c, radius: float, cell: int = 3, thr: float = 0.0):
    sl, r2 = ctx.ball(c, [radius] * 3)
    shape = (np.sqrt(r2) + 0.35 * smooth_noise(ctx.rng, r2.shape, cell) - thr) <= 1
    return sl, shape & _lungs_of(ctx, sl)


def opacity(ctx: _Ctx) -> None:
    rng = ctx.rng
    for _ in range(int(rng.choice([1, 1, 2, 3]))):
        rad = float(rng.uniform(14, 38))
        c = ctx.lung_point(margin=8)
        sl, reg = _patch(ctx, c, rad)
        hv = ctx.anat.hu[sl]
        hv[reg] += (rng.uniform(-600, -480) - hv[reg]) * 0.85
        ctx.add("Lung opacity", sl, reg, centre=c, size_mm=2 * rad, details={}, **ctx.where(c))


def consolidation(ctx: _Ctx) -> None:
    rng = ctx.rng
    for _ in range(int(rng.choice([1, 1, 2]))):
        rad = float(rng.uniform(18, 42))
        c = ctx.lung_point(margin=10, zone=(lambda p: ctx.anat.lobe(*p) == "lower") if rng.random() < 0.6 else None)
        sl, reg = _patch(ctx, c, rad)
        hv = ctx.anat.hu[sl]
        hv[reg] = rng.uniform(20, 45)
        for _k in range(int(rng.integers(1, 4))):  # air bronchograms
            dvec = rng.normal(0, 1, 3)
            dvec /= np.linalg.norm(dvec)
            pts = polyline([c - dvec * rad * 0.2, c + dvec * rad * 0.7], 1.5)
            s2, d = _tube(ctx.g, pts, np.full(len(pts), 1.6, np.float32))
            air = (d <= 0) & (ctx.mask[s2] == 0) & np.isin(ctx.anat.tissue[s2], (LUNG_R, LUNG_L))
            sub = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(s2, sl))
            ok = np.zeros_like(air)
            loc = tuple(slice(u.start - a.start, u.stop - a.start) for u, a in zip(sub, s2))
            locr = tuple(slice(u.start - b.start, u.stop - b.start) for u, b in zip(sub, sl))
            ok[loc] = reg[locr]
            ctx.anat.hu[s2][air & ok] = -880
        ctx.add("Consolidation", sl, reg, centre=c, size_mm=2 * rad, details={}, **ctx.where(c))


def _near_wall(lung: np.ndarray, shift: int, axis: int = 1, direction: int = 1) -> np.ndarray:
    """Lung voxels within ``shift`` voxels of the lung border in one direction."""
    out = np.zeros_like(lung)
    for s in range(1, shift + 1):
        moved = np.zeros_like(lung)
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        if direction > 0:
            src[axis], dst[axis] = slice(s, None), slice(None, -s)
        else:
            src[axis], dst[axis] = slice(None, -s), slice(s, None)
        moved[tuple(dst)] = lung[tuple(src)]
        out |= lung & ~moved
    return out


def _sides(rng) -> list[str]:
    return [str(rng.choice(["right", "left"]))] if rng.random() < 0.55 else ["right", "left"]


def atelectasis(ctx: _Ctx) -> None:
    rng, a, g = ctx.rng, ctx.anat, ctx.g
    m = a.marks
    for side in _sides(rng):
        code = LUNG_R if side == "right" else LUNG_L
        zd = m["z_dome_r"] if side == "right" else m["z_dome_l"]
        if rng.random() < 0.6:  # dependent subsegmental band
            top = zd + rng.uniform(15, 45)
            sl = g.box(np.array([-400, 0, -50]), np.array([400, 400, top]))
            lung = a.tissue[sl] == code
            t = int(max(2, round(rng.uniform(8, 18) / g.dxy)))
            reg = _near_wall(lung, t, 1, 1) & (g.Y[:, sl[1], :] > 0)
            kind = "subsegmental"
        else:  # plate-like band
            c = ctx.lung_point(margin=6, side=side, zone=lambda p: p[2] < m["z_carina"] - 30)
            sl, r2 = ctx.ball(c, [rng.uniform(20, 35), rng.uniform(15, 25), rng.uniform(2.5, 4.0)])
            reg = (r2 <= 1) & (a.tissue[sl] == code)
            kind = "linear"
        a.hu[sl][reg] = rng.uniform(15, 50)
        ctx.add("Atelectasis", sl, reg, side=side, lobe="lower", size_mm=None, details={"type": kind})


def pleural_effusion(ctx: _Ctx) -> None:
    rng, a, g = ctx.rng, ctx.anat, ctx.g
    for side in _sides(rng):
        code = LUNG_R if side == "right" else LUNG_L
        depth = float(rng.uniform(10, 45))
        height = float(rng.uniform(50, 130))
        zmin = float(g.Z[np.nonzero((a.tissue == code).any((1, 2)))[0][0], 0, 0])
        sl = g.box(np.array([-400, -50, zmin - 5]), np.array([400, 400, zmin + height]))
        lung = a.tissue[sl] == code
        reg = np.zeros_like(lung)
        for k in range(lung.shape[0]):
            z = float(g.Z[sl[0].start + k, 0, 0])
            t = depth * np.clip(1 - (z - zmin) / height, 0, 1) ** 0.7
            s = int(round(t / g.dxy))
            if s > 0:
                reg[k] = _near_wall(lung[k:k + 1], s, 1, 1)[0]
                lat = int(round(s * 0.4))
                if lat > 0:
                    reg[k] |= _near_wall(lung[k:k + 1], lat, 2, 1 if side == "left" else -1)[0] & (
                        g.Y[0, sl[1], :] > -20)
        a.hu[sl][reg] = rng.uniform(2, 16)
        a.tissue[sl][reg] = FLUID
        size = "small" if depth < 20 else "moderate" if depth < 35 else "large"
        ctx.add("Pleural effusion", sl, reg, side=side, lobe=None, size_mm=depth, details={"size": size})


def emphysema(ctx: _Ctx) -> None:
    rng, a, g = ctx.rng, ctx.anat, ctx.g
    m = a.marks
    kind = str(rng.choice(["centrilobular", "panlobular", "paraseptal"], p=[0.6, 0.15, 0.25]))
    lung = a.lung
    if kind == "paraseptal":
        sl = (slice(None),) * 3
        reg = np.zeros(g.shape, bool)
        for _ in range(int(rng.integers(3, 8))):
            c = ctx.lung_point(margin=4, zone=lambda p: p[2] > m["z_carina"] - 40)
            s2, r2 = ctx.ball(c, [rng.uniform(6, 16)] * 3)
            b = (r2 <= 1) & _lungs_of(ctx, s2)
            a.hu[s2][b] = rng.uniform(-1000, -975)
            reg[s2] |= b
    else:
        zlim = m["z_carina"] - 40 if kind == "centrilobular" else -1e9
        sl = g.box(np.array([-400, -400, zlim]), np.array([400, 400, 1e4]))
        sev = float(rng.uniform(0.4, 1.0))
        holes = smooth_noise(rng, a.hu[sl].shape, 2) > (1.1 - 0.6 * sev)
        reg = holes & lung[sl]
        hv = a.hu[sl]
        hv[lung[sl]] -= 25 * sev
        hv[reg] = rng.uniform(-990, -955, size=int(reg.sum()))
    side = "bilateral"
    ctx.add("Emphysema", sl, reg, side=side, lobe="upper" if kind == "centrilobular" else None,
            details={"type": kind})


def mosaic(ctx: _Ctx) -> None:
    rng, a, g = ctx.rng, ctx.anat, ctx.g
    lung = a.lung
    n = smooth_noise(rng, g.shape, int(max(4, round(28 / g.dxy))))
    lucent = (n > 0.15) & lung
    dense = (n < -0.35) & lung
    base = -860
    a.hu[lucent] = base - 75 + (a.hu[lucent] - base) * 0.5
    a.hu[dense] += 55
    ctx.add("Mosaic attenuation pattern", (slice(None),) * 3, lucent, side="bilateral", lobe=None, details={})


def _airway_segments(ctx: _Ctx, side: str, lower: bool, gens=(1, 4)):
    a = ctx.anat
    trees = a.marks["vessel_trees"]
    segs = trees[0] if side == "right" else trees[1]
    out = []
    for p0, p1, r, gen in segs:
        if gens[0] <= gen <= gens[1] and (not lower or a.lobe(*p1) == "lower"):
            out.append((p0, p1, r))
    return out


def _bronchi(ctx: _Ctx, label: str, lumen_scale, wall: float, wall_hu: float) -> None:
    rng, a = ctx.rng, ctx.anat
    for side in _sides(rng):
        segs = _airway_segments(ctx, side, lower=rng.random() < 0.75)
        if not segs:
            segs = _airway_segments(ctx, side, lower=False)
        pick = rng.choice(len(segs), size=min(len(segs), int(rng.integers(4, 9))), replace=False)
        regs = []
        for i in pick:
            p0, p1, r = segs[i]
            off = np.cross(p1 - p0, [0, 0, 1.0])
            off = off / (np.linalg.norm(off) + 1e-6) * (r + 2.5)
            pts = polyline([p0 + off, p1 + off], 1.5)
            lum = np.full(len(pts), max(1.4, r * lumen_scale), np.float32)
            if label == "Bronchiectasis" and rng.random() < 0.4:  # varicose
                lum *= 1 + 0.35 * np.sin(np.linspace(0, 4 * np.pi, len(pts)))
            sl, d = _tube(ctx.g, pts, lum, wall)
            ok = np.isin(a.tissue[sl], (LUNG_R, LUNG_L))
            wl = (d > 0) & (d <= wall) & ok
            lm = (d <= 0) & ok
            a.hu[sl][wl] = wall_hu
            a.hu[sl][lm] = -960
            regs.append((sl, wl | lm, (p0 + p1) / 2))
        if not regs:
            continue
        full = np.zeros(ctx.g.shape, bool)
        for sl, reg, _c in regs:
            full[sl] |= reg
        c = regs[0][2]
        ctx.add(label, (slice(None),) * 3, full, side=side, lobe=a.lobe(*c), size_mm=None, details={})


def bronchiectasis(ctx: _Ctx) -> None:
    _bronchi(ctx, "Bronchiectasis", float(ctx.rng.uniform(1.6, 2.4)), 1.3, 10)


def peribronchial(ctx: _Ctx) -> None:
    _bronchi(ctx, "Peribronchial thickening", 0.7, float(ctx.rng.uniform(2.2, 3.5)), 20)


def septal(ctx: _Ctx) -> None:
    rng, a, g = ctx.rng, ctx.anat, ctx.g
    m = a.marks
    sl = g.box(np.array([-400, -400, -50]), np.array([400, 400, m["z_carina"] + rng.uniform(-20, 40)]))
    lung = _lungs_of(ctx, sl)
    s = int(max(2, round(rng.uniform(16, 28) / g.dxy)))
    band = np.zeros_like(lung)
    for ax_, dr in ((1, 1), (1, -1), (2, 1), (2, -1)):
        band |= _near_wall(lung, s, ax_, dr)
    n = smooth_noise(rng, lung.shape, int(max(2, round(9 / g.dxy))))
    lines = (np.abs((n * 2.2) % 1.0 - 0.5) > 0.36) & band
    a.hu[sl][lines] = rng.uniform(-420, -250)
    ctx.add("Interlobular septal thickening", sl, lines, side="bilateral", lobe="lower", details={})


def fibrosis(ctx: _Ctx) -> None:
    rng, a, g = ctx.rng, ctx.anat, ctx.g
    m = a.marks
    apical = rng.random() < 0.5
    full = np.zeros(g.shape, bool)
    side = str(rng.choice(["right", "left"]))
    first = None
    for _ in range(int(rng.integers(2, 6))):
        zone = (lambda p: p[2] > m["z_carina"] + 10) if apical else (lambda p: p[2] < m["z_carina"] - 30)
        c = ctx.lung_point(margin=3, side=side, zone=zone)
        first = c if first is None else first
        d = rng.normal(0, 1, 3)
        d[2] *= 0.4
        d /= np.linalg.norm(d)
        length = rng.uniform(20, 45)
        pts = polyline([c, c + d * length * 0.5 + rng.normal(0, 4, 3), c + d * length], 1.2)
        sl, dist = _tube(g, pts, np.full(len(pts), rng.uniform(1.3, 2.2), np.float32))
        reg = (dist <= 0) & _lungs_of(ctx, sl)
        a.hu[sl][reg] = rng.uniform(-150, 10)
        full[sl] |= reg
    ctx.add("Pulmonary fibrotic sequela", (slice(None),) * 3, full, side=side,
            lobe="upper" if apical else "lower", details={"apical": apical})


def cardiomegaly(ctx: _Ctx) -> None:
    a = ctx.anat
    reg = a.tissue == HEART
    ctx.add("Cardiomegaly", (slice(None),) * 3, reg, centre=a.marks["heart_c"], side=None, lobe=None,
            size_mm=float(2 * a.marks["heart_ax"][0]), details={})


def pericardial(ctx: _Ctx) -> None:
    rng, a = ctx.rng, ctx.anat
    hc, ax = a.marks["heart_c"], a.marks["heart_ax"]
    t = float(rng.uniform(6, 18))
    sl, r2 = ctx.ball(hc, ax + t)
    sl2, r2h = ctx.ball(hc, ax)
    r2h = _crop_to(r2h, sl2, sl)
    tv = a.tissue[sl]
    reg = (r2 <= 1) & (r2h > 1) & ~np.isin(tv, (BONE, AIRWAY, VESSEL))
    a.hu[sl][reg] = rng.uniform(8, 20)
    a.tissue[sl][reg] = FLUID
    ctx.add("Pericardial effusion", sl, reg, centre=hc, side=None, lobe=None, size_mm=t, details={})


def _crop_to(arr, sl_from, sl_to):
    """Re-index ``arr`` (laid out on ``sl_from``) onto ``sl_to`` (which must be inside it), pad with inf."""
    out = np.full(tuple(b.stop - b.start for b in sl_to), np.inf, np.float32)
    src = tuple(slice(max(t.start, f.start) - f.start, min(t.stop, f.stop) - f.start) for f, t in zip(sl_from, sl_to))
    dst = tuple(slice(max(t.start, f.start) - t.start, min(t.stop, f.stop) - t.start) for f, t in zip(sl_from, sl_to))
    out[dst] = arr[src]
    return out


def _specks(ctx: _Ctx, label: str, pts: np.ndarray, hu_range, size_range) -> None:
    rng, a = ctx.rng, ctx.anat
    full = np.zeros(ctx.g.shape, bool)
    for p in pts:
        r = max(float(rng.uniform(*size_range)), 0.6 * max(ctx.g.dxy, ctx.g.dz))
        sl, d = _tube(ctx.g, p[None].astype(np.float32), np.array([r], np.float32))
        reg = d <= 0
        a.hu[sl][reg] = np.maximum(a.hu[sl][reg], rng.uniform(*hu_range))
        full[sl] |= reg
    c = pts[len(pts) // 2]
    ctx.add(label, (slice(None),) * 3, full, centre=c, side=None, lobe=None, details={"count": len(pts)})


def arterial_calc(ctx: _Ctx) -> None:
    rng, a = ctx.rng, ctx.anat
    ap, ar = a.marks["aorta_pts"], a.marks["aorta_r"]
    sel = rng.choice(len(ap) - 2, size=int(rng.integers(4, 16)), replace=False) + 1
    pts = []
    for i in sel:
        tng = ap[i + 1] - ap[i - 1]
        tng = tng / (np.linalg.norm(tng) + 1e-6)
        v = np.cross(tng, rng.normal(0, 1, 3))
        v /= np.linalg.norm(v) + 1e-6
        pts.append(ap[i] + v * ar[i] * 0.95)
    _specks(ctx, "Arterial wall calcification", np.array(pts), (700, 1300), (1.8, 3.5))


def coronary_calc(ctx: _Ctx) -> None:
    rng, a = ctx.rng, ctx.anat
    hc, ax = a.marks["heart_c"], a.marks["heart_ax"]
    pts = []
    for _ in range(int(rng.integers(2, 9))):
        vessel = rng.choice(3)
        t = rng.uniform(0.2, 0.9)
        if vessel == 0:  # LAD: anterior interventricular groove
            v = np.array([0.2 + 0.3 * t, -0.9, 0.6 - 0.9 * t])
        elif vessel == 1:  # RCA: right AV groove
            v = np.array([-0.8, -0.5 + t, 0.35])
        else:  # LCx: left AV groove
            v = np.array([0.8, -0.2 + t * 0.9, 0.35])
        v = v / np.linalg.norm(v)
        pts.append(hc + v * ax * 1.02)
    _specks(ctx, "Coronary artery wall calcification", np.array(pts), (700, 1400), (1.8, 3.2))


def hiatal_hernia(ctx: _Ctx) -> None:
    rng, a = ctx.rng, ctx.anat
    xe, ye = a.marks["esophagus"]
    r = float(rng.uniform(14, 28))
    c = np.array([xe + 4, ye - 6, a.marks["z_dome_l"] + r * 0.6])
    sl, r2 = ctx.ball(c, [r * 1.15, r, r * 1.1])
    tv = a.tissue[sl]
    reg = (r2 <= 1) & ~np.isin(tv, (BONE, VESSEL, AIRWAY))
    hv = a.hu[sl]
    hv[reg] = 40
    inner = reg & (r2 <= 0.7 ** 2)
    hv[inner] = 12
    Z = ctx.g.Z[sl[0]]
    if rng.random() < 0.6:
        hv[inner & (c[2] + r * 0.15 < Z)] = -990
    a.tissue[sl][reg] = ESOPHAGUS
    ctx.add("Hiatal hernia", sl, reg, centre=c, side=None, lobe=None, size_mm=2 * r, details={})


def lymphadenopathy(ctx: _Ctx) -> None:
    rng, a = ctx.rng, ctx.anat
    m = a.marks
    zc, ytr = m["z_carina"], m["y_trachea"]
    stations = {
        "right paratracheal": (-20, ytr - 8, zc + 22, "right"), "subcarinal": (2, ytr + 10, zc - 18, None),
        "prevascular": (-4, ytr - 45, m["z_arch"] - 5, None), "aortopulmonary window": (16, ytr - 10, zc + 6, "left"),
        "right hilar": (*m["hilum_r"][:2] + np.array([-8, -10]), m["hilum_r"][2], "right"),
        "left hilar": (*m["hilum_l"][:2] + np.array([8, -10]), m["hilum_l"][2], "left"),
    }
    names = list(stations)
    for name in rng.choice(names, size=int(rng.integers(1, 4)), replace=False):
        x, y, z, side = stations[name]
        short = float(rng.uniform(12, 26))
        c = np.array([x, y, z], np.float32)
        sl, r2 = ctx.ball(c, [short / 2, short / 2, short * 0.65])
        tv = a.tissue[sl]
        reg = (r2 <= 1) & np.isin(tv, (MEDIASTINUM, LUNG_R, LUNG_L, MUSCLE, ESOPHAGUS))
        a.hu[sl][reg] = rng.uniform(32, 48)
        a.tissue[sl][reg] = MEDIASTINUM
        ctx.add("Lymphadenopathy", sl, reg, centre=c, side=side, lobe=None, size_mm=short,
                details={"station": str(name)})


def medical_material(ctx: _Ctx) -> None:
    rng, a, g = ctx.rng, ctx.anat, ctx.g
    m = a.marks
    kind = str(rng.choice(["pacemaker", "port catheter", "sternal wires"], p=[0.4, 0.3, 0.3]))
    full = np.zeros(g.shape, bool)
    hc = m["heart_c"]
    wire_r = max(1.0, 0.45 * g.dxy)
    if kind == "sternal wires":
        ys = -m["bc"] - 10
        pts = []
        for i in range(int(rng.integers(3, 7))):
            z = m["z_dome_r"] + 10 + i * rng.uniform(18, 26)
            ring = [(18 * np.cos(t), ys + 9 * np.sin(t), z) for t in np.linspace(0, 2 * np.pi, 16)]
            pts.append(polyline(ring, 1.5))
        pts = np.concatenate(pts)
        side, c = None, pts[len(pts) // 2]
        groups = [pts]
    else:
        sgn = -1 if (kind == "port catheter" and rng.random() < 0.7) or rng.random() < 0.2 else 1
        side = "right" if sgn < 0 else "left"
        gen = np.array([sgn * 0.5 * m["ac"], -m["bc"] - 28, m["z_apex"] - rng.uniform(25, 45)])
        svc = np.array([-30, -m["bc"] * 0.3 + 5, m["z_carina"]])
        end = hc + np.array([-0.3, -0.2, 0.1]) * m["heart_ax"] if kind == "pacemaker" else svc - [0, 0, 25]
        lead = polyline([gen, (gen + svc) / 2 + [0, 15, 10], svc, end], 1.5)
        c = gen
        groups = [lead]
        dims = [22, 8, 18] if kind == "pacemaker" else [12, 7, 12]
        sl, r2 = ctx.ball(gen, dims)
        box = r2 <= 1
        a.hu[sl][box] = 2800
        full[sl] |= box
    for pts in groups:
        sl, d = _tube(g, pts.astype(np.float32), np.full(len(pts), wire_r, np.float32))
        reg = d <= 0
        a.hu[sl][reg] = 2600
        full[sl] |= reg
    ctx.add("Medical material", (slice(None),) * 3, full, centre=c, side=side, lobe=None, details={"type": kind})


GENERATORS = {
    "Emphysema": emphysema, "Mosaic attenuation pattern": mosaic, "Lung opacity": opacity,
    "Interlobular septal thickening": septal, "Pulmonary fibrotic sequela": fibrosis, "Bronchiectasis": bronchiectasis,
    "Peribronchial thickening": peribronchial, "Consolidation": consolidation, "Lung nodule": nodule,
    "Atelectasis": atelectasis, "Pleural effusion": pleural_effusion, "Cardiomegaly": cardiomegaly,
    "Pericardial effusion": pericardial, "Lymphadenopathy": lymphadenopathy, "Hiatal hernia": hiatal_hernia,
    "Arterial wall calcification": arterial_calc, "Coronary artery wall calcification": coronary_calc,
    "Medical material": medical_material,
}


def apply_findings(anat: Anatomy, mask: np.ndarray, labels: dict, rng: np.random.Generator) -> list[dict]:
    """Paint every positive label (in a fixed, anatomically sensible order) and return the raw findings."""
    ctx = _Ctx(anat, mask, rng)
    for label, fn in GENERATORS.items():
        if labels.get(label):
            fn(ctx)
    got = {f["label"] for f in ctx.out}
    for label in GENERATORS:  # a generator that found no room (rare) clears its label
        if labels.get(label) and label not in got:
            labels[label] = 0
    return ctx.out
