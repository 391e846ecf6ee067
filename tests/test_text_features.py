"""training.text_features: a table of the frozen text tower's sentence features replaces running the tower."""

from __future__ import annotations

import pytest
import torch
from ctvl.errors import CTVLInputError

from tests.training_helpers import TINY, make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    root = make_data(tmp_path_factory.mktemp("textdata"), n=4)
    return make_data(root, n=2, seed=1, split="valid")


@pytest.fixture(scope="module")
def table(data, tmp_path_factory):
    from training.__main__ import main

    path = tmp_path_factory.mktemp("table") / "text.safetensors"
    assert main(["text-features", "--config", str(TINY), "--data", str(data), "--splits", "train", "valid",
                 "--out", str(path)]) == 0
    return path


def _model(data, **over):
    from training.engine import build_model

    torch.manual_seed(0)  # the same weights for every model built here
    return build_model(tiny_config(data, **over)).eval()


def test_a_table_gives_the_towers_features_and_nothing_else(data, table):
    from training.data import CTRateDataset, Preprocess
    from training.text_features import use_table

    plain, tabled = _model(data), _model(data)
    n = use_table(tabled, table)
    report = CTRateDataset(data, "valid", Preprocess.from_model_config(plain.config)).records[0].text
    with torch.no_grad():
        for a, b in [(plain.encode_reports([report]), tabled.encode_reports([report])),
                     (plain.prompt_embeddings()[0], tabled.prompt_embeddings()[0])]:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        with pytest.raises(CTVLInputError, match="not in it, e.g. 'a sentence no report has'"):
            tabled.encode_text(["a sentence no report has"])
        plain.encode_text(["a sentence no report has"])  # the plain model still runs its tower
    assert n > 10


def test_training_with_the_table_matches_training_without(data, table, tmp_path):
    from training.engine import train

    plain = train(tiny_config(data, tmp_path / "cache", **{"train.max_steps": 3}), tmp_path / "plain", progress=False)
    tabled = train(tiny_config(data, tmp_path / "cache", **{"train.max_steps": 3, "train.text_features": str(table)}),
                   tmp_path / "tabled", progress=False)
    assert len(plain["losses"]) == len(tabled["losses"]) == 3
    torch.testing.assert_close(torch.tensor(tabled["losses"]), torch.tensor(plain["losses"]), rtol=1e-4, atol=1e-5)


def test_a_table_for_another_tower_or_no_table_is_refused(data, table, tmp_path):
    from training.text_features import use_table

    with pytest.raises(CTVLInputError, match="written for a text tower"):
        use_table(_model(data, **{"model.text_max_tokens": 64}), table)
    (tmp_path / "foreign.safetensors").write_bytes(b"not a table")
    with pytest.raises(CTVLInputError, match="not a text-feature table"):
        use_table(_model(data), tmp_path / "foreign.safetensors")
    with pytest.raises(CTVLInputError, match="no such text-feature table"):
        use_table(_model(data), tmp_path / "missing.safetensors")


def test_the_command_refuses_a_missing_split_in_one_line(data, tmp_path, capsys):
    from training.__main__ import main

    assert main(["text-features", "--config", str(TINY), "--data", str(data), "--splits", "test",
                 "--out", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no reports for split 'test'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t.safetensors").exists()
