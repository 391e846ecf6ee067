"""Synthetic chest anatomy on a coarse grid (half the output in-plane resolution), in Hounsfield units.

Coordinates (mm) are patient-centred: ``X`` toward the patient's Left, ``Y`` toward Posterior (both relative to
the body centre), ``Z`` toward Superior from the lowest slice. Arrays are indexed ``[g, y, x]`` where ``g`` is the
generation slice index (0 = most inferior). `ctvl.phantom` turns this into a `Volume` with real geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# tissue codes of `Anatomy.tissue`
AIR, FAT, MUSCLE, BONE, LUNG_R, LUNG_L, HEART, VESSEL, LIVER, MEDIASTINUM, AIRWAY, ESOPHAGUS, STOMACH = range(13)


@dataclass
class Grid:
    """The coarse generation grid: ``n`` slices of ``h`` x ``w`` pixels, spacing ``dz`` and ``dxy`` mm."""

    n: int
    h: int
    w: int
    dz: float
    dxy: float
    cx: float = 0.0  # body centre offset from the grid centre (mm, +left)
    cy: float = 0.0  # (mm, +posterior)

    def __post_init__(self) -> None:
        self.Z = (np.arange(self.n, dtype=np.float32) * self.dz).reshape(-1, 1, 1)
        self.Y = ((np.arange(self.h, dtype=np.float32) - (self.h - 1) / 2) * self.dxy - self.cy).reshape(1, -1, 1)
        self.X = ((np.arange(self.w, dtype=np.float32) - (self.w - 1) / 2) * self.dxy - self.cx).reshape(1, 1, -1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.n, self.h, self.w

    def index(self, x: float, y: float, z: float) -> tuple[int, int, int]:
        """Nearest (g, row, col) of a point in mm (clipped to the grid)."""
        g = int(np.clip(round(z / self.dz), 0, self.n - 1))
        r = int(np.clip(round((y + self.cy) / self.dxy + (self.h - 1) / 2), 0, self.h - 1))
        c = int(np.clip(round((x + self.cx) / self.dxy + (self.w - 1) / 2), 0, self.w - 1))
        return g, r, c

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
        """Slices of the grid covering the mm box [lo, hi] given as (x, y, z)."""
        g0, r0, c0 = self.index(lo[0], lo[1], lo[2])
        g1, r1, c1 = self.index(hi[0], hi[1], hi[2])
        return slice(g0, g1 + 1), slice(r0, r1 + 1), slice(c0, c1 + 1)

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.X[:, :, sl[2]], self.Y[:, sl[1], :], self.Z[sl[0]]


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """Zero-mean noise (std ~1) correlated over ~``cell`` voxels: linear upsampling of a coarse random grid."""
    cell = max(1, int(cell))
    small = [int(np.ceil((s - 1) / cell)) + 2 for s in shape]
    base = rng.standard_normal(small).astype(np.float32)
    out = ndimage.zoom(base, [((b - 1) * cell + 1) / b for b in small], order=1)
    return out[tuple(slice(0, s) for s in shape)] * np.float32(1.0 + 0.25 * len(shape))


def smooth121(a: np.ndarray, axes=(1, 2)) -> np.ndarray:
    """Binomial [1, 2, 1] / 4 smoothing along ``axes`` (edges replicated): a cheap slight blur."""
    a = a.astype(np.float32, copy=True)
    for ax in axes:
        v = np.moveaxis(a, ax, 0)
        mid = v[1:-1] * 0.5
        mid += v[:-2] * 0.25
        mid += v[2:] * 0.25
        first = v[0] * 0.75 + v[1] * 0.25
        last = v[-1] * 0.75 + v[-2] * 0.25
        v[1:-1] = mid
        v[0], v[-1] = first, last
    return a


@dataclass
class Anatomy:
    """HU image, tissue codes and landmarks of one synthetic chest (coarse grid)."""

    grid: Grid
    hu: np.ndarray
    tissue: np.ndarray
    marks: dict = field(default_factory=dict)

    @property
    def lung(self) -> np.ndarray:
        return (self.tissue == LUNG_R) | (self.tissue == LUNG_L)

    def lobe(self, x: float, y: float, z: float) -> str:
        """Lobe name of a point (mm) from an approximate fissure model."""
        m = self.marks
        yf, yb = -m["bc"], m["bc"]
        t = float(np.clip((y - yf) / (yb - yf), 0, 1))
        z_oblique = m["z_dome_r"] + t * (m["z_carina"] + 30 - m["z_dome_r"])  # posterior-superior to anterior-inferior
        if z < z_oblique:
            return "lower"
        if x < 0 and z < m["z_carina"] - 15:
            return "middle"
        return "upper"


def _ellipse_r2(X, Y, cx, cy, a, b):
    return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2


def _tube(grid: Grid, pts: np.ndarray, radii: np.ndarray, pad: float = 0.0):
    """Signed distance (mm) to a union of balls centred on ``pts`` (P,3 x/y/z) within their bounding box."""
    radii = np.broadcast_to(np.asarray(radii, np.float32), (len(pts),))
    r = float(radii.max()) + pad + grid.dxy
    sl = grid.box(pts.min(0) - r, pts.max(0) + r)
    X, Y, Z = grid.coords(sl)
    d = np.full((Z.shape[0], Y.shape[1], X.shape[2]), np.inf, dtype=np.float32)
    for (px, py, pz), pr in zip(pts, radii):
        np.minimum(d, np.sqrt((X - px) ** 2 + (Y - py) ** 2 + (Z - pz) ** 2) - pr, out=d)
    return sl, d


def polyline(points: list, step: float) -> np.ndarray:
    """Points every ``step`` mm along a polyline of (x, y, z) vertices."""
    out = []
    pts = np.asarray(points, dtype=np.float32)
    for a, b in zip(pts[:-1], pts[1:]):
        n = max(2, int(np.linalg.norm(b - a) / step) + 1)
        out.append(a + (b - a) * np.linspace(0, 1, n, dtype=np.float32)[:, None])
    return np.concatenate(out)


def paint_tube(anat: Anatomy, pts, radii, hu: float, code: int, wall: float = 0.0, wall_hu: float = 40.0,
               only=None, halo: float = 3.0) -> None:
    """Paint a tube (lumen ``hu``; optional wall of ``wall`` mm; a fat halo where it meets lung).

    ``only``: tissue codes it may overwrite.
    """
    grid = anat.grid
    sl, d = _tube(grid, np.asarray(pts, np.float32), np.asarray(radii, np.float32), wall + halo)
    hv, tv = anat.hu[sl], anat.tissue[sl]
    if halo > 0:
        fat = (d <= wall + halo) & ((tv == LUNG_R) | (tv == LUNG_L))
        hv[fat] = -90
        tv[fat] = MEDIASTINUM
    ok = np.ones(d.shape, bool) if only is None else np.isin(tv, only)
    if wall > 0:
        w = (d <= wall) & (d > 0) & ok
        hv[w] = wall_hu
        tv[w] = code
    m = (d <= 0) & ok
    hv[m] = hu
    tv[m] = code


def sample_patient(rng: np.random.Generator) -> dict:
    """Body habitus, breathing depth and landmark positions (mm)."""
    size = rng.uniform(-1, 1)
    a_body = 165 + 22 * size + rng.normal(0, 6)
    b_body = 112 + 16 * size + rng.normal(0, 5)
    fat = float(np.clip(14 + 12 * size + rng.normal(0, 5), 5, 40))
    extent = float(np.clip(300 + 45 * size + rng.normal(0, 15), 250, 380))
    breath = rng.uniform(-1, 1)  # +1 deep inspiration
    return dict(size=size, a_body=a_body, b_body=b_body, fat=fat, extent=extent, breath=breath,
                heart_scale=1.0, offset=(rng.normal(0, 10), rng.normal(8, 8)))


def build_anatomy(grid: Grid, p: dict, rng: np.random.Generator) -> Anatomy:
    """Paint the normal chest into a new `Anatomy`."""
    n, h, w = grid.shape
    X, Y, Z = grid.X, grid.Y, grid.Z
    L = grid.n * grid.dz
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    anat = Anatomy(grid, hu, tissue)
    m = anat.marks

    # landmarks along z
    z_apex = L - rng.uniform(15, 35)
    z_dome_r = L * rng.uniform(0.22, 0.3) - 12 * p["breath"]
    z_dome_l = z_dome_r - rng.uniform(5, 18)
    z_carina = z_dome_r + 0.55 * (z_apex - z_dome_r) + rng.normal(0, 6)
    m.update(z_apex=z_apex, z_dome_r=z_dome_r, z_dome_l=z_dome_l, z_carina=z_carina, L=L)

    # body and thoracic cavity (z-varying ellipses)
    zt = Z / L
    a_b = p["a_body"] * (0.96 + 0.06 * zt)
    b_b = p["b_body"] * (1.0 + 0.05 * np.sin(3.0 * zt + 1))
    fat = p["fat"]
    rb = _ellipse_r2(X, Y, 0, 0, a_b, b_b)
    body = rb <= 1
    rf = _ellipse_r2(X, Y, 0, 0, a_b - fat, b_b - fat * 0.8)
    hu[body] = -95
    tissue[body] = FAT
    inner = body & (rf <= 1)
    hu[inner] = 52
    tissue[inner] = MUSCLE
    ac0 = a_b - fat - 16
    bc0 = b_b - fat * 0.8 - 14
    cy_c = -4.0
    rc = _ellipse_r2(X, Y, 0, cy_c, ac0, bc0)
    bc_mid = float(np.median(bc0))
    m.update(bc=bc_mid, ac=float(np.median(ac0)))

    # ribs: a band just outside the cavity, helical phase descending anteriorly
    rib_outer = _ellipse_r2(X, Y, 0, cy_c, ac0 + 11, bc0 + 10)
    rc0 = _ellipse_r2(X, Y, 0, cy_c, ac0 + 2, bc0 + 2)
    u = (1 - np.clip((Y - cy_c) / bc0, -1, 1)) / 2  # 0 posterior .. 1 anterior
    pitch = rng.uniform(26, 32)
    phase = ((Z + 55 * u + rng.uniform(0, pitch)) / pitch) % 1.0
    ribs = (rib_outer <= 1) & (rc0 > 1) & (phase < 0.33) & (z_apex + 5 > Z) & ~((np.abs(X) < 28) & (Y < 0))
    hu[ribs] = 420
    tissue[ribs] = BONE
    # sternum
    st = (np.abs(X) < 16) & (cy_c - bc0 > Y) & (cy_c - bc0 - 14 < Y) & (z_dome_r - 25 < Z) & (z_apex - 10 > Z)
    hu[st] = 380
    tissue[st] = BONE

    # diaphragm surface: lungs lie above it, lower at the periphery and posteriorly
    xr = -0.45 * ac0
    z_d = np.where(X < 0, z_dome_r, z_dome_l) - 55 * (((X - np.where(X < 0, xr, -xr)) / ac0) ** 2
                                                      + ((Y - cy_c + 10) / bc0) ** 2) - 18 * np.clip(Y / bc0, 0, 1)
    cavity = rc <= 1
    above = z_d < Z
    abdomen = cavity & ~above
    hu[abdomen] = 25
    tissue[abdomen] = MUSCLE
    liver = abdomen & (X < 35 + 0.3 * (Y)) & (z_d - 160 < Z)
    hu[liver] = 58
    tissue[liver] = LIVER
    # stomach under the left dome with a fundal air bubble
    sc = np.array([0.55 * float(np.median(ac0)), -0.25 * bc_mid, z_dome_l - 45])
    sl = grid.box(sc - 60, sc + 60)
    Xs, Ys, Zs = grid.coords(sl)
    r_st = ((Xs - sc[0]) / 45) ** 2 + ((Ys - sc[1]) / 40) ** 2 + ((Zs - sc[2]) / 50) ** 2
    stom = (r_st <= 1) & abdomen[sl]
    hu[sl][stom] = 15
    tissue[sl][stom] = STOMACH
    bub = stom & (Zs > sc[2] + 20)
    hu[sl][bub] = -990

    # lungs: cavity above the diaphragm, minus a mediastinal band
    xa = 0.45 * ac0
    zcap = z_apex - 70 * ((np.abs(X - 4) - xa) / (0.6 * ac0)) ** 2 - 45 * ((Y - cy_c) / bc0) ** 2
    lung = cavity & above & (zcap > Z)
    y_rel = (Y - cy_c) / bc0
    half = 7 + 14 * np.clip(y_rel + 0.3, 0, 1) + 10 * np.clip(y_rel - 0.55, 0, 1) / 0.45
    band = np.abs(X - 4) < half
    med = (cavity & above & ~lung) | (lung & band)
    lung &= ~band
    hu[med] = -90
    tissue[med] = MEDIASTINUM
    hu[lung] = np.broadcast_to(-860 + 35 * np.clip(y_rel, -1, 1), grid.shape)[lung]  # dependent density gradient
    tissue[lung & (X < 4)] = LUNG_R
    tissue[lung & (X >= 4)] = LUNG_L

    # spine
    rv = 17 + 3 * p["size"]
    yv = float(cy_c + bc_mid - 2)
    m.update(y_spine=yv, r_spine=rv)
    sl = (slice(None), *grid.box(np.array([-45, yv - rv - 2, 0]), np.array([45, yv + rv + 45, 0]))[1:])
    Xs, Ys = X[:, :, sl[2]], Y[:, sl[1], :]
    rr = np.sqrt(Xs ** 2 + (Ys - yv) ** 2)
    disc = ((Z / rng.uniform(24, 28) + rng.uniform()) % 1.0) < 0.2
    vb = np.broadcast_to(rr <= rv, (n, rr.shape[1], rr.shape[2]))
    hv, tv = hu[sl], tissue[sl]
    hv[vb] = np.broadcast_to(np.where(disc, 85, np.where(rr > rv - 2.5, 650, 240)), vb.shape)[vb]
    tv[vb] = BONE
    canal = np.broadcast_to(np.sqrt(Xs ** 2 + (Ys - yv - rv - 9) ** 2) <= 8, vb.shape)
    post = np.broadcast_to((((np.abs(Xs) < 6) & (Ys > yv + rv + 14) & (Ys < yv + rv + 40)) |
                            ((np.abs(Xs) < 32) & (np.abs(Ys - yv - rv - 10) < 5))) & (rr > rv), vb.shape)
    hv[post & ~canal] = 500
    tv[post & ~canal] = BONE
    hv[canal] = 20

    # airways: trachea, main and lobar bronchi
    y_tr = yv - rv - 24
    x_tr = -3.0
    top = L + 10
    paint_tube(anat, polyline([(x_tr, y_tr, top), (x_tr, y_tr, z_carina)], 3), [9.0] * 1, -1000, AIRWAY, 2.0, 45)
    rb_pts = [(x_tr, y_tr, z_carina), (-38, y_tr + 4, z_carina - 18), (-55, y_tr + 2, z_carina - 45)]
    lb_pts = [(x_tr, y_tr, z_carina), (40, y_tr + 8, z_carina - 30), (58, y_tr + 10, z_carina - 60)]
    for pts, r in ((rb_pts, 6.5), (lb_pts, 5.5)):
        line = polyline(pts, 3)
        paint_tube(anat, line, np.linspace(r, r * 0.6, len(line)), -1000, AIRWAY, 1.5, 45)
    m.update(y_trachea=y_tr, x_trachea=x_tr, hilum_r=np.array(rb_pts[1]), hilum_l=np.array(lb_pts[1]))
    # esophagus
    y_es = yv - rv - 9
    paint_tube(anat, polyline([(6, y_es, top), (8, y_es, z_dome_l - 5), (40, y_es - 25, z_dome_l - 30)], 4),
               np.array([7.5]), 35, ESOPHAGUS)
    m.update(esophagus=(7.0, y_es))

    # heart (ellipsoid with chambers), epicardial fat
    hs = p["heart_scale"]
    hc = np.array([22 + 8 * (hs - 1) * 2, cy_c - 0.25 * bc_mid, z_dome_r + 50 * hs])
    ax = np.array([58, 46, 52]) * (0.92 + 0.08 * p["size"]) * hs
    m.update(heart_c=hc, heart_ax=ax)
    sl = grid.box(hc - ax * 1.25, hc + ax * 1.25)
    Xs, Ys, Zs = grid.coords(sl)
    r2 = ((Xs - hc[0]) / ax[0]) ** 2 + ((Ys - hc[1]) / ax[1]) ** 2 + ((Zs - hc[2]) / ax[2]) ** 2
    hv, tv = hu[sl], tissue[sl]
    fatshell = (r2 <= 1.14 ** 2) & (tv != BONE)
    hv[fatshell] = -95
    tv[fatshell] = MEDIASTINUM
    heart = r2 <= 1
    hv[heart] = 50
    tv[heart] = HEART
    for (dx, dy, dz), s in (((0.35, 0.15, -0.1), 0.45), ((-0.35, -0.2, -0.1), 0.4), ((0.1, 0.45, 0.35), 0.35),
                            ((-0.35, 0.35, 0.3), 0.33)):
        c = hc + np.array([dx, dy, dz]) * ax
        ch = (((Xs - c[0]) / (ax[0] * s)) ** 2 + ((Ys - c[1]) / (ax[1] * s)) ** 2
              + ((Zs - c[2]) / (ax[2] * s)) ** 2) <= 1
        hv[ch & heart] = 36
    z_heart_top = hc[2] + 0.8 * ax[2]
    m["z_heart_top"] = z_heart_top

    # great vessels: ascending aorta, arch, descending aorta, pulmonary trunk, SVC, arch branches
    r_ao = 14 + 2 * p["size"]
    z_arch = z_carina + rng.uniform(18, 30)
    desc = (20.0, yv - rv * 0.2 - 14)
    asc = (-8.0, cy_c - 0.3 * bc_mid)
    t = np.linspace(0, np.pi, 24)
    arch = np.stack([asc[0] + (desc[0] - asc[0]) * (1 - np.cos(t)) / 2,
                     asc[1] + (desc[1] - asc[1]) * (1 - np.cos(t)) / 2,
                     z_arch - 22 + 22 * np.sin(t)], 1)
    ao_pts = np.concatenate([polyline([(asc[0], asc[1], hc[2] + 0.4 * ax[2]), (asc[0], asc[1], z_arch - 22)], 4),
                             arch, polyline([(desc[0], desc[1], z_arch - 22), (desc[0], desc[1], -20)], 4)])
    ao_r = np.where(ao_pts[:, 2] > z_arch - 23, r_ao, r_ao * 0.85)
    ao_r[: len(ao_pts) - len(arch) - 1] = r_ao * 1.05
    paint_tube(anat, ao_pts, ao_r, 45, VESSEL)
    m.update(aorta_pts=ao_pts, aorta_r=ao_r, z_arch=z_arch)
    pa = polyline([(10, hc[1] - 0.3 * ax[1], z_heart_top - 10), (26, y_tr - 10, z_carina - 4),
                   (46, y_tr - 2, z_carina - 14)], 4)
    paint_tube(anat, pa, np.array([11.0]), 45, VESSEL, only=[MEDIASTINUM, LUNG_L, LUNG_R, HEART, MUSCLE])
    rpa = polyline([(20, y_tr - 14, z_carina - 4), (-44, y_tr - 6, z_carina - 12)], 4)
    paint_tube(anat, rpa, np.array([9.0]), 45, VESSEL, only=[MEDIASTINUM, LUNG_L, LUNG_R])
    paint_tube(anat, polyline([(-30, asc[1] + 5, top), (-30, asc[1] + 5, z_heart_top - 10)], 4), np.array([9.0]), 40,
               VESSEL, only=[MEDIASTINUM, LUNG_R, FAT, MUSCLE])
    for bx, by, br in ((-12, -20, 6.0), (4, -14, 5.0), (16, -4, 5.5)):
        paint_tube(anat, polyline([(bx, asc[1] + 30 + by * 0.3, z_arch), (bx * 1.8, asc[1] + 30 + by, top)], 5),
                   np.array([br]), 45, VESSEL, only=[MEDIASTINUM, LUNG_R, LUNG_L, MUSCLE, FAT])
    m["vessel_trees"] = _lung_vessels(anat, rng)
    # table under the patient
    tb = (b_b.max() + 12 < Y) & (b_b.max() + 18 > Y) & (np.abs(X) < 200)
    hu[np.broadcast_to(tb, grid.shape)] = 150
    return anat


def _lung_vessels(anat: Anatomy, rng: np.random.Generator) -> list:
    """Branching pulmonary vessel trees from each hilum, splatted and blurred (partial volume)."""
    grid, m = anat.grid, anat.marks
    lung = anat.lung
    splat = np.zeros(grid.shape, np.float32)
    step = 0.6 * min(grid.dxy, grid.dz)
    vox = grid.dxy * grid.dxy * grid.dz
    trees = []
    for side, hil in ((-1, m["hilum_r"]), (1, m["hilum_l"])):
        segs = []
        stack = [(np.array(hil, np.float32), np.array([side * 0.8, 0.1, 0.0]), 5.5, 0)]
        stack += [(np.array(hil, np.float32), np.array([side * 0.5, 0.2, d]), 5.0, 0) for d in (-1.0, 0.9)]
        stack += [(np.array(hil, np.float32), np.array([side * 0.5, -0.6, -0.4]), 4.5, 0)]
        while stack:
            p0, d, r, gen = stack.pop()
            d = d / np.linalg.norm(d)
            length = rng.uniform(16, 30) * (0.9 ** gen) * (1.5 if gen == 0 else 1)
            p1 = p0 + d * length
            segs.append((p0, p1, r, gen))
            if gen < 6 and r > 0.7:
                for _ in range(2 + int(rng.random() < 0.35)):
                    nd = d + rng.normal(0, 0.55, 3)
                    stack.append((p1, nd, r * rng.uniform(0.66, 0.8), gen + 1))
        pts, wts = [], []
        li = np.nonzero(anat.tissue == (LUNG_R if side < 0 else LUNG_L))
        for i in rng.integers(0, len(li[0]), size=min(260, len(li[0]))) if len(li[0]) else []:
            q = np.array([grid.X[0, 0, li[2][i]], grid.Y[0, li[1][i], 0], grid.Z[li[0][i], 0, 0]], np.float32)
            d = q - hil
            dist = float(np.linalg.norm(d)) + 1e-3
            r = 0.7 + 2.8 * np.exp(-dist / 55)
            q1 = q + (d / dist + rng.normal(0, 0.3, 3)) * rng.uniform(8, 20)
            segs.append((q.astype(np.float32), q1.astype(np.float32), r, 9))
        p0s = np.array([s_[0] for s_ in segs], np.float32)
        p1s = np.array([s_[1] for s_ in segs], np.float32)
        rs = np.array([s_[2] for s_ in segs], np.float32)
        ks = np.maximum(2, (np.linalg.norm(p1s - p0s, axis=1) / step).astype(int))
        seg = np.repeat(np.arange(len(segs)), ks)
        start = np.repeat(np.cumsum(ks) - ks, ks)
        frac = ((np.arange(seg.size) - start) / np.repeat(ks - 1, ks)).astype(np.float32)[:, None]
        pts = p0s[seg] + (p1s[seg] - p0s[seg]) * frac
        wts = (2.2 * np.pi * (rs[seg] + 0.4) ** 2 * step / vox).astype(np.float32)
        g = np.rint(pts[:, 2] / grid.dz).astype(int)
        rr = np.rint((pts[:, 1] + grid.cy) / grid.dxy + (grid.h - 1) / 2).astype(int)
        cc = np.rint((pts[:, 0] + grid.cx) / grid.dxy + (grid.w - 1) / 2).astype(int)
        ok = (g >= 0) & (g < grid.n) & (rr >= 0) & (rr < grid.h) & (cc >= 0) & (cc < grid.w)
        g, rr, cc, wts = g[ok], rr[ok], cc[ok], wts[ok]
        inside = lung[g, rr, cc]
        np.add.at(splat, (g[inside], rr[inside], cc[inside]), wts[inside])
        trees.append(segs)
    dens = smooth121(splat, (0, 1, 2) if grid.dz < 1.5 * grid.dxy else (1, 2))
    v = np.clip(dens, 0, 1) * lung
    anat.hu += v * (40 - anat.hu)
    return trees
