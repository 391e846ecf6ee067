"""Why the model gets CT densitometry: how much of each label a linear model reads from HU-band fractions alone,
next to a plain 3D CNN trained end to end on the same model grid for a few hundred steps.

    python -m benchmarks.density_probe [--data data/phantom] [--cnn-steps 300]

Both read the cached model grid of the `train` split (800 phantoms) and are scored on `valid` (AUROC per label):
(a) logistic regression (C=0.1, standardised) on log HU-band fractions per body region, exactly the features
`ctvl.model.densitometry` gives the model (demo edges, 3x2x2 regions); (b) the model's regional density head
alone (an MLP) trained 640 steps at batch 16 on the same features, unscaled and standardised per feature (why the
demo model has `density_norm`); (c) four conv stages (GroupNorm, GELU), global max+mean and a linear BCE head,
AdamW 1e-3, batch 16. Prints all and writes benchmarks/results/density_probe.json. About 1 min for (a) and (b) and
1 s per CNN step on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_json

log = logging.getLogger("density_probe")


def _dataset(root: Path, split: str):
    from ctvl.model import demo_config

    from training.data import CTRateDataset, Preprocess

    mc = demo_config()
    ds = CTRateDataset(root, split, Preprocess.from_model_config(mc))
    ds.prepare(workers=2, progress=False)
    return ds, mc


def _arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i in range(len(ds)) if ds.load_array(i) is not None]
    x = np.stack([ds.load_array(i) for i in keep]).astype(np.float16)
    y = np.stack([ds.records[i].labels for i in keep]).astype(np.float32)
    return x, y


def _aurocs(y: np.ndarray, scores: np.ndarray) -> list[float]:
    from training.metrics import auroc  # the evaluation's own AUROC (NaN when a label has one class)

    return [auroc(y[:, k], scores[:, k]) for k in range(y.shape[1])]


def regional_density_features(x: np.ndarray, mc) -> np.ndarray:
    import torch
    from ctvl.model.densitometry import DensityBands, log_fractions, regional_fractions

    bands = DensityBands(mc.density_edges_hu, mc.hu_window)
    out = []
    for i in range(0, len(x), 16):
        frac = bands.pool(torch.from_numpy(x[i:i + 16].astype(np.float32))[:, None], mc.downsample())
        out.append(log_fractions(regional_fractions(frac, mc.density_regions)).numpy())
    return np.concatenate(out)


def density_linear(ft, yt, fv, yv) -> list[float]:
    """Logistic regression per label on regional density features (train ft, valid fv)."""
    from sklearn.linear_model import LogisticRegression

    mean, std = ft.mean(0), ft.std(0) + 1e-6
    scores = np.stack([LogisticRegression(C=0.1, max_iter=3000).fit((ft - mean) / std, yt[:, k])
                       .decision_function((fv - mean) / std) for k in range(yt.shape[1])], axis=1)
    return _aurocs(yv, scores)


def density_mlp(ft, yt, fv, yv, standardise: bool, steps: int = 640, seed: int = 0) -> list[float]:
    """The model's regional density head alone (LayerNorm-Linear-GELU-Linear, AdamW 1e-3, batch 16), trained with
    BCE for `steps` on the log fractions, either as they are or standardised per feature (`density_norm`)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if standardise:
        mean, std = ft.mean(0), ft.std(0) + 1e-3
        ft, fv = (ft - mean) / std, (fv - mean) / std
    torch.manual_seed(seed)
    head = nn.Sequential(nn.LayerNorm(ft.shape[1]), nn.Linear(ft.shape[1], 256), nn.GELU(), nn.Linear(256, yt.shape[1]))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    a, y = torch.tensor(ft, dtype=torch.float32), torch.from_numpy(yt)
    gen = np.random.default_rng(seed)
    for _ in range(steps):
        idx = gen.integers(0, len(a), 16)
        loss = F.binary_cross_entropy_with_logits(head(a[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = head(torch.tensor(fv, dtype=torch.float32)).numpy()
    return _aurocs(yv, scores)


def plain_cnn(xt, yt, xv, yv, steps: int, seed: int = 0) -> list[float]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)

    def stage(cin: int, cout: int, stride) -> nn.Module:
        return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.GELU())

    net = nn.Sequential(stage(1, 16, (1, 2, 2)), stage(16, 32, 2), stage(32, 64, 2), stage(64, 128, 2))
    head = nn.Linear(256, yt.shape[1])
    prior = torch.from_numpy(yt.mean(0)).clamp(0.02, 0.98)
    head.bias.data = torch.log(prior / (1 - prior))
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)

    def forward(batch: np.ndarray) -> torch.Tensor:
        f = net(torch.from_numpy(batch.astype(np.float32))[:, None])
        return head(torch.cat([f.amax((2, 3, 4)), f.mean((2, 3, 4))], 1))

    gen = np.random.default_rng(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = gen.integers(0, len(xt), 16)
        loss = F.binary_cross_entropy_with_logits(forward(xt[idx]), torch.from_numpy(yt[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log.info("cnn step %d loss %.3f (%.0f s)", step, loss.item(), time.perf_counter() - start)
    net.eval()
    with torch.no_grad():
        scores = torch.cat([forward(xv[i:i + 25]) for i in range(0, len(xv), 25)]).numpy()
    return _aurocs(yv, scores)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/phantom")
    ap.add_argument("--cnn-steps", type=int, default=300, help="0 skips the CNN")
    ap.add_argument("--out", default=str(RESULTS / "density_probe.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ctvl.prompts import LABELS

    root = Path(args.data)
    train, mc = _dataset(root, "train")
    valid, _ = _dataset(root, "valid")
    xt, yt = _arrays(train)
    xv, yv = _arrays(valid)
    result = {"data": str(root), "n_train": len(xt), "n_valid": len(xv), "labels": list(LABELS)}
    ft, fv = regional_density_features(xt, mc), regional_density_features(xv, mc)  # once, for (a) and (b)
    result["density_linear"] = density_linear(ft, yt, fv, yv)
    print(f"linear model on regional HU-band fractions: mean validation AUROC "
          f"{np.nanmean(result['density_linear']):.3f}")
    for key, std in (("density_mlp", False), ("density_mlp_standardised", True)):
        result[key] = density_mlp(ft, yt, fv, yv, standardise=std)
        print(f"MLP head on regional HU-band fractions{' standardised' if std else ''}, 640 steps at batch 16: mean "
              f"validation AUROC {np.nanmean(result[key]):.3f}")
    if args.cnn_steps > 0:
        result["cnn_steps"] = args.cnn_steps
        result["plain_cnn"] = plain_cnn(xt, yt, xv, yv, args.cnn_steps)
        print(f"plain 3D CNN, {args.cnn_steps} steps at batch 16: mean validation AUROC "
              f"{np.nanmean(result['plain_cnn']):.3f}")
    for k, label in enumerate(LABELS):
        cnn = f"  cnn {result['plain_cnn'][k]:.2f}" if "plain_cnn" in result else ""
        print(f"  {label:36s} density {result['density_linear'][k]:.2f}  mlp {result['density_mlp'][k]:.2f}  "
              f"standardised {result['density_mlp_standardised'][k]:.2f}{cnn}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
