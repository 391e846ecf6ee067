"""ctvl.model.densitometry: HU-band fractions per token, and the model paths that use them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ctvl.errors import CTVLWeightsError  # noqa: E402
from ctvl.model import CTVLModel, load_weights, save_weights, tiny_config  # noqa: E402
from ctvl.model.densitometry import DensityBands, bin_fractions, regional_fractions  # noqa: E402

WINDOW = (-1000.0, 1000.0)


def _windowed(hu: torch.Tensor) -> torch.Tensor:
    return (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def test_band_edges_follow_hu():
    bands = DensityBands((-950.0, 0.0, 130.0), WINDOW)
    hu = torch.tensor([-1000.0, -950.0, -949.0, 0.0, 10.0, 130.0, 131.0, 1000.0])
    assert bands.band_index(_windowed(hu)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # edges[k-1] < HU <= edges[k]
    assert bands.n_bands == 4


def test_pool_equals_one_hot_average_and_sums_to_one():
    bands = DensityBands((-800.0, -400.0, 0.0, 200.0), WINDOW)
    x = torch.rand(2, 1, 9, 10, 13, generator=torch.Generator().manual_seed(0))  # not divisible by the tokens
    frac = bands.pool(x, (2, 4, 4))
    assert frac.shape == (2, 5, 4, 2, 3)
    one_hot = F.one_hot(bands.band_index(x[:, 0, :8, :8, :12]), 5).permute(0, 4, 1, 2, 3).float()
    torch.testing.assert_close(frac, F.avg_pool3d(one_hot, (2, 4, 4)))
    torch.testing.assert_close(frac.sum(1), torch.ones(2, 4, 2, 3))


def test_an_emphysema_like_region_is_counted_where_it_is():
    bands = DensityBands((-950.0,), WINDOW)
    hu = torch.full((1, 1, 8, 8, 8), -850.0)
    hu[..., :4, :4, 4:] = -980.0  # low attenuation in one corner: superior half, anterior, patient left
    frac = bands.pool(_windowed(hu), (2, 2, 2))
    low = frac[0, 0]
    assert low[:2, :2, 2:].min() == 1 and low.sum() == 8  # exactly those 2x2x2 tokens
    regional = regional_fractions(frac, (2, 2, 2)).reshape(2, 2, 2, 2)[0]  # band 0, regions (d, h, w)
    assert regional[0, 0, 1] == 1 and regional.sum() == 1
    per_bin = bin_fractions(frac).reshape(4, 2, 2, 2)  # [d, band, quadrant h, quadrant w]
    assert per_bin[:2, 0, 0, 1].min() == 1 and per_bin[2:, 0].sum() == 0


def test_bad_edges_are_refused():
    with pytest.raises(ValueError):
        DensityBands((0.0, -100.0), WINDOW)
    with pytest.raises(CTVLWeightsError):
        tiny_config().replace(density_edges_hu=(0.0, 0.0)).validate()
    with pytest.raises(CTVLWeightsError):
        tiny_config().replace(density_edges_hu=(0.0,), density_regions=(1, 0, 1)).validate()


@pytest.mark.parametrize("encoder", ["hybrid", "vit"])
def test_model_uses_density_and_round_trips(encoder, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(encoder).replace(density_edges_hu=(-900.0, -500.0, 0.0, 100.0), density_regions=(2, 1, 2))
    model = CTVLModel(cfg).eval()
    x = torch.rand(2, 1, *cfg.input_shape, generator=torch.Generator().manual_seed(1))
    brighter = (x + 0.2).clamp(0, 1)  # shifts voxels across band edges
    with torch.no_grad():
        a, b = model.encode_image(x), model.encode_image(brighter)
        zero = CTVLModel(cfg).eval()
        zero.load_state_dict(model.state_dict())
        for head in (zero.density_token, zero.density_bin, zero.density_pooled):
            for p in head.parameters():
                p.zero_()
        base = zero.encode_image(x)
    assert a.tokens.shape[1:4] == cfg.token_grid()
    assert not torch.allclose(a.tokens, base.tokens)  # the density features reach tokens, bins and pooled
    assert not torch.allclose(a.bins, base.bins) and not torch.allclose(a.pooled, base.pooled)
    assert not torch.allclose(a.pooled, b.pooled)
    loaded = load_weights(save_weights(model, tmp_path / "w"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x).tokens, a.tokens, rtol=0, atol=0)
