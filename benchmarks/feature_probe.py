"""Is a label in the trained encoder's features at all? Linear probes on frozen features next to the model's score.

    python -m benchmarks.feature_probe [--weights CTVLExtension/Logic/weights/demo] [--data data/phantom]

Encodes the `train` and `valid` splits once with the weights (no augmentation) and keeps, per scan, the global
maximum and mean of three frozen feature maps: the CNN branch behind the pooled embedding, the transformer tokens
and the label tokens behind the heatmaps and the MIL score. A logistic regression per label (standardised, C=0.01;
800 scans against 256-1024 features) is fitted on `train` and scored on `valid` (AUROC), beside the model's own
shipped score on the same scans. Where every probe stays near the model's score, a new head on this encoder will
not read the label better: it is the encoder that has not learned it (its features must change, which takes
training the encoder). Prints the table and writes benchmarks/results/feature_probe.json. About 8 min on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_json

log = logging.getLogger("feature_probe")
FEATURES = ("cnn_branch", "transformer", "label_tokens")
PROBE_C = 0.01


def _max_mean(x) -> np.ndarray:
    """[B, N, C] -> [B, 2C]: global maximum and mean over the N positions."""
    import torch

    return torch.cat([x.amax(1), x.mean(1)], -1).float().numpy()


def encode_split(model, root: Path, split: str) -> dict[str, np.ndarray]:
    """Frozen global features (`FEATURES`), the model's shipped logits ("model") and the labels of one split."""
    import torch
    from tqdm.auto import tqdm

    from training.engine import bin_depth, model_preprocess
    from training.evaluate import _batches, _dataset

    ds = _dataset(root, split, model_preprocess(model), bin_depth(model), None, None, 2)
    pos, neg = model.prompt_embeddings()
    out: dict[str, list] = {k: [] for k in (*FEATURES, "model", "labels")}
    with torch.no_grad():
        for batch in tqdm(_batches(ds, 16), total=-(-len(ds) // 16), desc=f"encode {split}"):
            image = batch["image"].float()
            x = model.vision.with_blobs(image)
            feats, _skip, stem = model.vision.forward_features(x)
            out["transformer"].append(_max_mean(feats.flatten(1, 3)))
            branch = model.cnn_branch(stem) if model.cnn_branch is not None else stem
            out["cnn_branch"].append(_max_mean(branch.flatten(2).transpose(1, 2)))
            emb = model.encode_image(image)
            tokens = model.label_tokens(emb)
            out["label_tokens"].append(_max_mean(tokens.flatten(1, 3)))
            out["model"].append(model.final_disease_logits(emb.pooled, pos, neg, tokens=tokens,
                                                           mask=batch["bin_valid"], evidence=emb.evidence).numpy())
            out["labels"].append(batch["labels"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def probe(xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> tuple[list[float], list[float]]:
    """Logistic regression per label on standardised features -> (valid AUROC, train AUROC) per label."""
    from sklearn.linear_model import LogisticRegression

    from training.metrics import auroc

    mean, std = xt.mean(0), xt.std(0) + 1e-6
    xt, xv = (xt - mean) / std, (xv - mean) / std
    valid, train = [], []
    for k in range(yt.shape[1]):
        known_t, known_v = np.isfinite(yt[:, k]), np.isfinite(yv[:, k])  # a label the CSV lacks for a scan
        if len(np.unique(yt[known_t, k])) < 2:
            valid.append(float("nan"))
            train.append(float("nan"))
            continue
        clf = LogisticRegression(C=PROBE_C, max_iter=3000).fit(xt[known_t], yt[known_t, k])
        valid.append(auroc(yv[known_v, k], clf.decision_function(xv[known_v])))
        train.append(auroc(yt[known_t, k], clf.decision_function(xt[known_t])))
    return valid, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="CTVLExtension/Logic/weights/demo")
    ap.add_argument("--data", default="data/phantom")
    ap.add_argument("--out", default=str(RESULTS / "feature_probe.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from ctvl.model import load_weights
    from ctvl.prompts import LABELS

    from training.metrics import auroc

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_weights(args.weights, device="cpu").eval()
    if model.config.encoder != "hybrid":
        raise SystemExit(f"{args.weights}: the probe reads the hybrid encoder's CNN branch; these weights are "
                         f"{model.config.encoder!r}")
    root = Path(args.data)
    train, valid = encode_split(model, root, "train"), encode_split(model, root, "valid")
    yt, yv = train["labels"], valid["labels"]
    result: dict = {"weights": args.weights, "data": str(root), "n_train": len(yt), "n_valid": len(yv),
                    "probe_C": PROBE_C, "labels": list(LABELS),
                    "model_valid": [auroc(yv[:, k], valid["model"][:, k]) for k in range(len(LABELS))],
                    "model_train": [auroc(yt[:, k], train["model"][:, k]) for k in range(len(LABELS))]}
    sets = {name: (name,) for name in FEATURES} | {"all": FEATURES}
    for name, keys in sets.items():
        xt = np.concatenate([train[k] for k in keys], 1)
        xv = np.concatenate([valid[k] for k in keys], 1)
        result[f"probe_{name}_valid"], result[f"probe_{name}_train"] = probe(xt, yt, xv, yv)
        log.info("probe %s (%d features) done", name, xt.shape[1])
    cols = ["model", *(f"probe_{n}" for n in sets)]
    print(f"{'valid AUROC (train)':36s} " + " ".join(f"{c:>22s}" for c in cols))
    for k, label in enumerate(LABELS):
        print(f"{label:36s} " + " ".join(f"{result[c + '_valid'][k]:>14.2f} ({result[c + '_train'][k]:.2f})"
                                         for c in cols))
    print(f"{'MEAN':36s} " + " ".join(f"{np.nanmean(result[c + '_valid']):>14.3f} "
                                      f"({np.nanmean(result[c + '_train']):.2f})" for c in cols))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
