"""The training loop: single process or ``torchrun`` DDP, AMP, accumulation, exact checkpoint/resume, logs.

Resume is exact: checkpoints hold model/optimizer/scheduler/scaler state, the step, the sampler's epoch and
position, and the RNG states of python/numpy/torch (+ the DataLoader's own generator). Augmentation draws from a
per-item generator seeded by (seed, epoch, index), so a resumed run sees the same batches and the same augmented
volumes as an uninterrupted one (bit-for-bit on CPU; tests/test_training_engine.py).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training import augment
from training.config import Config, save_config
from training.utils import atomic_torch_save, atomic_write_bytes, cpu_has_native_bf16, dist_info

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- sampler


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (``set_start(n_samples_already_seen)``)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


# ---------------------------------------------------------------------------------------------- model glue


def build_model(cfg: Config):
    """A fresh `CTVLModel` from ``cfg.model`` or weights from ``cfg.init_weights``."""
    from ctvl.model import CTVLModel, load_weights

    if cfg.init_weights:
        return load_weights(cfg.init_weights, device="cpu")
    return CTVLModel(model_config(cfg.model))


def freeze_parameters(model, prefixes: list[str]) -> int:
    """Fix the parameters whose names start with any of ``prefixes`` (``train.freeze``); returns how many tensors.

    A prefix that names no parameter is refused, so a typo cannot silently train everything."""
    if not prefixes:
        return 0
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unknown:
        from ctvl.errors import CTVLInputError

        tops = sorted({n.split(".")[0] + ("." if "." in n else "") for n in names})
        raise CTVLInputError("train.freeze", f"no parameter starts with {unknown}",
                             f"Parameter names start with {tops}")
    count = 0
    for name, param in model.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(False)
            count += 1
    return count


def model_config(section: dict):
    """``ModelConfig`` from a config's ``model:`` section; ``preset: tiny-hybrid`` starts from a preset."""
    from ctvl.model import PRESETS, ModelConfig

    section = dict(section or {})
    preset = section.pop("preset", None)
    base = PRESETS[preset]().to_dict() if preset else {}
    base.pop("format", None)
    base.update(section)
    return ModelConfig.from_dict(base, source="config model:")


def model_preprocess(model):
    from training.data import Preprocess

    return Preprocess.from_model_config(model.config)


def bin_depth(model) -> int:
    """Model slices per depth bin (the encoder's patch depth)."""
    c = model.config
    if hasattr(c, "downsample"):
        return int(c.downsample()[0])
    return int(getattr(c, "patch_size", (1,))[0])


class TrainStep(torch.nn.Module):
    """Wraps the model so DDP sees one ``forward(batch) -> losses`` (gradient hooks, unused-parameter logic)."""

    def __init__(self, model, loss_cfg) -> None:
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        from training import losses as L

        m, lc = self.model, self.loss_cfg
        emb = m.encode_image(batch["image"])
        terms: dict[str, torch.Tensor] = {}
        if lc.siglip.enabled:
            txt = m.encode_reports(batch["text"])
            terms["siglip"] = L.siglip_loss(emb.pooled, txt, m.logit_scale, m.logit_bias)
        mil_on = lc.mil.enabled and getattr(m.config, "mil_disease", False)
        if lc.disease.enabled or mil_on:
            pos, neg = m.prompt_embeddings()  # once per step: shared by both disease objectives
        if lc.disease.enabled:
            terms["disease"] = L.disease_prompt_loss(
                emb.pooled, pos, neg, batch["labels"].to(emb.pooled.device), m.disease_logit_scale, m.label_bias()
            )
        if mil_on:
            label_tokens = m.label_tokens(emb)
            terms["mil"] = L.mil_disease_loss(
                label_tokens, pos, neg, batch["labels"].to(label_tokens.device), m.mil_logit_scale,
                m.label_bias(mil=True), r=m.config.mil_r, token_mask=self._mil_mask(batch, label_tokens.device),
                n_ref=math.prod(m.config.token_grid()), extra=m.evidence_logits(emb.evidence, None, pos.shape[0]),
            )
        owner = batch["snippet_owner"].to(emb.bins.device)
        grounded = lc.token_localization.enabled and getattr(m.config, "token_localization", False)
        snippets = m.encode_text(batch["snippets"]) if owner.numel() and (lc.localization.enabled or grounded) \
            else None
        if lc.localization.enabled:
            if snippets is not None:
                terms["localization"] = L.localization_loss(
                    emb.bins, batch["bin_valid"].to(emb.bins.device), snippets,
                    batch["snippet_bins"].to(emb.bins.device), sigma_bins=lc.localization.sigma_bins,
                    tau=m.config.bin_temperature, volume_index=owner,
                )
            else:  # keep the bin head in the graph (DDP) with a zero term
                terms["localization"] = emb.bins.sum() * 0.0
        if grounded:
            if snippets is not None:
                valid = batch["bin_valid"].to(emb.tokens.device)[owner]
                terms["token_localization"] = L.bin_logit_loss(
                    m.token_bin_logits(emb.tokens, snippets, owner), valid,
                    batch["snippet_bins"].to(emb.tokens.device), sigma_bins=lc.localization.sigma_bins)
            else:
                terms["token_localization"] = emb.tokens.sum() * 0.0
        terms["loss"] = sum(getattr(lc, k).weight * v for k, v in terms.items())
        return terms

    def _mil_mask(self, batch: dict, device: torch.device) -> torch.Tensor:
        """[B,d] valid bins, or [B,L,d] per label with report-guided MIL (`loss.mil.guided`)."""
        from training import losses as L

        valid = batch["bin_valid"].to(device)
        mil = self.loss_cfg.mil
        if not mil.guided:
            return valid
        return L.guided_token_mask(batch["guide"].to(device), batch["labels"].to(device), valid, mil.guide_margin_bins)


# ---------------------------------------------------------------------------------------------- optimizer


def build_optimizer(model, cfg: Config):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name or "norm" in name.lower() else decay).append(p)
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
    )
    total, warmup = max(1, cfg.train.max_steps), max(0, o.warmup_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """RNG states as tensors and plain lists only, so checkpoints load with ``torch.load(weights_only=True)``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """State dict without the frozen text backbone (what `save_weights` writes, plus nothing else)."""
    state = model.state_dict()
    if hasattr(model, "saved_state_keys"):
        return {k: state[k].detach().cpu().clone() for k in model.saved_state_keys()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in state.items() if k not in frozen}


def load_trainable_state(model, state: dict) -> None:
    saved = set(trainable_state(model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k in saved]
    if bad or unexpected:
        from ctvl.errors import CTVLWeightsError

        raise CTVLWeightsError("checkpoint", f"does not match the model (missing {bad[:3]}, unexpected "
                               f"{list(unexpected)[:3]})", "Use the config the checkpoint was trained with")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    pointer = checkpoint_dir(out) / "latest"
    if pointer.is_file():
        path = checkpoint_dir(out) / pointer.read_text().strip()
        if path.is_file():
            return path
    found = sorted(checkpoint_dir(out).glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `train` (tensors, numbers, strings and lists only: ``weights_only``); a missing,
    truncated or foreign file is refused in one line."""
    from ctvl.errors import CTVLInputError

    path = Path(path)
    if not path.is_file():
        raise CTVLInputError(path, "no such checkpoint file",
                             "Give a checkpoint .pt, a run directory or an exported weights directory")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a truncated or foreign file
        raise CTVLInputError(path, f"not a readable checkpoint ({type(exc).__name__})",
                             "It may be truncated or not written by `python -m training train`") from exc
    if not isinstance(ck, dict) or "model" not in ck:
        raise CTVLInputError(path, "not a training checkpoint (no model state)",
                             "Give a file from <run>/checkpoints/ or an exported weights directory")
    return ck


# ---------------------------------------------------------------------------------------------- logging


class RunLog:
    """CSV (always) + TensorBoard (if installed) scalars, rank 0 only."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(out) / "log.csv"
        self.tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["step", *row])
            if new:
                w.writeheader()
            w.writerow({"step": step, **row})
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------- main loop


def _setup_distributed(device_pref: str) -> tuple[int, int, int, torch.device]:
    rank, world, local = dist_info()
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        from ctvl.errors import CTVLInputError

        raise CTVLInputError("train.device", "cuda requested but no GPU is available", "Use device: auto or cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world, local = dist_info()
    if use_cuda:
        torch.cuda.set_device(local)
        return rank, world, local, torch.device("cuda", local)
    return rank, world, local, torch.device("cpu")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def amp_dtype(tc, device: torch.device, native_bf16=None) -> torch.dtype | None:
    """The autocast dtype of a training step: ``train.amp`` on GPU; on CPU bf16 with ``train.cpu_amp: true``, and
    with ``auto`` only where ``native_bf16()`` (default: the CPU flags) says the CPU does bf16 in hardware."""
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)
    if tc.cpu_amp == "auto":  # TrainConfig checks that cpu_amp comes with amp: bf16
        return torch.bfloat16 if (native_bf16 or cpu_has_native_bf16)() is True else None
    return torch.bfloat16 if tc.cpu_amp else None


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def init_label_priors(model, ds) -> None:
    """Start the per-label disease biases at the training set's log prior odds (deterministic on every rank).

    Without this the fastest way to fit label prevalence is to map every scan to one embedding, and the
    representation collapses before it learns anything (measured on the phantom corpus).
    """
    labels = [r.labels for r in getattr(ds, "records", [])]
    if not labels:
        return
    y = torch.as_tensor(np.stack(labels), dtype=torch.float32)
    valid = torch.isfinite(y) & (y >= 0)
    prev = (torch.where(valid, y, torch.zeros_like(y)).sum(0) / valid.sum(0).clamp_min(1)).clamp(0.01, 0.99)
    prior = torch.log(prev / (1 - prev))
    with torch.no_grad():
        for name in ("disease_bias", "mil_bias"):
            param = getattr(model, name, None)
            if isinstance(param, torch.Tensor) and param.shape == prior.shape:
                param.copy_(prior.to(param.device, param.dtype))


def train(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train per ``cfg``; writes ``out/config.yaml``, ``out/log.csv``, ``out/checkpoints/``. Returns a summary.

    ``stop_after``: checkpoint and return after that step, as if killed there (resume tests, time-boxed runs).
    Under torchrun the process group this call opens is closed again on the way out, after a last barrier when
    the run ended normally: a gloo rank that exits with its group open can abort in its pair threads
    ("terminate called without an active exception") while the other rank still closes its sockets.
    """
    owned = dist_info()[1] > 1 and not dist.is_initialized()
    try:
        summary = _train(cfg, out, resume, progress, stop_after)
        if owned:
            dist.barrier()
        return summary
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, out: str | Path, resume: bool, progress: bool, stop_after: int | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from training.data import CTRateDataset, collate, ensure_phantom_dataset

    out = Path(out)
    tc = cfg.train
    rank, world, _, device = _setup_distributed(tc.device)
    if device.type == "cpu" and tc.threads:
        torch.set_num_threads(int(tc.threads))
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        ensure_phantom_dataset(cfg.data)
    _barrier(world)

    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)  # same initial weights on every rank
    model = build_model(cfg)
    if tc.text_features:  # the frozen tower's sentence features from a table; the tower is not run
        from training.text_features import use_table

        use_table(model, tc.text_features)
    frozen = freeze_parameters(model, tc.freeze)
    if main and frozen:
        kept = sum(p.numel() for n, p in model.named_parameters() if n.startswith(tuple(tc.freeze)))
        log.info("train.freeze: %d tensors (%d parameters) fixed: %s", frozen, kept, tc.freeze)
    if tc.grad_checkpointing:  # activation checkpointing of the transformer blocks
        model.config.grad_checkpointing = True
        if hasattr(model, "vision"):
            model.vision.grad_checkpointing = True
    model.to(device)
    step_module = TrainStep(model, cfg.loss)
    torch.manual_seed(tc.seed + 1000 * rank)

    dc = cfg.data
    ds = CTRateDataset(
        dc.root, dc.train_split, model_preprocess(model), cache_dir=dc.cache_dir, bin_depth=bin_depth(model),
        augment=dc.augment, seed=tc.seed, max_volumes=dc.max_volumes, annotations=dc.annotations,
        image_convention=dc.image_convention, max_snippets=dc.max_snippets_per_volume,
        report_fields=tuple(dc.report_fields),
    )
    if main:
        ds.prepare(workers=dc.cache_workers, progress=progress)
    _barrier(world)
    if not main:
        ds.prepare(workers=1, progress=False)
    if not cfg.init_weights:  # trained weights keep their biases
        init_label_priors(model, ds)  # before DDP wraps the model and before any resume overwrites it
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, seed=tc.seed, shuffle=True)
    micro_per_epoch = sampler.num_samples // tc.batch_size
    if micro_per_epoch == 0:
        from ctvl.errors import CTVLInputError

        raise CTVLInputError(dc.root, f"{len(ds)} volumes is fewer than one batch per process "
                             f"({tc.batch_size} x {world})", "Lower train.batch_size or add data")
    loader_gen = torch.Generator()
    loader_gen.manual_seed(tc.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=tc.batch_size, sampler=sampler, num_workers=dc.num_workers, collate_fn=collate,
        drop_last=True, generator=loader_gen, pin_memory=device.type == "cuda",
    )

    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=tc.find_unused_parameters,
        )
    runner = ddp or step_module
    optimizer, scheduler = build_optimizer(model, cfg)
    autocast_dtype = amp_dtype(tc, device)
    if main and device.type == "cpu" and autocast_dtype is not None and cpu_has_native_bf16() is False:
        log.warning("train.cpu_amp: this CPU has no avx512_bf16/amx_bf16, so bf16 autocast is emulated and over 10x "
                    "slower than fp32; set train.cpu_amp: auto or false")
    if main and device.type == "cpu" and tc.cpu_amp == "auto":
        log.info("train.cpu_amp: auto -> %s", "bf16 autocast (the CPU does bf16 in hardware)" if autocast_dtype
                 else "fp32 (no avx512_bf16/amx_bf16 in the CPU flags, or no flags to read)")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype, "fp32") + f" on {device.type}"
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

    step, epoch, micro_pos = 0, 0, 0
    if resume:
        path = latest_checkpoint(out)
        if path is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", checkpoint_dir(out))
        else:
            ck = load_checkpoint(path)
            load_trainable_state(model, ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            step, epoch, micro_pos = ck["step"], ck["epoch"], ck["micro_pos"]
            set_rng_state(ck["rng"][min(rank, len(ck["rng"]) - 1)])
            loader_gen.set_state(ck["loader_generator"])
            if main:
                log.info("resumed from %s (step %d, epoch %d, batch %d)", path, step, epoch, micro_pos)

    runlog = RunLog(out, main)
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", disable=not (main and progress))
    model.train()
    accum, sums, n_sum, t0 = 0, {}, 0, time.perf_counter()
    last_batch = None
    history: list[float] = []
    while step < tc.max_steps:
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        sampler.set_start(micro_pos * tc.batch_size)
        for batch in loader:
            micro_pos += 1
            if batch is None:
                if world == 1 or last_batch is None:
                    log.warning("skipping an empty batch (all volumes unreadable)")
                    continue
                batch = last_batch  # keep DDP ranks in step
            last_batch = batch
            params = batch.get("augment")  # CPU copy: apply reads the scalars without a device sync
            batch = _to_device(batch, device)
            batch["image"] = augment.apply(batch["image"], params)  # float32, augmented on the device
            accum += 1
            sync = accum == tc.grad_accum
            ctx = ddp.no_sync() if (ddp is not None and not sync) else nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    terms = runner(batch)
                scaler.scale(terms["loss"] / tc.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_sum += 1
            if not sync:
                continue
            if cfg.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            accum = 0
            history.append(sums.get("loss", 0.0) / max(1, n_sum))
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                dt = (time.perf_counter() - t0) / max(1, n_sum / tc.grad_accum)
                row = {k: v / n_sum for k, v in sums.items()}
                row.update(lr=scheduler.get_last_lr()[0], epoch=epoch, s_per_step=dt)
                if device.type == "cuda":  # peak since the start of the run, this process
                    row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                runlog.write(step, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", s_step=f"{dt:.2f}")
                sums, n_sum, t0 = {}, 0, time.perf_counter()
            stopping = stop_after is not None and step >= stop_after
            if step % tc.checkpoint_every == 0 or step == tc.max_steps or stopping:
                save_checkpoint(out, cfg, model, optimizer, scheduler, scaler, step, epoch, micro_pos,
                                loader_gen, world, main, tc.keep_checkpoints, precision)
            if step >= tc.max_steps or stopping:
                break
        else:
            epoch += 1
            micro_pos = 0
            continue
        break
    bar.close()
    runlog.close()
    digests = [weights_digest(model)]
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, weights_digest(model))
        if main and len(set(digests)) != 1:
            log.error("ranks ended with different weights: %s", digests)
    summary = {"step": step, "epoch": epoch, "losses": history, "snippet_stats": ds.snippet_stats,
               "skipped_volumes": sorted(ds.bad), "world_size": world, "rank_weight_digests": digests}
    if main:
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def weights_digest(model) -> str:
    """SHA-1 of every saved tensor's bytes (ranks must agree exactly after DDP steps)."""
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(trainable_state(model).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(out, cfg, model, optimizer, scheduler, scaler, step, epoch, micro_pos, loader_gen, world, main,
                    keep, autocast: str = "fp32 on cpu") -> None:
    """Atomic ``step_XXXXXXX.pt`` + ``latest`` pointer; RNG states gathered from every rank; `autocast` names the
    precision and device type the steps ran in, e.g. "bf16 on cpu" (for the model card)."""
    states = [rng_state()]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, rng_state())
    if not main:
        return
    ck = {
        "model": trainable_state(model), "model_config": _model_config_dict(model), "config": cfg.to_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "step": step, "epoch": epoch, "micro_pos": micro_pos, "rng": states, "loader_generator": loader_gen.get_state(),
        "world_size": world, "autocast": autocast,
    }
    d = checkpoint_dir(out)
    name = f"step_{step:07d}.pt"
    atomic_torch_save(ck, d / name)
    atomic_write_bytes(d / "latest", name.encode())
    for old in sorted(d.glob("step_*.pt"))[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    log.info("checkpoint %s", d / name)


def _model_config_dict(model) -> dict:
    c = model.config
    if hasattr(c, "to_dict"):
        return c.to_dict()
    import dataclasses

    return dataclasses.asdict(c)


def is_distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
