"""ctvl.model: shapes of both encoders, text tower (offline, deterministic), scores, weights I/O and its refusals."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from ctvl.errors import CTVLWeightsError  # noqa: E402
from ctvl.model import (  # noqa: E402
    CTVLModel,
    ModelConfig,
    demo_config,
    load_weights,
    save_weights,
    split_sentences,
    tiny_config,
)
from ctvl.prompts import LABELS, disease_prompts  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPORT = (
    "Findings: The trachea and both main bronchi are patent. There is a 9 mm solid nodule in the right upper lobe "
    "(series 3, image 41). No pleural effusion. Heart size is normal. Impressions: Right upper lobe lung nodule."
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models() -> dict[str, CTVLModel]:
    torch.manual_seed(0)
    return {enc: CTVLModel(tiny_config(enc)).eval() for enc in ("hybrid", "vit")}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 1, *tiny_config().input_shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("encoder", ["hybrid", "vit"])
def test_image_shapes_and_norms(models, images, encoder):
    model = models[encoder]
    with torch.no_grad():
        emb = model.encode_image(images)
    d, h, w = model.config.token_grid()
    e = model.config.shared_dim
    assert emb.tokens.shape == (2, d, h, w, e)
    assert emb.pooled.shape == (2, e) and emb.bins.shape == (2, d, e)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(emb.bins.norm(dim=-1), torch.ones(2, d))
    assert model.bin_size * d == model.config.input_shape[0]
    q = model.encode_text(["lung nodule", "pleural effusion"])
    assert model.heatmap_logits(emb.tokens, q[0]).shape == (2, d, h, w)
    assert model.heatmap_logits(emb.tokens, q).shape == (2, 2, d, h, w)
    assert model.bin_logits(emb.bins, q[0]).shape == (2, d)
    assert model.bin_logits(emb.bins, q).shape == (2, 2, d)
    hm = model.heatmap_logits(emb.tokens, q[0]) / model.logit_scale.exp()
    assert hm.abs().max() <= 1 + 1e-5  # cosine * t


def test_learnable_pos_embed_and_other_grid():
    model = CTVLModel(tiny_config("vit").replace(pos_embed="learnable")).eval()
    assert "vision.pos_embed" in model.saved_state_keys()
    with torch.no_grad():
        emb = model.encode_image(torch.rand(1, 1, 24, 32, 40))  # not the configured grid: interpolated
    assert emb.tokens.shape[1:4] == (6, 4, 5) and emb.bins.shape == (1, 6, model.config.shared_dim)


def test_text_offline_deterministic_and_cached(models):
    model = models["hybrid"]
    a = model.encode_text(["There is a lung nodule.", "No pleural effusion."])
    before = model.text.cache_info()["size"]
    b = model.encode_text(["There is a lung nodule.", "No pleural effusion."])
    assert model.text.cache_info()["size"] == before  # served from the cache
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(a[0], a[1])
    # frozen MiniLM features themselves are deterministic and meaningful (same as sentence-transformers pooling)
    f = model.text(["lung nodule", "pulmonary nodule", "cardiomegaly"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(f[0], f[1], dim=0) > cos(f[0], f[2], dim=0)
    assert model.config.text_model == "minilm" and "text.backbone" not in " ".join(model.state_dict())


def test_reports_are_embedded_as_sentences(models):
    model = models["hybrid"]
    sents = split_sentences(REPORT)
    assert sents[0].startswith("The trachea") and "Right upper lobe lung nodule." in sents
    assert len(sents) == 5
    long_report = " ".join(f"Sentence number {i} describes the chest in some detail." for i in range(80))
    assert len(split_sentences(long_report)) == 80  # ~1000 word pieces: nothing truncated
    r = model.encode_reports([REPORT, long_report, "No acute findings."])
    assert r.shape == (3, model.config.shared_dim)
    # a one-sentence report is the same as that text encoded as a short text
    torch.testing.assert_close(r[2], model.encode_text(["No acute findings."])[0])


def test_disease_logits_formulation(models, images):
    model = models["hybrid"]
    pos, neg = model.prompt_embeddings()
    assert pos.shape == neg.shape == (len(LABELS), model.config.shared_dim)
    with torch.no_grad():
        emb = model.encode_image(images)
        logits = model.disease_logits(emb.pooled, pos, neg)
        t = model.disease_logit_scale.exp()
        want = t * (emb.pooled @ pos.T - emb.pooled @ neg.T) + model.disease_bias
        torch.testing.assert_close(logits, want)
        probs = model.disease_probabilities(emb.pooled, ["Lung nodule", "Pneumothorax"])
    assert probs.shape == (2, 2) and ((probs > 0) & (probs < 1)).all()
    # identical positive and negative prompts -> p = 0.5 (no evidence either way)
    same = model.disease_logits(emb.pooled, pos[:1], pos[:1], ["Pneumothorax"])
    torch.testing.assert_close(torch.sigmoid(same), torch.full_like(same, 0.5))
    p, n = disease_prompts("Lung nodule")
    assert len(p) >= 3 and len(n) >= 3 and all("no" in s.lower() for s in n)


def test_training_forward_backward_and_checkpointing(images):
    torch.manual_seed(0)
    cfg = tiny_config("hybrid")
    model = CTVLModel(cfg).train()
    ckpt = CTVLModel(cfg.replace(grad_checkpointing=True)).train()
    ckpt.load_state_dict(model.state_dict())
    outs = []
    for m in (model, ckpt):
        out = m(images=images, texts=["a lung nodule"], reports=[REPORT, "Normal chest CT."])
        loss = out.image.pooled.sum() + out.image.bins.sum() + out.text.sum() + out.report.sum()
        loss = loss + out.image.tokens.pow(2).mean()
        loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].image.pooled, outs[1].image.pooled)
    g0 = model.vision.blocks[0].attn.qkv.weight.grad
    torch.testing.assert_close(g0, ckpt.vision.blocks[0].attn.qkv.weight.grad)
    assert model.text_head[1].weight.grad.abs().sum() > 0
    assert model.vision.tokenizer.net[0].weight.grad.abs().sum() > 0


def test_config_round_trip_and_validation(tmp_path):
    cfg = demo_config()
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.token_grid() == (48, 20, 20) and cfg.downsample() == (2, 4, 4) and cfg.bin_size_mm() == 6.4
    assert cfg.transformer_grid() == (24, 5, 5) and cfg.token_size_mm() == pytest.approx((6.4, 17.6, 17.6))
    assert demo_config("vit").token_grid() == (24, 10, 10)  # no dense head on the ViT
    off = ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k not in ("dense_head", "mil_disease")})
    assert not off.dense_head and off.token_grid() == (24, 5, 5)  # older config.json files: dense head off
    with pytest.raises(CTVLWeightsError, match="hybrid"):
        ModelConfig(encoder="vit", dense_head=True).validate()
    with pytest.raises(CTVLWeightsError, match="dense_stage"):
        ModelConfig(dense_head=True, dense_stage=-1).validate()
    with pytest.raises(CTVLWeightsError, match="unknown encoder"):
        ModelConfig.from_dict({**cfg.to_dict(), "encoder": "resnet"})
    with pytest.raises(CTVLWeightsError, match="not divisible"):
        ModelConfig(input_shape=(90, 80, 80)).validate()
    assert ModelConfig.from_dict({**cfg.to_dict(), "bin_temperature": "1e-1"}).bin_temperature == pytest.approx(0.1)
    for key, value, expected in [("embed_dim", "wide", "whole number"), ("depth", 2.5, "whole number"),
                                 ("spacing", [3.2, "x", 4.4], "number"), ("mil_disease", "yes", "true or false"),
                                 ("encoder", 3, "text")]:
        with pytest.raises(CTVLWeightsError, match=f"{key}: expected a {expected}|{key}: expected {expected}"):
            ModelConfig.from_dict({**cfg.to_dict(), key: value})


def test_save_load_round_trip(models, images, tmp_path):
    model = models["vit"]
    out = save_weights(model, tmp_path / "w", card="# tiny test model\n")
    assert sorted(p.name for p in out.iterdir()) == ["card.md", "config.json", "model.safetensors", "prompts.json"]
    loaded = load_weights(out)
    with torch.no_grad():
        a, b = model.encode_image(images), loaded.encode_image(images)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        torch.testing.assert_close(model.encode_reports([REPORT]), loaded.encode_reports([REPORT]), rtol=0, atol=0)
    assert loaded.prompts == model.prompts and loaded.config == model.config
    # the frozen bundled MiniLM is not in the file
    assert not any(k.startswith("text.backbone") for k in load_file(out / "model.safetensors"))


def _dense_tiny():
    return tiny_config("hybrid").replace(dense_head=True, mil_disease=True, dense_stage=0, dense_dim=8)


def test_dense_head_shapes_grid_and_heatmaps(images):
    torch.manual_seed(0)
    cfg = _dense_tiny()
    assert cfg.downsample() == (2, 2, 2) and cfg.token_grid() == (8, 16, 16) and cfg.transformer_grid() == (4, 4, 4)
    model = CTVLModel(cfg).eval()
    with torch.no_grad():
        emb = model.encode_image(images)
        e = cfg.shared_dim
        assert emb.tokens.shape == (2, 8, 16, 16, e) and emb.bins.shape == (2, 8, e) and emb.pooled.shape == (2, e)
        torch.testing.assert_close(emb.bins.norm(dim=-1), torch.ones(2, 8))
        labels = ["Lung nodule", "Pleural effusion", "a free-text finding"]
        pos, neg = model.prompt_embeddings(labels)
        z = model.disease_heatmap_logits(emb.tokens, labels)
        assert z.shape == (2, 3, 8, 16, 16)
        torch.testing.assert_close(z, model.disease_heatmap_logits(emb.tokens, labels, pos, neg))
        t = torch.nn.functional.normalize(emb.tokens, dim=-1)
        want = model.mil_logit_scale.exp() * torch.einsum("bdhwe,e->bdhw", t, pos[0] - neg[0]) + model.mil_bias[
            LABELS.index("Lung nodule")]
        torch.testing.assert_close(z[:, 0], want)
        # MIL logit = (1/r) log(sum exp(r z) / N_ref), N_ref = training token count
        mil = model.mil_logits(emb.tokens, pos, neg, labels)
        r = cfg.mil_r
        ref = (torch.logsumexp(r * z.reshape(2, 3, -1), -1) - math.log(8 * 16 * 16)) / r
        torch.testing.assert_close(mil, ref)
        assert (mil <= z.reshape(2, 3, -1).max(-1).values + 1e-6).all()
        # final probability = sigmoid(mean of the pooled and MIL logits); without tokens: the pooled one
        pooled_logit = model.disease_logits(emb.pooled, pos, neg, labels)
        probs = model.disease_probabilities(emb.pooled, labels, tokens=emb.tokens)
        torch.testing.assert_close(probs, torch.sigmoid(0.5 * (pooled_logit + mil)))
        torch.testing.assert_close(model.disease_probabilities(emb.pooled, labels), torch.sigmoid(pooled_logit))
    # the heatmap/free-text API still works on the dense grid
    assert model.heatmap_logits(emb.tokens, pos[0]).shape == (2, 8, 16, 16)
    assert model.bin_logits(emb.bins, pos).shape == (2, 3, 8)


def test_dense_head_trains_with_mil_loss(images):
    from training.losses import LossConfig, combined_loss

    torch.manual_seed(0)
    model = CTVLModel(_dense_tiny()).train()
    emb = model.encode_image(images)
    pos, neg = model.prompt_embeddings()
    labels = torch.full((2, len(LABELS)), float("nan"))
    labels[:, LABELS.index("Lung nodule")] = torch.tensor([1.0, 0.0])
    total, parts = combined_loss(LossConfig(siglip=False, localization=False), model=model, img_pooled=emb.pooled,
                                 pos_emb=pos, neg_emb=neg, labels=labels, tokens=emb.tokens,
                                 token_mask=torch.ones(2, 8, dtype=torch.bool))
    assert set(parts) == {"disease", "mil"}
    total.backward()
    named = dict(model.named_parameters())
    for name in ("dense.mix.0.weight", "dense.lateral.weight", "dense.top.weight", "dense_token.weight",
                 "mil_logit_scale", "vision.tokenizer.net[0]", "pool.query"):
        grad = named[name.replace("net[0]", "net.0.weight")].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.mil_bias.grad[LABELS.index("Lung nodule")] != 0
    assert model.mil_bias.grad[LABELS.index("Emphysema")] == 0


def test_dense_head_save_load_round_trip(images, tmp_path):
    torch.manual_seed(0)
    model = CTVLModel(_dense_tiny()).eval()
    with torch.no_grad():
        model.mil_bias.add_(0.3)
    out = save_weights(model, tmp_path / "dense")
    keys = load_file(out / "model.safetensors")
    assert "dense.mix.0.weight" in keys and "mil_bias" in keys
    loaded = load_weights(out)
    assert loaded.config == model.config and loaded.config.dense_head
    with torch.no_grad():
        for x, y in zip(model.encode_image(images), loaded.encode_image(images)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mil_bias, model.mil_bias)
    # weights of a dense model do not load into a config without the dense head
    cfg = json.loads((out / "config.json").read_text())
    cfg["dense_head"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CTVLWeightsError, match="unexpected"):
        load_weights(out)


def _saved(model, tmp_path):
    return save_weights(model, tmp_path / "w")


def test_load_refuses_shape_mismatch(models, tmp_path):
    out = _saved(models["hybrid"], tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["proj_hidden"] = 48
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CTVLWeightsError, match="shape mismatch"):
        load_weights(out)


def test_load_refuses_missing_and_unexpected_keys(models, tmp_path):
    out = _saved(models["hybrid"], tmp_path)
    tensors = load_file(out / "model.safetensors")
    tensors.pop("logit_bias")
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CTVLWeightsError, match="missing 1 keys"):
        load_weights(out)
    tensors["logit_bias"] = torch.tensor(-10.0)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(CTVLWeightsError, match="unexpected 1 keys"):
        load_weights(out)


def test_load_refuses_corrupt_and_unknown(models, tmp_path):
    out = _saved(models["hybrid"], tmp_path)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CTVLWeightsError, match="corrupt"):
        load_weights(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CTVLWeightsError, match="not valid JSON"):
        load_weights(out)
    cfg = models["hybrid"].config.to_dict()
    (out / "config.json").write_text(json.dumps({**cfg, "encoder": "swin"}))
    with pytest.raises(CTVLWeightsError, match="unknown encoder"):
        load_weights(out)
    with pytest.raises(CTVLWeightsError, match="no CTVL weights folder"):
        load_weights(tmp_path / "nowhere")


def test_demo_weights_missing_or_loadable():
    from ctvl.model.weights import BUNDLED_DIR

    if (BUNDLED_DIR / "demo" / "config.json").is_file():
        model = load_weights("demo")
        assert model.config.encoder in ("hybrid", "vit")
    else:
        with pytest.raises(CTVLWeightsError, match="python -m training"):
            load_weights("demo")


def test_fine_tuned_text_layers_saved_and_demo_size(tmp_path, images):
    cfg = tiny_config("hybrid").replace(text_trainable_layers=1)
    model = CTVLModel(cfg).eval()
    keys = model.saved_state_keys()
    text_keys = [k for k in keys if k.startswith("text.backbone")]
    assert text_keys and all(".layer.5." in k for k in text_keys)  # top layer of 6 only
    model.train()
    assert model.text.backbone.encoder.layer[5].training and not model.text.backbone.encoder.layer[0].training
    model.eval()
    with torch.no_grad():
        for p in model.text.backbone.encoder.layer[5].parameters():
            p.add_(0.01)
    out = save_weights(model, tmp_path / "ft")
    loaded = load_weights(out)
    torch.testing.assert_close(model.encode_text(["a nodule"]), loaded.encode_text(["a nodule"]))
    # demo config: the saved tensors stay far below the 25 MB budget
    demo = CTVLModel(demo_config())
    n = sum(demo.state_dict()[k].numel() for k in demo.saved_state_keys())
    assert n * 4 < 25e6


def test_one_training_step_with_all_losses(images):
    from training.losses import LossConfig, combined_loss

    torch.manual_seed(0)
    model = CTVLModel(tiny_config("hybrid")).train()
    out = model(images=images, texts=["9 mm nodule in the right upper lobe", "small left pleural effusion"],
                reports=[REPORT, "No pleural effusion. Normal heart size."])
    pos, neg = model.prompt_embeddings()
    labels = torch.full((2, len(LABELS)), float("nan"))
    labels[:, LABELS.index("Lung nodule")] = torch.tensor([1.0, 0.0])
    total, parts = combined_loss(
        LossConfig(), model=model, img_pooled=out.image.pooled, report_emb=out.report, pos_emb=pos, neg_emb=neg,
        labels=labels, bins=out.image.bins, valid_bins=torch.ones(2, model.config.token_grid()[0], dtype=torch.bool),
        snippet_emb=out.text, target_bin=torch.tensor([1.0, 2.5]), volume_index=torch.tensor([0, 1]))
    total.backward()
    assert set(parts) == {"siglip", "disease", "localization"}
    for name in ("token_head.1.weight", "bin_head.1.weight", "text_head.1.weight", "logit_scale", "logit_bias",
                 "disease_logit_scale", "pool.query", "vision.blocks.0.attn.qkv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.disease_bias.grad[LABELS.index("Lung nodule")] != 0
    assert model.disease_bias.grad[LABELS.index("Emphysema")] == 0  # all missing: no gradient


def _cnn_tiny() -> ModelConfig:
    return tiny_config("hybrid").replace(pooling="cnn", label_adapters=True, mil_disease=True)


def test_cnn_pooling_and_label_adapters_round_trip(images, tmp_path):
    torch.manual_seed(0)
    model = CTVLModel(_cnn_tiny()).eval()
    with torch.no_grad():
        emb = model.encode_image(images)
        assert emb.pooled.shape == (2, model.config.shared_dim)
        torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(2))
        assert not torch.allclose(emb.pooled[0], emb.pooled[1])  # the CNN branch sees the image
        pos0, neg0 = model.prompt_embeddings(["Lung nodule", "a free-text finding"])
        model.label_adapters.add_(torch.randn_like(model.label_adapters))
        pos1, neg1 = model.prompt_embeddings(["Lung nodule", "a free-text finding"])
    assert not torch.allclose(pos0[0], pos1[0]) and not torch.allclose(neg0[0], neg1[0])  # a CT-RATE label moves
    torch.testing.assert_close(pos0[1], pos1[1])  # free text is untouched
    torch.testing.assert_close(pos1.norm(dim=-1), torch.ones(2))
    out = save_weights(model, tmp_path / "cnn")
    loaded = load_weights(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images).pooled, model.encode_image(images).pooled,
                                   rtol=0, atol=0)
        torch.testing.assert_close(loaded.prompt_embeddings(["Lung nodule"])[0], pos1[:1])


def test_cnn_pooling_needs_hybrid():
    with pytest.raises(CTVLWeightsError):
        ModelConfig(encoder="vit", pooling="cnn").validate()


def test_token_localization_scores_ground_the_bins_in_their_tokens(images):
    from ctvl.model.joint import token_bin_similarity

    from training.losses import bin_logit_loss, localization_loss

    torch.manual_seed(0)
    cfg = _dense_tiny().replace(token_localization=True, token_localization_r=4.0)
    model = CTVLModel(cfg).eval()
    with torch.no_grad():
        emb = model.encode_image(images)
        text = model.encode_text(["nodule in the right upper lobe", "pleural effusion", "no finding"])
    d, r, tau = cfg.token_grid()[0], cfg.token_localization_r, cfg.bin_temperature
    # all pairs: (1/r) log mean over a bin's in-plane tokens of exp(r cos(token, text))
    unit = torch.nn.functional.normalize(emb.tokens.reshape(2, d, -1, cfg.shared_dim), dim=-1)
    cos = torch.einsum("bdne,te->btdn", unit, text)
    want = (torch.logsumexp(r * cos, -1) - math.log(cos.shape[-1])) / r
    sim = token_bin_similarity(emb.tokens, text, r)
    torch.testing.assert_close(sim, want)
    assert ((sim <= cos.amax(-1) + 1e-6) & (sim >= cos.mean(-1) - 1e-6)).all()  # between the mean and the max
    # owner form: each text against its own volume only, in the texts' order
    owner = torch.tensor([1, 0, 1])
    torch.testing.assert_close(token_bin_similarity(emb.tokens, text, r, owner), sim[owner, torch.arange(3)])
    # bin_logits: mean of the bin-embedding and token scores when on and tokens are given
    plain = torch.einsum("bde,te->btd", emb.bins, text) / tau
    torch.testing.assert_close(model.bin_logits(emb.bins, text), plain)
    torch.testing.assert_close(model.bin_logits(emb.bins, text, emb.tokens), 0.5 * (plain + sim / tau))
    torch.testing.assert_close(model.bin_logits(emb.bins, text[0], emb.tokens), 0.5 * (plain + sim / tau)[:, 0])
    torch.testing.assert_close(model.pair_bin_logits(emb, text, owner), (0.5 * (plain + sim / tau))[owner, [0, 1, 2]])
    off = CTVLModel(cfg.replace(token_localization=False)).eval()
    off.load_state_dict(model.state_dict())
    torch.testing.assert_close(off.bin_logits(emb.bins, text, emb.tokens), plain)
    # the loss on given logits is the localization loss (same soft target, masking and mean)
    valid = torch.ones(2, d, dtype=torch.bool)
    valid[1, :2] = False
    target = torch.tensor([3.0, 1.5, 5.0])
    torch.testing.assert_close(bin_logit_loss(plain[owner, [0, 1, 2]], valid[owner], target, 1.5),
                               localization_loss(emb.bins, valid, text, target, 1.5, tau, volume_index=owner))
    # trained: the grounded loss reaches the dense head and the transformer through the tokens
    model.train()
    emb = model.encode_image(images)
    bin_logit_loss(model.token_bin_logits(emb.tokens, text, owner), valid[owner], target, 1.5).backward()
    named = dict(model.named_parameters())
    for name in ("dense.mix.0.weight", "dense_token.weight", "token_head.1.weight", "vision.blocks.0.attn.qkv.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert named["bin_head.1.weight"].grad is None


def test_token_localization_r_is_validated():
    with pytest.raises(CTVLWeightsError, match="token_localization_r"):
        _dense_tiny().replace(token_localization_r=0.0).validate()


def test_input_windows_rewindow_the_image_as_extra_channels(images, tmp_path):
    from ctvl.model.vision import InputWindows

    # hu_window (-1000, 1000): x = 0.25 is -500 HU, 0.52 is 40 HU, 0.85 is 700 HU
    x = torch.tensor([0.0, 0.25, 0.52, 0.85, 1.0]).reshape(1, 1, 5)
    out = InputWindows(((-1000.0, -400.0), (-160.0, 240.0), (200.0, 1000.0)), (-1000.0, 1000.0))(x)
    expect = torch.tensor([[0.0, 0.25, 0.52, 0.85, 1.0],
                           [0.0, 500 / 600, 1.0, 1.0, 1.0],  # lung window
                           [0.0, 0.0, 0.5, 1.0, 1.0],  # mediastinal window: 40 HU is its middle
                           [0.0, 0.0, 0.0, 500 / 800, 1.0]])  # calcium window
    torch.testing.assert_close(out[0], expect)
    cfg = tiny_config("hybrid").replace(input_windows_hu=((-1000.0, -400.0), (-160.0, 240.0)))
    assert cfg.input_channels() == 3 and ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    torch.manual_seed(0)
    model = CTVLModel(cfg).eval()
    assert model.vision.tokenizer.net[0].weight.shape[1] == 3
    with torch.no_grad():  # the windowed channels reach the stem: zeroing their filters changes the output
        a = model.encode_image(images).pooled
        model.vision.tokenizer.net[0].weight[:, 1:] = 0
        b = model.encode_image(images).pooled
        assert not torch.allclose(a, b)
    out_dir = save_weights(model, tmp_path / "w")
    torch.testing.assert_close(load_weights(out_dir).encode_image(images).pooled, b)
    plain = json.loads((out_dir / "config.json").read_text())
    plain["input_windows_hu"] = []  # weights of a 3-channel stem under a 1-channel config
    (out_dir / "config.json").write_text(json.dumps(plain))
    with pytest.raises(CTVLWeightsError, match="shape mismatch"):
        load_weights(out_dir)
    vit = CTVLModel(tiny_config("vit").replace(input_windows_hu=((-160.0, 240.0),)))
    assert vit.vision.tokenizer.proj.weight.shape[1] == 2 and vit.encode_image(images).tokens.isfinite().all()
    with pytest.raises(CTVLWeightsError, match="input_windows_hu"):
        cfg.replace(input_windows_hu=((240.0, -160.0),)).validate()


def test_blobness_answers_a_ball_not_a_tube_of_the_same_radius():
    from ctvl.model.blobness import HessianBlobness, symmetric_eigenvalues

    a = torch.randn(500, 3, 3, dtype=torch.float64)
    a = a + a.transpose(1, 2)
    got = torch.stack(symmetric_eigenvalues(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]), -1)
    torch.testing.assert_close(got, torch.linalg.eigvalsh(a))
    spacing = (3.2, 4.4, 4.4)
    d, h, w = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (40, 32, 32)], indexing="ij")
    zd, yh, xw = (d - 20) * spacing[0], (h - 16) * spacing[1], (w - 16) * spacing[2]
    lung = 0.08  # -840 HU in the [-1000, 1000] window; soft tissue (+40 HU) is 0.52
    ball = lung + 0.44 * (zd**2 + yh**2 + xw**2 < 6.0**2).float()  # a 12-mm nodule
    tube = lung + 0.44 * (zd**2 + yh**2 < 6.0**2).float()  # a 12-mm vessel along w, through the same point
    filt = HessianBlobness((3.0, 6.0), spacing)
    out = filt(torch.stack([ball, tube])[:, None])
    assert out.shape == (2, 2, 40, 32, 32) and (out >= 0).all()
    centre = out[:, :, 20, 16, 16]
    assert (centre[0] > 0.3).all(), centre  # the nodule reads ~ 1 at its centre
    assert (centre[1] < 0.05 * centre[0]).all(), centre  # the vessel, ~ 0
    assert out[1].amax() < 0.2 * out[0].amax()
    flat = filt(torch.full((1, 1, 40, 32, 32), 0.3))
    assert flat.abs().max() < 1e-4  # nothing on a uniform image


def test_blobness_separable_filter_equals_conv3d_on_replicated_edges():
    import torch.nn.functional as F
    from ctvl.model.blobness import correlate1d, gaussian_derivative_kernels

    torch.manual_seed(0)
    x = torch.rand(2, 1, 9, 11, 13)
    for dim in (2, 3, 4):
        for taps in gaussian_derivative_kernels(1.3, 2.2):  # 11 asymmetric (first derivative) and symmetric taps
            shape, pad = [1, 1, 1, 1, 1], [0] * 6
            shape[dim] = taps.numel()
            pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = taps.numel() // 2
            want = F.conv3d(F.pad(x, pad, mode="replicate"), taps.reshape(shape))
            torch.testing.assert_close(correlate1d(x, taps.tolist(), dim), want)


def test_blobness_channels_are_computed_or_taken_precomputed(images, tmp_path):
    cfg = tiny_config("hybrid").replace(input_blob_scales_mm=(3.0, 6.0), density_edges_hu=(-500.0,))
    assert cfg.input_channels() == 3 and ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    torch.manual_seed(0)
    model = CTVLModel(cfg).eval()
    assert model.vision.tokenizer.net[0].weight.shape[1] == 3
    with torch.no_grad():
        alone = model.encode_image(images)
        blobs = model.vision.blobs(images)
        given = model.encode_image(torch.cat([images, blobs], dim=1))  # the training cache's layout
        torch.testing.assert_close(given.pooled, alone.pooled)
        torch.testing.assert_close(given.tokens, alone.tokens)
        changed = model.encode_image(torch.cat([images, blobs * 0 + 1], dim=1)).pooled
        assert not torch.allclose(changed, alone.pooled)  # the channels reach the stem
        with pytest.raises(ValueError, match="expected images"):
            model.encode_image(torch.cat([images, blobs[:, :1]], dim=1))
    out_dir = save_weights(model, tmp_path / "w")
    torch.testing.assert_close(load_weights(out_dir).encode_image(images).pooled, alone.pooled)
    plain = json.loads((out_dir / "config.json").read_text())
    plain["input_blob_scales_mm"] = []  # weights of a 3-channel stem under a 1-channel config
    (out_dir / "config.json").write_text(json.dumps(plain))
    with pytest.raises(CTVLWeightsError, match="shape mismatch"):
        load_weights(out_dir)
    with pytest.raises(CTVLWeightsError, match="input_blob_scales_mm"):
        cfg.replace(input_blob_scales_mm=(0.0,)).validate()


def test_blobness_is_compressed_and_pooled_by_its_maximum_per_token():
    from ctvl.model.blobness import LOG_GAIN, compress, token_blob_features

    raw = torch.zeros(1, 2, 8, 8, 8)
    raw[0, 0, 5, 1, 6] = 0.4  # one voxel of a blob in token (1, 0, 1) of 4x4x4 tokens
    raw[0, 1] = 0.01
    out = token_blob_features(raw, (4, 4, 4), (2, 2, 2))
    assert out.shape == (1, 2, 2, 2, 2)
    assert math.isclose(float(out[0, 0, 1, 0, 1]), math.log1p(LOG_GAIN * 0.4), rel_tol=1e-6)  # the max, not a mean
    assert float(out[0, 0].sum()) == float(out[0, 0, 1, 0, 1])  # every other token of channel 0 stays 0
    torch.testing.assert_close(out[0, 1], torch.full((2, 2, 2), math.log1p(LOG_GAIN * 0.01)))
    coarse = token_blob_features(raw, (4, 4, 4), (1, 1, 1))  # a different grid: max over the tokens
    assert math.isclose(float(coarse[0, 0, 0, 0, 0]), float(out[0, 0].max()), rel_tol=1e-6)
    x = torch.tensor([0.0, 0.01, 0.1, 0.4, 2.0])
    y = compress(x)
    assert y[0] == 0 and (y.diff() > 0).all() and y[-1] < 4  # monotone, and the heavy tail is tamed
    assert compress(torch.tensor([-1.0])) == 0  # no negative response reaches the log


def test_blob_tokens_reach_the_token_embeddings_and_round_trip(images, tmp_path):
    cfg = tiny_config("hybrid").replace(input_blob_scales_mm=(3.0,), density_edges_hu=(-500.0, 200.0),
                                        blob_tokens=True)
    torch.manual_seed(0)
    model = CTVLModel(cfg).eval()
    assert model.density_token[1].in_features == model.density.n_bands + 1
    with torch.no_grad():
        blobs = model.vision.blobs(images)
        alone = model.encode_image(images)
        given = model.encode_image(torch.cat([images, blobs], dim=1))
        torch.testing.assert_close(given.tokens, alone.tokens)
        before = model._densitometry(torch.cat([images, blobs], dim=1), tuple(alone.tokens.shape[1:4]))[0]
        spiked = blobs.clone()
        pd, ph, pw = cfg.downsample()
        spiked[:, :, :pd, :ph, :pw] += 1.0  # a blob response in the first token only
        after = model._densitometry(torch.cat([images, spiked], dim=1), tuple(alone.tokens.shape[1:4]))[0]
        moved = (after - before).abs().amax(-1)  # [B,d,h,w]
        assert (moved[:, 0, 0, 0] > 0).all()
        moved[:, 0, 0, 0] = 0
        assert moved.amax() == 0  # every other token as it was
    out_dir = save_weights(model, tmp_path / "w")
    torch.testing.assert_close(load_weights(out_dir).encode_image(images).tokens, alone.tokens)
    with pytest.raises(CTVLWeightsError, match="blob_tokens needs"):
        cfg.replace(input_blob_scales_mm=()).validate()
    with pytest.raises(CTVLWeightsError, match="blob_tokens needs"):
        cfg.replace(density_edges_hu=()).validate()


def test_blob_readout_adds_a_learned_per_label_term_to_token_logits(images, tmp_path):
    from ctvl.model.joint import EVIDENCE_GAIN

    from training.losses import mil_disease_loss

    cfg = tiny_config("hybrid").replace(input_blob_scales_mm=(3.0, 6.0), mil_disease=True, blob_readout=True)
    torch.manual_seed(0)
    model = CTVLModel(cfg).eval()
    with torch.no_grad():
        emb = model.encode_image(images)
        pos, neg = model.prompt_embeddings()
    assert emb.evidence.shape == (*emb.tokens.shape[:4], 2) and (emb.evidence >= 0).all()
    tok = model.label_tokens(emb)
    with torch.no_grad():
        plain = model.disease_heatmap_logits(tok, LABELS, pos, neg)
        torch.testing.assert_close(model.disease_heatmap_logits(tok, LABELS, pos, neg, emb.evidence), plain)  # init 0
        i = LABELS.index("Lung nodule")
        model.evidence_weights[i] = torch.tensor([2.0, -1.0])
        read = model.disease_heatmap_logits(tok, LABELS, pos, neg, emb.evidence)
        want = EVIDENCE_GAIN * (2.0 * emb.evidence[..., 0] - emb.evidence[..., 1])
        torch.testing.assert_close(read[:, i] - plain[:, i], want)
        torch.testing.assert_close(read[:, :i], plain[:, :i])  # other labels untouched
        free = ["a dense nodule"]
        fp, fn = model.prompt_embeddings(free)
        torch.testing.assert_close(model.disease_heatmap_logits(tok, free, fp, fn, emb.evidence),
                                   model.disease_heatmap_logits(tok, free, fp, fn))  # free text: no readout
        with_ev = model.final_disease_logits(emb.pooled, pos, neg, tokens=tok, evidence=emb.evidence)
        without = model.final_disease_logits(emb.pooled, pos, neg, tokens=tok)
        assert not torch.allclose(with_ev[:, i], without[:, i]) and torch.allclose(with_ev[:, :i], without[:, :i])
    model.train()
    emb = model.encode_image(images)
    pos, neg = model.prompt_embeddings()
    labels = torch.zeros(2, len(LABELS))
    labels[0, i] = 1.0
    loss = mil_disease_loss(model.label_tokens(emb), pos, neg, labels, model.mil_logit_scale,
                            model.label_bias(mil=True), extra=model.evidence_logits(emb.evidence, None, len(LABELS)))
    loss.backward()
    assert model.evidence_weights.grad is not None and model.evidence_weights.grad[i].abs().sum() > 0
    model.eval()
    out_dir = save_weights(model, tmp_path / "w")
    torch.testing.assert_close(load_weights(out_dir).evidence_weights, model.evidence_weights.detach())
    with pytest.raises(CTVLWeightsError, match="blob_readout needs"):
        cfg.replace(mil_disease=False).validate()
    # a start above 0: every label's token logits start on the filter's evidence, the same for all labels
    torch.manual_seed(0)
    started = CTVLModel(cfg.replace(blob_readout_init=0.25)).eval()
    with torch.no_grad():
        extra = started.evidence_logits(emb.evidence.detach(), None, len(LABELS))
    want = EVIDENCE_GAIN * 0.25 * emb.evidence.detach().sum(-1)
    torch.testing.assert_close(extra, want[:, None].expand_as(extra))
    with pytest.raises(CTVLWeightsError, match="blob_readout_init"):
        cfg.replace(blob_readout_init=float("nan")).validate()
    # the start for named labels only: the others' readout starts at 0, so their token logits are the cosines alone
    torch.manual_seed(0)
    some = CTVLModel(cfg.replace(blob_readout_init=0.25, blob_readout_labels=("Lung nodule",))).eval()
    with torch.no_grad():
        extra = some.evidence_logits(emb.evidence.detach(), None, len(LABELS))
    nodule = LABELS.index("Lung nodule")
    torch.testing.assert_close(extra[:, nodule], want)
    assert torch.count_nonzero(extra[:, [i for i in range(len(LABELS)) if i != nodule]]) == 0
    assert ModelConfig.from_dict(json.loads(some.config.to_json())).blob_readout_labels == ("Lung nodule",)
    with pytest.raises(CTVLWeightsError, match="unknown labels"):
        cfg.replace(blob_readout_labels=("Lung nodul",)).validate()


def test_label_grounded_depth_scores_add_the_named_labels_heatmap_peaks(images, tmp_path):
    from ctvl.model.joint import label_depth_evidence

    torch.manual_seed(0)
    cfg = _dense_tiny().replace(token_localization=True, mil_disease=True)
    model = CTVLModel(cfg).eval()
    texts = ["Nodule in the right upper lobe with a small pleural effusion.", "Heart size is normal.",
             "Bilateral pleural effusion."]
    named = [("Lung nodule", "Pleural effusion"), (), ("Pleural effusion",)]
    owner = torch.tensor([1, 0, 0])
    with torch.no_grad():
        emb = model.encode_image(images)
        text = model.encode_text(texts)
        plain = model.pair_bin_logits(emb, text, owner)
        assert model.label_bin_logits(emb, named, owner) is None  # weight 0: off
        torch.testing.assert_close(model.pair_bin_logits(emb, text, owner, named), plain)
        on = CTVLModel(cfg.replace(locate_label_weight=0.5)).eval()
        on.load_state_dict(model.state_dict())
        heat = on.disease_heatmap_logits(on.label_tokens(emb), LABELS)  # [B,L,d,h,w]
        got = on.pair_bin_logits(emb, text, owner, named)
    nod, eff = LABELS.index("Lung nodule"), LABELS.index("Pleural effusion")
    # per bin: the strongest in-plane token of the strongest named label, in the text's own volume
    want0 = torch.maximum(heat[1, nod].amax(dim=(-2, -1)), heat[1, eff].amax(dim=(-2, -1)))
    torch.testing.assert_close(label_depth_evidence(heat[1, [nod, eff]]), want0)
    torch.testing.assert_close(got[0], plain[0] + 0.5 * want0)
    torch.testing.assert_close(got[1], plain[1])  # names no label: unchanged
    torch.testing.assert_close(got[2], plain[2] + 0.5 * heat[0, eff].amax(dim=(-2, -1)))
    assert ModelConfig.from_dict(json.loads(on.config.to_json())).locate_label_weight == 0.5
    for bad in (-0.1, float("inf")):
        with pytest.raises(CTVLWeightsError, match="locate_label_weight"):
            cfg.replace(locate_label_weight=bad).validate()


def test_stem_residual_blocks_start_as_identity_train_and_round_trip(images, tmp_path):
    from ctvl.model.vision import ResidualConv

    cfg = _dense_tiny().replace(stem_blocks=(2, 1))
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    torch.manual_seed(0)
    model = CTVLModel(cfg).eval()
    stem = model.vision.tokenizer
    blocks = [m for m in stem.net if isinstance(m, ResidualConv)]
    assert len(blocks) == 3
    # a new block is the identity: the stem computes what its layers without the blocks compute, skip included
    plain = torch.nn.Sequential(*[m for m in stem.net if not isinstance(m, ResidualConv)])
    x = model.vision._channels(images)
    k = cfg.dense_stage_index()
    with torch.no_grad():
        last, skip = stem.stages(x, return_stage=k)
        torch.testing.assert_close(last, plain[:-1](x))
        torch.testing.assert_close(skip, plain[:3 * k + 3](x))  # conv, norm, GELU per stage
    # ... and the blocks learn: the norm scale gets a gradient at once (the conv once that scale is not 0)
    model.train()
    out = model.encode_image(images).pooled.square().sum()
    out.backward()
    assert all(b.norm.weight.grad.abs().sum() > 0 for b in blocks)
    # round trip; weights with blocks refuse a config without them
    out_dir = save_weights(model.eval(), tmp_path / "w")
    with torch.no_grad():
        torch.testing.assert_close(load_weights(out_dir).encode_image(images).pooled, model.encode_image(images).pooled)
    raw = json.loads((out_dir / "config.json").read_text())
    raw["stem_blocks"] = []
    (out_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CTVLWeightsError, match="unexpected"):
        load_weights(out_dir)
    with pytest.raises(CTVLWeightsError, match="stem_blocks"):
        cfg.replace(stem_blocks=(1,)).validate()
    with pytest.raises(CTVLWeightsError, match="stem_blocks"):
        cfg.replace(stem_blocks=(1, -1)).validate()


def test_local_label_heatmaps_come_from_the_stem_alone(images, tmp_path):
    from training.losses import LossConfig, combined_loss

    cfg = _dense_tiny().replace(mil_local=True, density_edges_hu=(-500.0,))
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    torch.manual_seed(0)
    model = CTVLModel(cfg).eval()
    with torch.no_grad():
        emb = model.encode_image(images)
        assert emb.local.shape == emb.tokens.shape and model.label_tokens(emb) is emb.local
        pos, neg = model.prompt_embeddings(["Lung nodule"])
        z = model.disease_heatmap_logits(emb.local, ["Lung nodule"], pos, neg)
        probs = model.disease_probabilities(emb.pooled, ["Lung nodule"], tokens=emb.local)
        want = 0.5 * (model.disease_logits(emb.pooled, pos, neg, ["Lung nodule"])
                      + model.mil_logits(emb.local, pos, neg, ["Lung nodule"]))
        torch.testing.assert_close(probs, torch.sigmoid(want))
        # no transformer context in the local tokens: changing the transformer changes the dense tokens only
        for p in model.vision.blocks.parameters():
            p.add_(0.5)
        again = model.encode_image(images)
        torch.testing.assert_close(again.local, emb.local)
        assert not torch.allclose(again.tokens, emb.tokens)
        torch.testing.assert_close(model.disease_heatmap_logits(again.local, ["Lung nodule"], pos, neg), z)
    # the MIL objective trains the local head, and the local head only through MIL
    model.train()
    emb = model.encode_image(images)
    pos, neg = model.prompt_embeddings()
    labels = torch.full((2, len(LABELS)), float("nan"))
    labels[:, LABELS.index("Lung nodule")] = torch.tensor([1.0, 0.0])
    total, _ = combined_loss(LossConfig(siglip=False, localization=False, disease=False), model=model,
                             img_pooled=emb.pooled, pos_emb=pos, neg_emb=neg, labels=labels,
                             tokens=model.label_tokens(emb), token_mask=torch.ones(2, 8, dtype=torch.bool))
    total.backward()
    assert model.local[0].weight.grad.abs().sum() > 0 and model.local_token.weight.grad.abs().sum() > 0
    assert model.dense.mix[0].weight.grad is None  # the dense tokens are not in the MIL term
    # round trip; a model without the local head refuses its weights
    out_dir = save_weights(model.eval(), tmp_path / "w")
    with torch.no_grad():
        torch.testing.assert_close(load_weights(out_dir).encode_image(images).local, model.encode_image(images).local)
    raw = json.loads((out_dir / "config.json").read_text())
    raw["mil_local"] = False
    (out_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CTVLWeightsError, match="unexpected"):
        load_weights(out_dir)
    with pytest.raises(CTVLWeightsError, match="mil_local"):
        tiny_config("hybrid").replace(mil_local=True, mil_disease=True).validate()  # no dense head
    assert CTVLModel(_dense_tiny()).eval().encode_image(images).local is None
