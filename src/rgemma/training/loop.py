"""The training loop: `train(TrainConfig) -> dict`."""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import GriffinConfig, config_diff
from ..device import resolve_device
from ..errors import CheckpointError, ConfigError, InputError, RgemmaError
from ..io import atomic_path
from .checkpoint import (
    FINAL_DIR,
    MODEL_SUBDIR,
    OPTIMIZER_NAME,
    TRAIN_CONFIG_NAME,
    _load_trainer_state,
    _set_rng_state,
    clean_incomplete,
    damaged_checkpoints,
    find_checkpoints,
    latest_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, model_config_from, read_config_file
from .evaluation import _autocast, evaluate
from .loss import masked_loss, token_byte_lengths
from .metrics import METRICS_NAME, truncate_metrics, write_metrics
from .optim import lr_at, param_groups


class TrainingDiverged(RgemmaError):
    """The training loss became NaN or infinite (the step range is named)."""


# ----------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------
def _warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"rgemma: warning: {message}", file=sys.stderr, flush=True)


def _build_data(cfg: TrainConfig, tokenizer: Any) -> tuple[Any, Any]:
    """(train PackedDataset, validation PackedDataset or None): `data.build_datasets`
    on the config's data fields."""
    from ..data import build_datasets

    if not cfg.train_data:
        raise ConfigError("TrainConfig.train_data is empty: give files, directories or globs")
    return build_datasets(
        cfg.train_data,
        tokenizer,
        cfg.seq_len,
        cfg.batch_size,
        val_paths=cfg.val_data,
        val_fraction=cfg.val_fraction,
        doc_chars=cfg.doc_chars,
        seed=cfg.seed,
    )


def _requested_model_config(cfg: TrainConfig) -> GriffinConfig | None:
    return model_config_from(cfg.model) if cfg.model is not None else None


def _build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, str | None]:
    """A fresh or `init_from` model in float32 on `device`, and the tokenizer path
    found beside `init_from` (or None)."""
    from ..checkpoint import load_model
    from ..model import Griffin

    declared = _requested_model_config(cfg)
    if cfg.init_from is not None:
        model = load_model(cfg.init_from, dtype=torch.float32, device=device, config=declared)
        model.requires_grad_(True)  # load_model returns an inference model
        tok = getattr(model, "source", {}).get("tokenizer")
        return model, tok
    torch.manual_seed(cfg.seed)
    model = Griffin(declared, dtype=torch.float32)
    return model.to(device), None


def _check_resume_compatible(ckpt: Path, cfg: TrainConfig, ckpt_model_cfg: GriffinConfig) -> None:
    """Raise ConfigError if this run's model differs from the checkpoint's."""
    saved = read_config_file(ckpt / TRAIN_CONFIG_NAME)
    requested = _requested_model_config(cfg)
    if requested is None and cfg.init_from is not None:
        if saved.get("init_from") == cfg.init_from:
            return  # the same starting checkpoint, hence the same config
        from ..checkpoint import load_model

        requested = load_model(cfg.init_from, dtype=torch.float32).config
    diffs = config_diff(ckpt_model_cfg, requested)
    if diffs:
        raise ConfigError(
            f"cannot resume from {ckpt}: its model config differs from this run's in "
            f"{len(diffs)} field(s) (checkpoint vs this config): " + "; ".join(diffs)
        )


# ----------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------
def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train or fine-tune a Griffin model as described by `config`.

    Args:
        config: a `TrainConfig` (or a dict for `TrainConfig.from_dict`).

    Returns:
        dict with `step` (optimiser steps done), `tokens_seen`, `losses` (list of
        [step, loss] of every step run in this call, loss in nats per target
        token), `train_loss` (the last step's), `val_loss`, `val_ppl`, `val_bpb`
        (last evaluation, if any), `tokens_per_s` (training throughput of this
        call), `elapsed_s`, `out_dir`, `checkpoint` (newest checkpoint dir) and
        `final_dir` (or None).

    Raises:
        ConfigError: invalid config; a resume directory whose model config differs
            (the differing fields are named).
        InputError: bad data (empty or non-UTF-8 files, bad JSONL lines: the file
            and line are named), a data position that does not fit the data.
        CheckpointError: an unreadable `init_from` or resume checkpoint.
    """
    from ..checkpoint import load_model
    from ..tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    device = resolve_device(cfg.device, what="TrainConfig.device", error=ConfigError)
    out_dir = Path(cfg.out_dir)
    metrics_path = out_dir / METRICS_NAME

    old_threads = torch.get_num_threads()
    # Denormal floats (tiny gradients, Adam moments) slow CPU math by 10x or more;
    # flushing them to zero changes nothing measurable in training. Reset to torch's
    # default (off) on the way out.
    torch.set_flush_denormal(True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        # -- resume point -----------------------------------------------------------
        ckpt: Path | None = None
        if cfg.resume:
            clean_incomplete(out_dir)
            ckpt = latest_checkpoint(out_dir)
            for bad in damaged_checkpoints(out_dir):
                if ckpt is None or bad.name > ckpt.name:
                    _warn(
                        f"checkpoint {bad} is incomplete or truncated: skipped"
                        + (f", resuming from {ckpt.name}" if ckpt is not None else "")
                    )
            if ckpt is None:
                _warn(f"no checkpoint in {out_dir}: starting from scratch")
        elif find_checkpoints(out_dir):
            raise ConfigError(
                f"{out_dir} already holds checkpoints of a run; continue it with "
                "resume=true (--resume), or choose another out_dir (--out)"
            )

        # -- model ------------------------------------------------------------------
        init_tok: str | None = None
        if ckpt is not None:
            model = load_model(ckpt / MODEL_SUBDIR, dtype=torch.float32, device=device)
            _check_resume_compatible(ckpt, cfg, model.config)
            init_tok = getattr(model, "source", {}).get("tokenizer")
        else:
            model, init_tok = _build_model(cfg, device)
        model_cfg: GriffinConfig = model.config
        model.train()
        model.requires_grad_(True)  # `load_model` returns a frozen (inference) model
        model.gradient_checkpointing = cfg.gradient_checkpointing

        # -- tokenizer and data -----------------------------------------------------
        tok_path = cfg.tokenizer or init_tok or str(BUNDLED_TOKENIZER_PATH)
        tokenizer = Tokenizer(tok_path)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model's "
                f"vocab_size is {model_cfg.vocab_size}"
            )
        train_set, val_set = _build_data(cfg, tokenizer)
        byte_lengths = token_byte_lengths(tokenizer)

        # -- optimiser --------------------------------------------------------------
        groups = param_groups(model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(
            groups,
            lr=lr_at(0, cfg),
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            foreach=True,
        )

        step, tokens_seen = 0, 0
        if ckpt is not None:
            state = _load_trainer_state(ckpt)
            try:
                opt_state = torch.load(
                    ckpt / OPTIMIZER_NAME, map_location=device, weights_only=True
                )
                optimizer.load_state_dict(opt_state)
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"cannot restore {ckpt / OPTIMIZER_NAME}: {err}") from None
            try:
                train_set.load_state_dict(state["data"])
            except InputError as err:
                raise InputError(f"cannot resume from {ckpt}: {err}") from None
            step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
            _set_rng_state(state["rng"], device)
            truncate_metrics(metrics_path, step)
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            clean_incomplete(out_dir)
            with contextlib.suppress(FileNotFoundError):
                metrics_path.unlink()  # of an earlier attempt that saved no checkpoint
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / TRAIN_CONFIG_NAME) as tmp:
            Path(tmp).write_text(cfg.to_json() + "\n", encoding="utf-8")

        start_record = {
            "event": "start" if ckpt is None else "resume",
            "step": step,
            "resumed_from": str(ckpt) if ckpt else None,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens_per_epoch": train_set.num_tokens,
            "val_tokens": val_set.num_tokens if val_set is not None else 0,
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
        write_metrics(metrics_path, start_record)

        result = _loop(
            cfg,
            model,
            optimizer,
            train_set,
            val_set,
            byte_lengths,
            device,
            step,
            tokens_seen,
            tok_path,
            metrics_path,
            ckpt,
        )
        return result
    finally:
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)


def _loop(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Any,
    val_set: Any,
    byte_lengths: Tensor,
    device: torch.device,
    step: int,
    tokens_seen: int,
    tok_path: str,
    metrics_path: Path,
    ckpt: Path | None,
) -> dict[str, Any]:
    """The optimisation loop from `step` to `cfg.max_steps` (see `train`)."""
    from tqdm import tqdm

    out_dir = Path(cfg.out_dir)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    losses: list[list[float]] = []
    pending: list[tuple[int, Tensor, Tensor, float]] = []  # (step, loss, grad norm, lr)
    last_eval: dict[str, float] = {}
    last_ckpt = ckpt
    start_step = step
    t_start = time.perf_counter()
    train_time = 0.0  # seconds spent in training steps (no evaluation, no checkpointing)
    time_at_log, tokens_at_log = train_time, tokens_seen

    def do_eval() -> None:
        nonlocal last_eval
        if val_set is None:
            return
        t0 = time.perf_counter()
        budget = cfg.eval_batches
        last_eval = evaluate(
            model,
            val_set,
            max_tokens=None if budget is None else budget * cfg.batch_size * cfg.seq_len,
            byte_lengths=byte_lengths,
            chunk_size=cfg.seq_len,
            batch_size=cfg.batch_size,
            bf16=cfg.bf16,
        )
        record = {
            "event": "eval",
            "step": step,
            **last_eval,
            "eval_s": round(time.perf_counter() - t0, 3),
        }
        write_metrics(metrics_path, record)
        bar.write(
            f"step {step}: val_loss {last_eval['val_loss']:.4f} "
            f"ppl {last_eval['val_ppl']:.2f}"
            + (f" bpb {last_eval['val_bpb']:.4f}" if "val_bpb" in last_eval else "")
        )

    def flush_logs() -> None:
        nonlocal time_at_log, tokens_at_log
        if not pending:
            return
        now = time.perf_counter()
        vals = torch.stack([p[1] for p in pending]).tolist()
        norms = torch.stack([p[2] for p in pending]).tolist()
        for (s, _, _, _), v in zip(pending, vals):
            losses.append([s, v])
        if not all(math.isfinite(v) for v in vals):
            raise TrainingDiverged(
                f"training loss is not finite at step {pending[0][0]}..{pending[-1][0]}: "
                f"{vals}; lower lr, or enable grad_clip"
            )
        tok_s = (tokens_seen - tokens_at_log) / max(train_time - time_at_log, 1e-9)
        record = {
            "event": "train",
            "step": pending[-1][0],
            "loss": vals[-1],
            "loss_avg": sum(vals) / len(vals),
            "grad_norm": norms[-1],
            "lr": pending[-1][3],
            "tokens_seen": tokens_seen,
            "tokens_per_s": round(tok_s, 1),
            "elapsed_s": round(now - t_start, 3),
        }
        write_metrics(metrics_path, record)
        bar.set_postfix(loss=f"{vals[-1]:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
        pending.clear()
        time_at_log, tokens_at_log = train_time, tokens_seen

    def do_save() -> None:
        nonlocal last_ckpt
        flush_logs()
        last_ckpt = save_checkpoint(
            out_dir,
            step,
            model=model,
            optimizer=optimizer,
            cfg=cfg,
            data_state=train_set.state_dict(),
            tokens_seen=tokens_seen,
            tokenizer_path=tok_path,
            device=device,
            extra={"val": last_eval} if last_eval else None,
        )

    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (cfg.progress and sys.stderr.isatty()),
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    data_iter = iter(train_set)
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(data_iter) for _ in range(cfg.grad_accum)]
            # Normalise by the number of target tokens of the whole step, so the
            # gradient is that of the mean loss over all of them (sum / count).
            count = sum(b.loss_mask.sum() for b in micro).to(device).clamp(min=1.0)
            step_loss = torch.zeros((), device=device)
            for b in micro:
                with _autocast(cfg, device):
                    logits, _ = model(b.tokens.to(device), b.segment_pos.to(device), validate=False)
                nll_sum, _ = masked_loss(logits, b.targets.to(device), b.loss_mask.to(device))
                loss = nll_sum / count
                loss.backward()
                step_loss += loss.detach()
                del logits, loss
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            else:  # an infinite max norm measures without clipping (factor exactly 1)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            train_time += time.perf_counter() - t0
            pending.append((step, step_loss, grad_norm.detach(), lr))
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                flush_logs()
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                do_eval()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                do_save()
        flush_logs()
        if step > start_step or not last_eval:
            do_eval()
        if last_ckpt is None or step > start_step:
            do_save()
    finally:
        bar.close()

    final_dir = None
    if cfg.save_final:
        from ..checkpoint import save_model

        final_dir = save_model(model, out_dir / FINAL_DIR, tokenizer_path=tok_path)
    elapsed = time.perf_counter() - t_start
    trained_tokens = (step - start_step) * tokens_per_step
    result = {
        "step": step,
        "tokens_seen": tokens_seen,
        "losses": losses,
        "train_loss": losses[-1][1] if losses else None,
        "val_loss": last_eval.get("val_loss"),
        "val_ppl": last_eval.get("val_ppl"),
        "val_bpb": last_eval.get("val_bpb"),
        "tokens_per_s": trained_tokens / train_time if train_time > 0 else None,
        "elapsed_s": elapsed,
        "out_dir": str(out_dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "final_dir": str(final_dir) if final_dir else None,
    }
    write_metrics(
        metrics_path, {"event": "end", **{k: v for k, v in result.items() if k != "losses"}}
    )
    return result
