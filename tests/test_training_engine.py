"""Training loop: loss falls, kill-and-resume is exact, export -> load round trip, 2-process gloo DDP."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from ctvl.errors import CTVLInputError, CTVLWeightsError
from ctvl.prompts import LABELS

from tests.training_helpers import ROOT, final_state, make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return make_data(tmp_path_factory.mktemp("tinydata"))


def test_loss_falls(data, tmp_path):
    from training.engine import train

    cfg = tiny_config(data, **{"train.max_steps": 12, "data.augment.enabled": "false", "optim.warmup_steps": 1})
    summary = train(cfg, tmp_path / "run", progress=False)
    losses = summary["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "run" / "log.csv").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert summary["snippet_stats"]["kept"] > 0


def test_cpu_bf16_autocast_trains(data, tmp_path, monkeypatch):
    """train.cpu_amp runs the step under bf16 autocast on CPU (off by default; `auto` only where the CPU does bf16
    in hardware) and the loss still falls (here with an extra input window and anti-aliased preprocessing too); the
    model card names each."""
    from training import engine

    seen = []
    real = engine.TrainStep.forward

    def spy(self, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, batch)

    monkeypatch.setattr(engine.TrainStep, "forward", spy)
    over = {"train.max_steps": 12, "data.augment.enabled": "false", "optim.warmup_steps": 1, "train.amp": "bf16"}
    engine.train(tiny_config(data, **over), tmp_path / "fp32", progress=False)
    assert seen and not any(seen)
    seen.clear()
    # and a windowed channel, and blobness channels read from the cache's sidecars
    over.update({"train.cpu_amp": "true", "model.input_windows_hu": "[[-160, 240]]",
                 "model.input_blob_scales_mm": "[8.0, 16.0]", "model.density_edges_hu": "[-500, 200]",
                 "model.blob_tokens": "true", "model.mil_disease": "true", "loss.mil.enabled": "true",
                 "model.blob_readout": "true", "model.input_antialias": "true"})
    summary = engine.train(tiny_config(data, **over), tmp_path / "bf16", progress=False)
    assert seen and all(seen)
    seen.clear()
    # auto: fp32 on a CPU without bf16 in hardware (where emulated bf16 is over 10x slower)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    engine.train(tiny_config(data, **{**over, "train.cpu_amp": "auto", "train.max_steps": 2}), tmp_path / "auto",
                 progress=False)
    assert seen and not any(seen)
    losses = summary["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    from training.export import export

    cards = [(export(engine.latest_checkpoint(tmp_path / r), tmp_path / f"w-{r}") / "card.md").read_text()
             for r in ("fp32", "bf16", "auto")]
    assert "autocast bf16 on GPU, steps in fp32 on cpu" in cards[0]
    assert "autocast bf16 on GPU, steps in bf16 on cpu" in cards[1] and "steps in fp32 on cpu" in cards[2]
    assert "re-windowed" not in cards[0] and "re-windowed to [-160.0, 240.0] HU" in cards[1]
    assert "blobness" not in cards[0] and "Hessian blobness at 8.0 mm, Hessian blobness at 16.0 mm" in cards[1]
    assert "anti-aliasing" not in cards[0] and "Gaussian anti-aliasing prefilter, then linear" in cards[1]
    assert "blobness maximum per token" in cards[1] and "per-label blobness readout" in cards[1]
    readout = final_state(tmp_path / "bf16")["evidence_weights"]
    assert readout.shape == (len(LABELS), 2) and readout.abs().sum() > 0  # trained from zero by the MIL term


def test_grounded_localization_term_is_trained_and_logged(data, tmp_path):
    import csv

    from training.engine import train

    over = {"train.max_steps": 3, "model.token_localization": "true", "loss.token_localization.enabled": "true",
            "loss.token_localization.weight": 0.5}
    train(tiny_config(data, **over), tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert any(float(r["token_localization"]) > 0 for r in rows)
    assert all((float(r["token_localization"]) > 0) == (float(r["localization"]) > 0) for r in rows)  # same pairs
    from training.engine import latest_checkpoint
    from training.export import export

    card = (export(latest_checkpoint(tmp_path / "run"), tmp_path / "weights") / "card.md").read_text()
    assert "tokens' (grounded) scores" in card and "token_localization (weight 0.5)" in card
    # a model without grounded scores ignores the term (nothing to train)
    over["model.token_localization"] = "false"
    train(tiny_config(data, **over), tmp_path / "off", progress=False)
    assert "token_localization" not in (tmp_path / "off" / "log.csv").read_text().splitlines()[0]


def test_report_guided_mil_trains(data, tmp_path, monkeypatch):
    import training.losses as L
    from training.engine import train

    seen = []
    real = L.guided_token_mask
    valid = []
    monkeypatch.setattr(L, "guided_token_mask",
                        lambda *a, **k: valid.append(a[2]) or seen.append(real(*a, **k)) or seen[-1])
    over = {"train.max_steps": 3, "model.mil_disease": "true", "loss.mil.enabled": "true", "loss.mil.guided": "true",
            "loss.mil.guide_margin_bins": 1.0}
    summary = train(tiny_config(data, **over), tmp_path / "run", progress=False)
    assert len(seen) == 3 and all(m.ndim == 3 and m.shape[1] == 18 for m in seen)  # [B, labels, bins] every step
    # some positive label was held to the bins its snippet cites (not only the scan's valid bins)
    assert any((m != v[:, None, :]).any() for m, v in zip(seen, valid))
    assert all(torch.isfinite(torch.tensor(summary["losses"])))


def test_kill_and_resume_is_exact(data, tmp_path):
    from training.engine import train

    cfg = tiny_config(data, **{"train.max_steps": 6, "train.checkpoint_every": 100})
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "split", progress=False, stop_after=4)  # "killed" after step 4 (mid-epoch 2)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zero_steps_prepares_the_cache_and_trains_nothing(data, tmp_path, capsys):
    """`--override train.max_steps=0` caches the corpus and stops (benchmarks/device_demo.sh caches once this way
    before several runs start side by side); a run resumed at its last step runs no step either."""
    from training.__main__ import main

    base = ["train", "--config", str(ROOT / "training/configs/tiny-test.yaml"), "--data", str(data), "--no-progress",
            "--override", f"data.cache_dir={tmp_path / 'cache'}", "--override", "train.checkpoint_every=100"]
    assert main(base + ["--out", str(tmp_path / "prep"), "--override", "train.max_steps=0"]) == 0
    out = capsys.readouterr().out
    assert "trained 0 steps" in out and "no step run" in out
    assert list((tmp_path / "cache").glob("*.npy"))
    assert not list((tmp_path / "prep").glob("checkpoints/step_*.pt"))
    assert main(base + ["--out", str(tmp_path / "run"), "--override", "train.max_steps=2"]) == 0
    assert "last loss" in capsys.readouterr().out
    assert main(base + ["--out", str(tmp_path / "run"), "--override", "train.max_steps=2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "no step run" in out


def test_export_load_round_trip(data, tmp_path):
    from ctvl.model import load_weights

    from training.engine import latest_checkpoint, train
    from training.export import export, model_from_checkpoint

    cfg = tiny_config(data, **{"train.max_steps": 2})
    train(cfg, tmp_path / "run", progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    out = export(ckpt, tmp_path / "weights")
    assert {"config.json", "model.safetensors", "prompts.json", "card.md"} <= {p.name for p in out.iterdir()}
    a, _ = model_from_checkpoint(ckpt)
    b = load_weights(out)
    x = torch.rand(2, 1, *a.config.input_shape)
    with torch.no_grad():
        ea, eb = a.encode_image(x), b.encode_image(x)
        assert torch.equal(ea.pooled, eb.pooled) and torch.equal(ea.bins, eb.bins)
        ta, tb = a.encode_text(["a lung nodule"]), b.encode_text(["a lung nodule"])
        assert torch.equal(ta, tb)
    # a `training calibrate` fit sets its config values and is named on the card; anything else is refused
    calib = tmp_path / "calibration.json"
    calib.write_text(json.dumps({"config": {"locate_label_weight": 0.3}, "split": "valid", "rule": "R",
                                 "locate_label_weight": 0.3}))
    fitted = export(ckpt, tmp_path / "fitted", calibration=calib)
    assert load_weights(fitted).config.locate_label_weight == 0.3 and b.config.locate_label_weight == 0.0
    assert "fitted on split 'valid' (R)" in (fitted / "card.md").read_text()
    calib.write_text(json.dumps({"config": {"mil_r": 1.0}}))
    with pytest.raises(CTVLWeightsError, match="unknown config values"):
        export(ckpt, tmp_path / "bad", calibration=calib)
    # inference-time settings (--set): written, named on the card, the weights untouched; others refused
    set_ = export(ckpt, tmp_path / "set", settings=["heatmap_subdivision=[1, 2, 2]", "locate_peak_radius=0"])
    c = load_weights(set_)
    assert c.config.heatmap_subdivision == (1, 2, 2) and c.config.locate_peak_radius == 0
    assert "shift-and-stitch, [1, 2, 2] cells per token" in (set_ / "card.md").read_text()
    assert "label heatmaps: token grid" in (out / "card.md").read_text()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in c.state_dict().items())
    with pytest.raises(CTVLInputError, match="not one of"):
        export(ckpt, tmp_path / "bad", settings=["mil_r=1.0"])
    with pytest.raises(CTVLWeightsError, match="heatmap_subdivision"):
        export(ckpt, tmp_path / "bad", settings=["heatmap_subdivision=[1, 3, 2]"])
    with pytest.raises(CTVLWeightsError, match="heatmap_subdivision"):
        export(ckpt, tmp_path / "bad", settings=["heatmap_subdivision=abc"])
    with pytest.raises(CTVLWeightsError, match="unknown heatmap_guidance"):
        export(ckpt, tmp_path / "bad", settings=["heatmap_guidance=gradcam"])
    assert not c.config.mil_disease  # guidance follows the MIL logit's gradient: refused for a model without one
    with pytest.raises(CTVLWeightsError, match="heatmap_guidance needs mil_disease"):
        export(ckpt, tmp_path / "bad", settings=["heatmap_guidance=input_x_gradient"])
    with pytest.raises(CTVLWeightsError, match="locate_peak_radius: expected a whole number"):
        export(ckpt, tmp_path / "bad", settings=["locate_peak_radius=wide"])
    with pytest.raises(CTVLInputError, match="--eval: cannot read"):
        export(ckpt, tmp_path / "bad", eval_report=tmp_path / "no-report.json")
    (tmp_path / "notes.txt").write_text("not json")
    with pytest.raises(CTVLInputError, match="--calibration: not JSON"):
        export(ckpt, tmp_path / "bad", calibration=tmp_path / "notes.txt")
    assert not (tmp_path / "bad").exists()
    # an exported directory is a source too (its checkpoint need not be at hand), in place: new settings and
    # calibration, the same tensors, the card's training section kept verbatim
    import shutil

    from training.__main__ import main

    again = shutil.copytree(fitted, tmp_path / "again")
    calib.write_text(json.dumps({"config": {"locate_label_weight": 0.4, "locate_laterality": True}, "split": "valid",
                                 "rule": "R", "locate_label_weight": 0.4}))
    assert main(["export", str(again), "--out", str(again), "--calibration", str(calib), "--set",
                 "heatmap_subdivision=[1, 2, 2]"]) == 0
    d = load_weights(again)
    assert d.config.locate_label_weight == 0.4 and d.config.locate_laterality and d.config.heatmap_subdivision == (
        1, 2, 2)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in d.state_dict().items())
    card, before = (again / "card.md").read_text(), (fitted / "card.md").read_text()
    section = before[before.index("## Training data"):before.index("## Metrics")]
    assert section in card and "2 steps" in section
    assert "0.4 x the heatmap peaks of the labels a text names (on the patient side it names)" in card
    # without --calibration the card still names the weight the config carries (not where it was fitted)
    plain = export(again, tmp_path / "plain", settings=["locate_peak_radius=1"])
    line = next(x for x in (plain / "card.md").read_text().splitlines() if x.startswith("- depth-bin"))
    assert line.endswith("; plus 0.4 x the heatmap peaks of the labels a text names (on the patient side it names)")


def test_ddp_two_processes_gloo(data, tmp_path):
    """torchrun-equivalent: 2 CPU processes, gloo; ranks end with identical weights, and train closes the process
    group it opened (a gloo rank exiting with it open can abort: "terminate called without an active exception")."""
    import subprocess

    out = tmp_path / "ddp"
    args = ["train", "--config", str(ROOT / "training/configs/tiny-test.yaml"), "--data", str(data), "--out",
            str(out), "--no-progress", "--override", "train.max_steps=3", "--override", "train.batch_size=1",
            "--override", "train.checkpoint_every=100", "--override", f"data.cache_dir={tmp_path / 'cache'}"]
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from training.__main__ import main\n"
        f"rc = main({args!r})\n"
        "assert not torch.distributed.is_initialized(), 'train left its process group open'\n"
        "sys.exit(rc)\n"
    )
    (tmp_path / "ddp_main.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "ddp_main.py")]  # --standalone: torchrun picks a free rendezvous port itself
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_label_biases_start_at_the_prior_log_odds():
    import types

    import numpy as np
    import torch
    from ctvl.model import CTVLModel, tiny_config

    from training.engine import init_label_priors

    model = CTVLModel(tiny_config("hybrid").replace(mil_disease=True))
    labels = np.zeros((4, 18), dtype=np.float32)
    labels[:1, 0] = 1.0  # 25 % prevalence for the first label
    labels[:, 1] = np.nan  # unknown everywhere -> clamped prior, never NaN
    ds = types.SimpleNamespace(records=[types.SimpleNamespace(labels=row) for row in labels])
    init_label_priors(model, ds)
    assert torch.isfinite(model.disease_bias).all()
    assert abs(float(model.disease_bias.detach()[0]) - float(np.log(0.25 / 0.75))) < 1e-6
    torch.testing.assert_close(model.mil_bias, model.disease_bias)


def test_fine_tune_from_weights_with_frozen_encoder(data, tmp_path):
    """`init_weights` + `train.freeze`: the named tensors stay bit-identical, the rest trains, and the trained
    label biases are kept (not reset to the training set's priors); a prefix that names nothing is refused."""
    from ctvl.model import load_weights

    from training.engine import latest_checkpoint, train
    from training.export import export

    train(tiny_config(data, **{"train.max_steps": 2}), tmp_path / "base", progress=False)
    weights = export(latest_checkpoint(tmp_path / "base"), tmp_path / "weights")
    start = load_weights(weights).state_dict()
    frozen = ["vision.", "disease_bias"]
    cfg = tiny_config(data, **{"train.max_steps": 3, "init_weights": str(weights),
                               "train.freeze": "[" + ", ".join(frozen) + "]", "data.augment.enabled": "false"})
    train(cfg, tmp_path / "tuned", progress=False)
    tuned = final_state(tmp_path / "tuned")
    fixed = [k for k in tuned if any(k.startswith(p) for p in frozen)]
    assert fixed and all(torch.equal(tuned[k], start[k]) for k in fixed)
    assert not torch.equal(tuned["token_head.1.weight"], start["token_head.1.weight"])
    card = (export(latest_checkpoint(tmp_path / "tuned"), tmp_path / "tuned-weights") / "card.md").read_text()
    assert f"started from the weights {weights}, with vision., disease_bias frozen" in card
    # without freezing, the biases start from the weights' trained values, not the priors
    cfg = tiny_config(data, **{"train.max_steps": 1, "init_weights": str(weights), "optim.lr": 0.0})
    train(cfg, tmp_path / "zero-lr", progress=False)
    assert torch.equal(final_state(tmp_path / "zero-lr")["disease_bias"], start["disease_bias"])
    with pytest.raises(CTVLInputError, match="no parameter starts with"):
        train(tiny_config(data, **{"train.max_steps": 1, "train.freeze": "[visoin.]"}), tmp_path / "typo",
              progress=False)
    with pytest.raises(CTVLInputError, match="train.freeze: expected a list"):
        tiny_config(data, **{"train.freeze": "vision."})
    with pytest.raises(CTVLInputError, match="train.freeze: expected text"):
        tiny_config(data, **{"train.freeze": "[3]"})
    with pytest.raises(CTVLInputError, match="list of parameter-name prefixes"):  # an empty prefix would match all
        tiny_config(data, **{"train.freeze": "['']"})


def test_export_refuses_a_missing_or_broken_checkpoint_in_one_line(tmp_path, capsys):
    from training.__main__ import main

    broken = tmp_path / "step_00000010.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    for path, problem in [(tmp_path / "missing.pt", "no such checkpoint file"),
                          (broken, "not a readable checkpoint"), (foreign, "not a training checkpoint")]:
        assert main(["export", str(path), "--out", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and "Traceback" not in err and len(err.splitlines()) == 1
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    assert main(["export", str(empty_run), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no checkpoint found" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()
