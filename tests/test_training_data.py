"""training.data: CT-RATE layout, rescale/spacing rules, cache, snippet targets, annotations, bad volumes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.training_helpers import make_data
from training.data import CTRateDataset, Preprocess, collate, load_ctrate_volume, read_csv_by_name, volume_path

PRE = Preprocess((8.0, 8.0, 8.0), (16, 32, 32), (-1000.0, 400.0))


@pytest.fixture()
def data(tmp_path):
    torch.set_num_threads(1)
    return make_data(tmp_path / "d", n=6)


def _ds(root, **kw):
    ds = CTRateDataset(root, "train", PRE, bin_depth=2, **kw)
    ds.prepare(workers=1, progress=False)
    return ds


def test_layout_rescale_and_metadata_spacing(tmp_path):
    from training.synthetic import write_synthetic_dataset

    root = tmp_path / "blank"
    write_synthetic_dataset(root, n=1, header_spacing=False)  # first-release style: unit spacing, stored values
    name = "train_1_a_1.nii.gz"
    path = volume_path(root, "train", name)
    assert path == root / "train" / "train_1" / "train_1_a" / name
    meta = read_csv_by_name(root / "metadata" / "train_metadata.csv")[name]
    vol = load_ctrate_volume(path, meta)
    assert np.allclose(vol.spacing, 5.0)  # from XYSpacing / ZSpacing
    assert vol.array.min() < -900  # HU = stored - 1024 (metadata rescale applied once)


def test_header_scaling_is_not_applied_twice(tmp_path):
    from training.synthetic import write_small_phantom

    root = write_small_phantom(tmp_path / "ph", n=1, split="train", shape=(32, 48, 48))
    name = "train_1_a_1.nii.gz"
    meta = read_csv_by_name(root / "metadata" / "train_metadata.csv")[name]
    vol = load_ctrate_volume(volume_path(root, "train", name), meta)
    assert -1100 < vol.array.min() < -900  # scl_inter in the header -> metadata intercept not applied again


def test_items_cache_and_snippets(data):
    ds = _ds(data)
    assert len(ds) == 6 and not ds.bad
    st = ds.snippet_stats
    assert st["mined"] == 3 and st["kept"] + st["outside_grid"] + st["unmappable"] == st["mined"]
    item = ds[0]
    assert item["image"].shape == (1, 16, 32, 32) and item["image"].dtype == torch.float16  # cast on the device
    assert not item["augment"].any()  # no augmentation configured: identity parameters
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert item["labels"].shape == (18,)
    files = sorted(ds.cache_dir.glob("*.npy"))
    assert len(files) == 6 and np.load(files[0]).dtype == np.float16
    mtimes = [f.stat().st_mtime_ns for f in files]
    ds2 = _ds(data)  # cache hit: nothing rewritten
    assert [f.stat().st_mtime_ns for f in sorted(ds2.cache_dir.glob("*.npy"))] == mtimes
    other = CTRateDataset(data, "train", Preprocess((8.0, 8.0, 8.0), (16, 32, 32), (-900.0, 300.0)))
    other.prepare(progress=False)  # another HU window -> another cache key
    assert len(list(ds.cache_dir.glob("*.npy"))) == 12
    # snippet target: fractional bin of the cited slice's model depth
    r = next(r for r in ds.records if r.snippets)
    text, depth, fbin, sl = r.snippets[0]
    info = ds._info(r)
    a = np.asarray(info["model_ijk_to_ras"])
    assert depth == pytest.approx((info["slice_positions_mm"][sl] - a[2, 3]) / a[2, 2])
    assert fbin == pytest.approx((depth + 0.5) / 2 - 0.5)


def test_augmentation_is_deterministic_and_keeps_sides(data):
    from training import augment
    from training.config import AugmentConfig

    ds = _ds(data, augment=AugmentConfig(prob=1.0, translate_vox=0.0), seed=3)
    pa, pb = ds[1]["augment"], ds[1]["augment"]
    assert torch.equal(pa, pb) and pa[0] != 0 and pa[2] > 0 and pa[4] == pa[5] == 0
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["augment"], pa)
    assert torch.equal(ds[1]["image"], _ds(data)[1]["image"])  # the loader hands out the cached volume
    plain = ds[1]["image"][None]
    a = augment.apply(plain, pa[None])
    assert torch.equal(a, augment.apply(plain, pa[None]))
    # intensity/noise only: correlation with the un-augmented volume stays high (no flip)
    p = plain.float().numpy().ravel()
    assert np.corrcoef(a.numpy().ravel(), p)[0, 1] > 0.9
    assert np.corrcoef(torch.flip(a, [-1]).numpy().ravel(), p)[0, 1] < np.corrcoef(a.numpy().ravel(), p)[0, 1]


def test_corrupt_and_missing_volumes_are_skipped(data, caplog):
    (volume_path(data, "train", "train_2_a_1.nii.gz")).write_bytes(b"not a nifti at all")
    volume_path(data, "train", "train_3_a_1.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        ds = _ds(data)
    assert ds.bad == {"train_2_a_1.nii.gz", "train_3_a_1.nii.gz"}
    assert sum("skipping volume" in r.message for r in caplog.records) == 2
    assert ds[1] is None and ds[2] is None
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape[0] == 2 and batch["names"] == ["train_1_a_1.nii.gz", "train_4_a_1.nii.gz"]
    assert collate([None, None]) is None


def test_training_survives_bad_volumes(data, tmp_path):
    from tests.training_helpers import tiny_config
    from training.engine import train

    (volume_path(data, "train", "train_2_a_1.nii.gz")).write_bytes(b"corrupt")
    summary = train(tiny_config(data, **{"train.max_steps": 3}), tmp_path / "run", progress=False)
    assert summary["step"] == 3 and summary["skipped_volumes"] == ["train_2_a_1.nii.gz"]


def test_annotations_override_mined_pairs(data, tmp_path):
    from ctvl.annotations import make_record

    ds = _ds(data)
    mined = [(r.name, s) for r in ds.records for s in r.snippets]
    assert len(mined) >= 2
    (n0, s0), (n1, s1) = mined[0], mined[1]
    ref0 = _ref(ds, n0)
    ref1 = _ref(ds, n1)
    recs = [
        make_record(volume=n0, report_id=n0, snippet=s0[0], series=ref0.series, image=ref0.image,
                    mined_slice=s0[3], status="corrected", verified_slice=s0[3] + 1),
        make_record(volume=n1, report_id=n1, snippet=s1[0], series=ref1.series, image=ref1.image,
                    mined_slice=s1[3], status="rejected"),
    ]
    path = tmp_path / "ann.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds2 = _ds(data, annotations=path)
    got = {r.name: r.snippets for r in ds2.records}
    assert [s[3] for s in got[n0]] == [s0[3] + 1]
    assert got[n1] == []
    assert ds2.snippet_stats["verified"] == 1


def _ref(ds, name):
    from ctvl.snippets import mine_references

    r = next(r for r in ds.records if r.name == name)
    return mine_references(r.text)[0]


def test_items_carry_the_labels_their_cited_snippets_name(data):
    from ctvl.prompts import LABELS, snippet_labels

    ds = _ds(data, max_snippets=1)
    i, r = next((i, r) for i, r in enumerate(ds.records) if r.snippets)
    item = ds[i]
    want = [(LABELS.index(lab), s[2]) for s in r.snippets for lab in snippet_labels(s[0])]
    assert item["guide"] == want  # every pair of the record, not only the sampled snippets
    batch = collate([ds[j] for j in range(len(ds))])
    rows = [(b, lab, pos) for b in range(len(ds)) for lab, pos in ds[b]["guide"]]
    assert batch["guide"].shape == (len(rows), 3)
    assert batch["guide"].tolist() == [list(map(float, row)) for row in rows]


def test_blobness_channels_come_from_a_sidecar_cache(data):
    from training.data import blob_channels

    plain = _ds(data)
    pre = Preprocess(PRE.spacing, PRE.shape, PRE.hu_window, blob_scales_mm=(8.0, 16.0))
    assert pre.key() == PRE.key()  # the image cache is shared
    ds = CTRateDataset(data, "train", pre, bin_depth=2)
    ds.prepare(workers=1, progress=False)
    sidecars = sorted(ds.cache_dir.glob("*.blob-*.npy"))
    assert len(sidecars) == len(ds.records)
    item, ref = ds[0], plain[0]
    assert item["image"].shape == (3, *PRE.shape) and item["image"].dtype == torch.float16
    torch.testing.assert_close(item["image"][:1], ref["image"])
    expect = torch.from_numpy(blob_channels(ref["image"][0].numpy(), pre))
    torch.testing.assert_close(item["image"][1:], expect)
    assert collate([ds[0], ds[1]])["image"].shape == (2, 3, *PRE.shape)
    sidecars[0].write_bytes(b"not an array")  # a damaged sidecar is recomputed, not fatal
    assert all(ds[i] is not None for i in range(len(ds))) and not ds.bad


def test_cached_image_sits_where_its_recorded_affine_says(tmp_path):
    """The training/evaluation image and the file's own geometry agree voxel for voxel: the NIfTI read as masks are
    read (`ctvl.io.read_volume`), resampled with the recorded model affine, equals the cached model-grid image, and
    moving it by one voxel along any axis does not (heatmap-vs-mask scores rely on this registration)."""
    from ctvl.geometry import resample
    from ctvl.io import read_volume

    from training.synthetic import write_small_phantom

    root = write_small_phantom(tmp_path / "ph", n=1, split="train", shape=(32, 48, 48))
    pre = Preprocess((4.0, 4.0, 4.0), (16, 24, 24), (-1000.0, 400.0))
    ds = CTRateDataset(root, "train", pre, bin_depth=2)
    ds.prepare(workers=1, progress=False)
    image = ds.load_array(0).astype(np.float32)
    raw = read_volume(ds.records[0].path, validate=False)
    again = resample(raw, np.asarray(ds._info(ds.records[0])["model_ijk_to_ras"]), pre.shape, order=1,
                     fill=float(raw.array.min())).array
    again = np.clip((again + 1000.0) / 1400.0, 0, 1)
    inner = (slice(2, -2),) * 3
    assert np.abs(again[inner] - image[inner]).mean() < 1e-3
    for axis in range(3):
        for step in (-1, 1):
            assert np.abs(np.roll(again, step, axis)[inner] - image[inner]).mean() > 5e-3


def test_antialiased_preprocessing_has_its_own_cache(tmp_path):
    """`input_antialias` in the model config -> the prefiltered image in a cache of its own; the plain cache stays."""
    from ctvl.geometry import to_model_space
    from ctvl.io import read_volume
    from ctvl.model import tiny_config

    from training.synthetic import write_small_phantom

    root = write_small_phantom(tmp_path / "ph", n=1, split="train", shape=(64, 96, 96))  # ~4 x 4 x 5 mm voxels
    plain = Preprocess((8.0, 8.0, 8.0), (16, 24, 24), (-1000.0, 400.0))
    smooth = Preprocess(plain.spacing, plain.shape, plain.hu_window, antialias=True)
    assert Preprocess.from_model_config(tiny_config().replace(input_antialias=True)).antialias
    assert not Preprocess.from_model_config(tiny_config()).antialias
    assert smooth.key() != plain.key()
    arrays = []
    for pre in (plain, smooth):
        ds = CTRateDataset(root, "train", pre, bin_depth=2)
        ds.prepare(workers=1, progress=False)
        arrays.append(ds.load_array(0).astype(np.float32))
    assert len(list(ds.cache_dir.glob("*.npy"))) == 2
    raw = read_volume(ds.records[0].path, validate=False)
    want, _ = to_model_space(raw, smooth.spacing, smooth.shape, smooth.hu_window, antialias_input=True)
    assert np.abs(arrays[1] - want).max() < 2e-3  # float16 cache
    assert np.abs(arrays[0] - arrays[1]).max() > 0.02
