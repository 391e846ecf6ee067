"""The joint CT vision-language model: image tokens / pooled / depth-bin embeddings and text in one space.

Scores (all from cosine similarities of L2-normalised embeddings):
- SigLIP image-report logits: t * cos + b, t = exp(logit_scale) (init 10), b = logit_bias (init -10).
- Disease probability (zero-shot, used identically in training and inference), CT-CLIP style: a two-way softmax
  over the prompt similarities [t_d * cos(pooled, pos), t_d * cos(pooled, neg)] taken on the positive class, i.e.
  p = sigmoid(t_d * (cos_pos - cos_neg) + b_label). t_d = exp(disease_logit_scale) (init 10, learnable) and b_label
  (init 0, learnable per CT-RATE label, 0 for free-text labels) calibrate it. cos_pos == cos_neg -> p = 0.5 (before
  bias), and the logit is invariant to any shift shared by both prompts (e.g. generic "chest CT" similarity).
- Heatmap: cos(token, text) * t per token.
- Depth bins: cos(bin, text) / bin_temperature (RadFinder's cos / 0.1), softmax over the scan's valid bins.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from ctvl.model.config import ModelConfig
from ctvl.model.text import TextTower, chunk_text, split_sentences
from ctvl.model.vision import VisionEncoder
from ctvl.prompts import LABELS, disease_prompts, prompt_table
from torch import Tensor, nn


class ImageEmbeddings(NamedTuple):
    """tokens [B,d,h,w,E] projected (not normalised), pooled [B,E] and bins [B,d,E] L2-normalised."""

    tokens: Tensor
    pooled: Tensor
    bins: Tensor


class CTVLOutput(NamedTuple):
    """What `CTVLModel.forward` returns (use forward under DDP): any part not asked for is None."""

    image: ImageEmbeddings | None
    text: Tensor | None
    report: Tensor | None


def mlp_head(din: int, hidden: int, dout: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(din), nn.Linear(din, hidden), nn.GELU(), nn.Linear(hidden, dout))


def disease_logits(pooled: Tensor, pos_emb: Tensor, neg_emb: Tensor, log_scale: Tensor | float,
                   bias: Tensor | None = None) -> Tensor:
    """[B,L] logits t*(cos(pooled,pos) - cos(pooled,neg)) + bias; inputs are L2-normalised [B,E], [L,E], [L,E]."""
    scale = log_scale.exp() if isinstance(log_scale, Tensor) else math.exp(log_scale)
    logits = scale * (pooled @ pos_emb.t() - pooled @ neg_emb.t())
    if bias is not None:
        logits = logits + bias
    return logits


class AttentionPool(nn.Module):
    """Weights from a learnable query against LayerNorm'd keys, one weight map per head; values are given.

    Pooled = per-head weighted mean of the value vectors, so the pooled embedding is a convex combination of
    the (projected) tokens and token-text similarities explain the image-text score (heatmaps).
    """

    def __init__(self, key_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(key_dim)
        self.key = nn.Linear(key_dim, key_dim)
        self.query = nn.Parameter(torch.zeros(num_heads, key_dim // num_heads))
        nn.init.trunc_normal_(self.query, std=0.02)

    def weights(self, keys: Tensor, mask: Tensor | None = None) -> Tensor:
        """keys [B,N,K] -> weights [B,heads,N] (softmax over N; masked positions get 0)."""
        b, n, k = keys.shape
        kk = self.key(self.norm(keys)).reshape(b, n, self.num_heads, k // self.num_heads)
        scores = torch.einsum("bnhc,hc->bhn", kk, self.query) / math.sqrt(k // self.num_heads)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return scores.softmax(-1)

    def forward(self, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, e = values.shape
        w = self.weights(keys, mask)  # [B,h,N]
        if e % self.num_heads == 0:
            v = values.reshape(b, n, self.num_heads, e // self.num_heads)
            return torch.einsum("bhn,bnhc->bhc", w, v).reshape(b, e)
        return torch.einsum("bn,bne->be", w.mean(1), values)


class DepthBinCombiner(nn.Module):
    """In-plane mean of the encoder tokens [B,d,C] -> residual 1D conv over depth -> [B,d,C]."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x).transpose(1, 2)
        y = self.conv2(F.gelu(self.conv1(y)))
        return x + y.transpose(1, 2)


class CTVLModel(nn.Module):
    """Vision encoder + text tower + projections into a shared space of `config.shared_dim`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c, e = config.embed_dim, config.shared_dim
        self.vision = VisionEncoder(config)
        self.token_head = mlp_head(c, config.proj_hidden, e)
        self.pool = AttentionPool(c, config.num_heads) if config.pooling == "attention" else None
        self.bin_combiner = DepthBinCombiner(c, config.bin_kernel)
        self.bin_head = mlp_head(c, config.proj_hidden, e)
        self.text = TextTower(config)
        self.text_head = mlp_head(self.text.width, config.proj_hidden, e)
        self.sentence_pool = AttentionPool(e, 1) if config.report_pooling == "attention" else None
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        self.disease_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.disease_bias = nn.Parameter(torch.zeros(len(LABELS)))
        self.prompts: dict[str, dict[str, list[str]]] = prompt_table(LABELS)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def bin_size(self) -> int:
        """Model slices per depth bin (bin b covers model slices [b*bin_size, (b+1)*bin_size))."""
        return self.config.downsample()[0]

    def saved_state_keys(self) -> list[str]:
        """State-dict keys that `save_weights` writes (everything but the frozen text backbone)."""
        return [k for k in self.state_dict() if not k.startswith("text.backbone.")] + self.text.trainable_state_keys(
            "text.")

    # ------------------------------------------------------------------ image
    def encode_image(self, x: Tensor) -> ImageEmbeddings:
        """x [B,1,D,H,W] (windowed to [0,1], model grid) -> ImageEmbeddings."""
        feats = self.vision(x)  # [B,d,h,w,C]
        b, d, h, w, c = feats.shape
        flat = feats.reshape(b, d * h * w, c)
        tokens = self.token_head(flat)  # [B,N,E]
        pooled = self.pool(flat, tokens) if self.pool is not None else tokens.mean(1)
        bins = self.bin_head(self.bin_combiner(feats.mean(dim=(2, 3))))  # [B,d,E]
        return ImageEmbeddings(tokens.reshape(b, d, h, w, -1), F.normalize(pooled, dim=-1), F.normalize(bins, dim=-1))

    # ------------------------------------------------------------------ text
    def _encode_units(self, units: list[list[str]]) -> Tensor:
        flat = [s for u in units for s in u]
        feats = self.text(flat, device=self.device).to(self.logit_scale.dtype)
        proj = self.text_head(feats)  # [S,E]
        out = []
        i = 0
        for u in units:
            p = proj[i:i + len(u)]
            i += len(u)
            if len(u) == 1:
                out.append(p[0])
            elif self.sentence_pool is not None:
                out.append(self.sentence_pool(p[None], p[None])[0])
            else:
                out.append(p.mean(0))
        return F.normalize(torch.stack(out), dim=-1)

    def encode_text(self, texts: list[str]) -> Tensor:
        """Short texts (prompts, queries, snippets), each one sentence -> [N,E] L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        return self._encode_units([chunk_text(t) for t in texts])

    def encode_reports(self, reports: list[str]) -> Tensor:
        """Long reports (Findings + Impressions): split into sentences, project each, pool -> [N,E] normalised."""
        if isinstance(reports, str):
            reports = [reports]
        return self._encode_units([split_sentences(r) for r in reports])

    def forward(self, images: Tensor | None = None, texts: list[str] | None = None,
                reports: list[str] | None = None) -> CTVLOutput:
        """One call for training under DDP: any of images [B,1,D,H,W], short texts, reports."""
        return CTVLOutput(
            self.encode_image(images) if images is not None else None,
            self.encode_text(texts) if texts else None,
            self.encode_reports(reports) if reports else None,
        )

    # ------------------------------------------------------------------ scores
    def prompt_embeddings(self, labels: list[str] | tuple[str, ...] | None = None) -> tuple[Tensor, Tensor]:
        """Per label: mean of its positive / negative template embeddings, renormalised -> ([L,E], [L,E])."""
        labels = list(labels or LABELS)
        groups: list[list[str]] = []
        for label in labels:
            entry = self.prompts.get(label)
            pos, neg = (entry["positive"], entry["negative"]) if entry else disease_prompts(label)
            groups += [pos, neg]
        flat = [t for g in groups for t in g]
        emb = self.encode_text(flat)
        means, i = [], 0
        for g in groups:
            means.append(F.normalize(emb[i:i + len(g)].mean(0), dim=-1))
            i += len(g)
        stacked = torch.stack(means).reshape(len(labels), 2, -1)
        return stacked[:, 0], stacked[:, 1]

    def label_bias(self, labels: list[str] | tuple[str, ...] | None = None) -> Tensor:
        """Per-label calibration bias [L] (learned for the CT-RATE labels, 0 for others)."""
        labels = list(labels or LABELS)
        idx = {name: i for i, name in enumerate(LABELS)}
        zero = self.disease_bias.new_zeros(())
        return torch.stack([self.disease_bias[idx[lab]] if lab in idx else zero for lab in labels])

    def disease_logits(self, pooled: Tensor, pos_emb: Tensor, neg_emb: Tensor,
                       labels: list[str] | tuple[str, ...] | None = None) -> Tensor:
        """[B,L] zero-shot logits (see module docstring); `labels` names the rows of pos/neg for the bias."""
        if labels is None and pos_emb.shape[0] == len(LABELS):
            labels = LABELS
        bias = self.label_bias(labels) if labels is not None else None
        return disease_logits(pooled, pos_emb, neg_emb, self.disease_logit_scale, bias)

    @torch.no_grad()
    def disease_probabilities(self, pooled: Tensor, labels: list[str] | tuple[str, ...] | None = None) -> Tensor:
        labels = list(labels or LABELS)
        pos, neg = self.prompt_embeddings(labels)
        return torch.sigmoid(self.disease_logits(pooled, pos, neg, labels))

    def siglip_logits(self, img: Tensor, txt: Tensor) -> Tensor:
        return img @ txt.t() * self.logit_scale.exp() + self.logit_bias

    def heatmap_logits(self, tokens: Tensor, text_emb: Tensor) -> Tensor:
        """cos(token, text) * t: text [E] -> [B,d,h,w]; text [T,E] -> [B,T,d,h,w]."""
        t = F.normalize(tokens, dim=-1)
        q = F.normalize(text_emb, dim=-1)
        scale = self.logit_scale.exp()
        if q.ndim == 1:
            return torch.einsum("bdhwe,e->bdhw", t, q) * scale
        return torch.einsum("bdhwe,te->btdhw", t, q) * scale

    def bin_logits(self, bins: Tensor, text_emb: Tensor) -> Tensor:
        """cos(bin, text) / bin_temperature: text [E] -> [B,d]; text [T,E] -> [B,T,d]."""
        b = F.normalize(bins, dim=-1)
        q = F.normalize(text_emb, dim=-1)
        if q.ndim == 1:
            return (b @ q) / self.config.bin_temperature
        return torch.einsum("bde,te->btd", b, q) / self.config.bin_temperature
