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
from ctvl.model.densitometry import (  # noqa: E402
    DensityBands,
    RunningStandardize,
    bin_fractions,
    regional_fractions,
)

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


# ----------------------------------------------------------------------------- RunningStandardize
def _features(seed: int, rows: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 0.1, 5.0])
    return torch.randn(rows, 3, generator=g, dtype=torch.float64) * scale + torch.tensor([-6.0, 0.5, 2.0])


def test_standardize_first_batch_by_itself_then_running_statistics():
    norm = RunningStandardize(3, momentum=0.25).double().train()
    a, b, c = _features(0), _features(1), _features(2)
    out = norm(a)
    torch.testing.assert_close(out.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    var = a.var(0, unbiased=False)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.sqrt(var / (var + norm.eps)))  # eps-regularised
    # the second batch is normalised with the first batch's statistics, then folded in (cumulative average)
    expect_b = (b - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + norm.eps)
    torch.testing.assert_close(norm(b), expect_b.clamp(-norm.clip, norm.clip))
    ab = torch.cat([a, b])
    torch.testing.assert_close(norm.mean, ab.mean(0))
    torch.testing.assert_close(norm.sq_mean, (ab * ab).mean(0))
    norm(c)  # third update: step 1/3 (> momentum 0.25): still the cumulative average of equal-sized batches
    abc = torch.cat([a, b, c])
    torch.testing.assert_close(norm.mean, abc.mean(0))
    norm(_features(3))  # fourth: step max(1/4, 0.25) = 0.25
    norm(_features(4))  # fifth: the exponential average takes over (step 0.25 instead of 1/5)
    cumulative = torch.cat([abc, _features(3), _features(4)]).mean(0)
    expected = abc.mean(0) * 0.75 + _features(3).mean(0) * 0.25
    expected = expected * 0.75 + _features(4).mean(0) * 0.25
    torch.testing.assert_close(norm.mean, expected)
    assert not torch.allclose(norm.mean, cumulative)
    assert int(norm.updates) == 5


def test_standardize_eval_reads_only_and_clips():
    norm = RunningStandardize(3, clip=2.0).double().train()
    norm(_features(0))
    norm.eval()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    far = torch.full((1, 3), 1e3, dtype=torch.float64)
    assert torch.equal(norm(far), torch.full((1, 3), 2.0, dtype=torch.float64))
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k
    # leading dims are free: [B,d,h,w,F] is standardised per feature like [N,F]
    x = _features(5, rows=24)
    torch.testing.assert_close(norm(x.reshape(2, 3, 4, 3)).reshape(24, 3), norm(x))


def _standardize_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        norm = RunningStandardize(3).double().train()
        for seed in (0, 1):
            batch = _features(seed)
            norm(batch[rank * 32:(rank + 1) * 32])
        if rank == 1:
            torch.save(norm.state_dict(), out_file)
    finally:
        dist.destroy_process_group()


def test_standardize_under_ddp_uses_global_batch_statistics(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "stats.pt"
    mp.spawn(_standardize_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    single = RunningStandardize(3).double().train()
    for seed in (0, 1):
        single(_features(seed))
    got = torch.load(out, weights_only=True)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(got[key], value)


def test_model_density_norm_statistics_travel_with_the_weights(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config("hybrid").replace(density_edges_hu=(-900.0, -500.0, 0.0, 100.0), density_regions=(2, 1, 2),
                                        density_norm=True)
    model = CTVLModel(cfg).train()
    x = torch.rand(3, 1, *cfg.input_shape, generator=torch.Generator().manual_seed(1))
    model.encode_image(x)  # training mode: the scalers learn the feature statistics
    model.eval()
    scalers = model.density_scalers
    assert scalers is not None and all(int(s.updates) == 1 for s in scalers.values())
    assert not torch.allclose(scalers["pooled"].mean, torch.zeros_like(scalers["pooled"].mean))
    with torch.no_grad():
        a = model.encode_image(x)
    loaded = load_weights(save_weights(model, tmp_path / "w"))
    for key, value in model.density_scalers.state_dict().items():
        assert torch.equal(loaded.density_scalers.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x).pooled, a.pooled, rtol=0, atol=0)
    plain_dir = save_weights(model, tmp_path / "w2")
    (plain_dir / "config.json").write_text(cfg.replace(density_norm=False).to_json())
    assert CTVLModel(cfg.replace(density_norm=False)).density_scalers is None
    with pytest.raises(CTVLWeightsError):  # weights with scalers refuse a config without them
        load_weights(plain_dir)
