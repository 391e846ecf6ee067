"""The shipped configs parse and build; ct-rate.yaml starts and runs 2 steps on a tiny set (small overrides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training_helpers import ROOT, make_data
from training.config import load_config

CONFIGS = sorted((ROOT / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_model_config_is_valid(path):
    from training.engine import model_config

    cfg = load_config(path)
    mc = model_config(cfg.model)
    assert all(n % p == 0 for n, p in zip(mc.input_shape, mc.downsample()))
    assert cfg.train.max_steps > 0 and cfg.train.batch_size > 0


def test_unknown_key_and_bad_override_are_clear_errors(tmp_path):
    from ctvl.errors import CTVLInputError

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    with pytest.raises(CTVLInputError, match="unknown key"):
        load_config(bad)
    with pytest.raises(CTVLInputError, match="key=value"):
        load_config(CONFIGS[0], ["train.max_steps"])


def test_values_of_the_wrong_type_are_clear_errors(tmp_path):
    """A wrong type stops at load with the key named; YAML 1.1's string "3e-4" is read as the number it spells."""
    from ctvl.errors import CTVLInputError

    cfg = load_config(CONFIGS[0], ["optim.lr=3e-4", "optim.betas=[0.9, 1e-1]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.9, pytest.approx(0.1)]
    with_yaml = tmp_path / "lr.yaml"
    with_yaml.write_text("optim:\n  lr: 1e-3\n")  # written by hand, as the papers print it
    assert load_config(with_yaml).optim.lr == pytest.approx(1e-3)
    for override, key, expected in [
        ("train.max_steps=1e3", "train.max_steps", "whole number"),
        ("train.max_steps=true", "train.max_steps", "whole number"),
        ("optim.lr=fast", "optim.lr", "number"),
        ("optim.betas=[0.9, high]", "optim.betas", "number"),
        ("train.grad_checkpointing=yes please", "train.grad_checkpointing", "true or false"),
        ("data.root=[a, b]", "data.root", "text"),
        ("train.freeze=vision.", "train.freeze", "list"),
    ]:
        with pytest.raises(CTVLInputError, match=rf"{key}: expected a {expected}|{key}: expected {expected}"):
            load_config(CONFIGS[0], [override])


def test_cli_refuses_a_wrong_type_with_one_line(tmp_path, capsys):
    from training.__main__ import main

    rc = main(["train", "--config", str(CONFIGS[0]), "--out", str(tmp_path / "run"),
               "--override", "train.max_steps=many"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train.max_steps" in err[0] and "whole number" in err[0]
    assert not (tmp_path / "run").exists()


def test_mixed_precision_settings_are_checked():
    import torch
    from ctvl.errors import CTVLInputError

    from training.engine import amp_dtype

    with pytest.raises(CTVLInputError, match="train.amp"):
        load_config(CONFIGS[0], ["train.amp=fp8"])
    with pytest.raises(CTVLInputError, match="cpu_amp"):
        load_config(CONFIGS[0], ["train.amp=fp16", "train.cpu_amp=true"])
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    tc = load_config(CONFIGS[0], ["train.amp=bf16"]).train
    assert amp_dtype(tc, cpu) is None and amp_dtype(tc, gpu) == torch.bfloat16  # CPU stays fp32 by default
    tc = load_config(CONFIGS[0], ["train.amp=bf16", "train.cpu_amp=true"]).train
    assert amp_dtype(tc, cpu) == torch.bfloat16
    tc = load_config(CONFIGS[0], ["train.amp=bf16", "train.cpu_amp=auto"]).train  # bf16 only where it is native
    assert amp_dtype(tc, cpu, native_bf16=lambda: True) == torch.bfloat16
    assert amp_dtype(tc, cpu, native_bf16=lambda: False) is None and amp_dtype(tc, cpu, lambda: None) is None
    assert amp_dtype(tc, gpu) == torch.bfloat16
    with pytest.raises(CTVLInputError, match="true, false or auto"):
        load_config(CONFIGS[0], ["train.cpu_amp=sometimes"])
    with pytest.raises(CTVLInputError, match="cpu_amp"):
        load_config(CONFIGS[0], ["train.amp=fp16", "train.cpu_amp=auto"])
    assert amp_dtype(load_config(CONFIGS[0], ["train.amp=fp16"]).train, gpu) == torch.float16
    assert amp_dtype(load_config(CONFIGS[0], ["train.amp=none"]).train, gpu) is None


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    from training.utils import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_has_native_bf16(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cpu_has_native_bf16(info) is False
    assert cpu_has_native_bf16(tmp_path / "missing") is None
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # ARM: no x86 flags line, no guess
    assert cpu_has_native_bf16(info) is None


def test_ct_rate_config_runs_two_steps(tmp_path):
    from training.__main__ import main

    torch.set_num_threads(1)
    data = make_data(tmp_path / "d", n=4)
    overrides = [
        "model.input_shape=[16,32,32]", "model.spacing=[8.0,8.0,8.0]", "model.stem_channels=[4,8]",
        "model.stem_strides=[[2,2,2],[2,4,4]]", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "model.shared_dim=16", "model.proj_hidden=32", "model.text_trainable_layers=0",
        "train.max_steps=2", "train.batch_size=2", "data.num_workers=0", "data.cache_workers=1",
    ]
    args = ["train", "--config", str(ROOT / "training/configs/ct-rate.yaml"), "--data", str(data),
            "--out", str(tmp_path / "run"), "--no-progress"]
    for o in overrides:
        args += ["--override", o]
    assert main(args) == 0
    assert (Path(tmp_path / "run" / "checkpoints" / "step_0000002.pt")).is_file()
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.name == "ct-rate" and saved.train.grad_checkpointing


def test_the_demo_recipe_builds_the_embedded_model():
    """phantom-demo.yaml is the recipe of the embedded weights: same architecture and preprocessing."""
    from ctvl.model import ModelConfig

    from training.engine import model_config

    embedded = ROOT / "CTVLExtension" / "Logic" / "weights" / "demo" / "config.json"
    if not embedded.is_file():
        pytest.skip("no embedded demo weights")
    cfg = load_config(ROOT / "training" / "configs" / "phantom-demo.yaml")
    want = ModelConfig.from_dict(json.loads(embedded.read_text())).replace(extra={})
    # the locate label weight is fitted after training (`training calibrate`, applied by `export --calibration`)
    assert model_config(cfg.model).replace(extra={}) == want.replace(locate_label_weight=0.0)
