"""The training loop: `train(TrainConfig) -> dict`."""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import GriffinConfig, config_diff
from ..errors import ConfigError, InputError
from ..io import atomic_path
from .checkpoint import (
    FINAL_DIR,
    TRAIN_CONFIG_NAME,
    checkpoint_model_config,
    checkpoint_name,
    clean_incomplete,
    damaged_checkpoints,
    find_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, check_carry_state, model_config_from, read_config_file
from .distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    check_same_config,
    distributed,
    local_rows,
)
from .evaluation import _autocast, evaluate
from .loss import token_byte_lengths
from .metrics import MetricsLogger
from .objective import LMObjective
from .optim import lr_at, param_groups
from .parallel import (
    clip_grad_norm,
    gather_full_state_dict,
    grad_sync,
    griffin_from_state_dict,
    is_fsdp,
    parallelize,
    plain_model,
)
from .stop import StopSignals

#: With LoRA: the adapter (PEFT format) inside the final model directory.
FINAL_ADAPTER = "adapter"


# ----------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------
def _warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"rgemma: warning: {message}", file=sys.stderr, flush=True)


def _build_data(cfg: TrainConfig, tokenizer: Any, dist: Dist, grad_accum: int) -> tuple[Any, Any]:
    """(train PackedDataset, or StreamDataset with `carry_state`; validation
    PackedDataset or None): `data.build_datasets` on the config's data fields.

    A packed training batch holds the rows of all ranks (`batch_size * world_size`,
    the order of one process with that batch size); each rank takes its own with
    `local_rows`. A `StreamDataset` is built per rank and yields this rank's rows.
    """
    from ..data import build_datasets

    if not cfg.train_data:
        raise ConfigError("TrainConfig.train_data is empty: give files, directories or globs")
    return build_datasets(
        cfg.train_data,
        tokenizer,
        cfg.seq_len,
        cfg.batch_size if cfg.carry_state else cfg.batch_size * dist.world_size,
        val_paths=cfg.val_data,
        val_fraction=cfg.val_fraction,
        doc_chars=cfg.doc_chars,
        seed=cfg.seed,
        carry_state=cfg.carry_state,
        grad_accum=grad_accum,
        world_size=dist.world_size,
        rank=dist.rank,
        warn=_warn,
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
        (last evaluation, if any), `out_dir`, `checkpoint` (newest checkpoint dir),
        `final_dir` (or None), `stopped` ("SIGTERM" / "SIGINT" when a signal stopped
        the run early: the steps done are checkpointed, no final evaluation or final
        model; None otherwise), and this call's figures (`MetricsLogger.summary`):
        `tokens_per_s` (training throughput: evaluation and checkpoints excluded),
        `train_s`, `eval_s`, `checkpoint_s`, `elapsed_s`, `best_val_loss`,
        `best_val_step`, `peak_rss_mib` (and `cuda_peak_mib` on CUDA).

    Raises:
        ConfigError: invalid config; a resume directory whose model config differs
            (the differing fields are named).
        InputError: bad data (empty or non-UTF-8 files, bad JSONL lines: the file
            and line are named), a data position that does not fit the data.
        CheckpointError: an unreadable `init_from` or resume checkpoint; a checkpoint
            that cannot be written (a full disk: the directory and bytes needed are
            named; the previous checkpoint stays intact).
    """
    from ..tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    out_dir = Path(cfg.out_dir)

    old_threads = torch.get_num_threads()
    # Denormal floats (tiny gradients, Adam moments) slow CPU math by 10x or more;
    # flushing them to zero changes nothing measurable in training. Reset to torch's
    # default (off) on the way out.
    torch.set_flush_denormal(True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Joins the process group under torchrun and leaves it on the way out (errors
    # included); a lone process otherwise.
    exit_stack = contextlib.ExitStack()
    try:
        dist = exit_stack.enter_context(distributed(cfg.device))
        device = dist.device
        check_same_config(cfg.to_dict(), dist)  # else mismatched collectives would hang
        # An optimiser step: grad_accum micro-batches of batch_size rows on each rank.
        grad_accum = cfg.grad_accum_for(dist.world_size)
        # -- resume point -----------------------------------------------------------
        ckpt: Path | None = None
        if cfg.resume:
            if dist.is_main:
                clean_incomplete(out_dir)
            barrier(dist)
            ckpt = latest_checkpoint(out_dir)
            for bad in damaged_checkpoints(out_dir):
                if dist.is_main and (ckpt is None or bad.name > ckpt.name):
                    _warn(
                        f"checkpoint {bad} is incomplete or truncated: skipped"
                        + (f", resuming from {ckpt.name}" if ckpt is not None else "")
                    )
            if ckpt is None and dist.is_main:
                _warn(f"no checkpoint in {out_dir}: starting from scratch")
        elif find_checkpoints(out_dir):
            raise ConfigError(
                f"{out_dir} already holds checkpoints of a run; continue it with "
                "resume=true (--resume), or choose another out_dir (--out)"
            )

        # -- model ------------------------------------------------------------------
        init_tok: str | None = None
        if ckpt is not None:
            _check_resume_compatible(ckpt, cfg, checkpoint_model_config(ckpt))
        if ckpt is not None and not cfg.lora_rank:
            from ..model import Griffin

            ckpt_model_cfg = checkpoint_model_config(ckpt)
            # Left uninitialised: `load_checkpoint` below overwrites every parameter.
            # (Under LoRA the checkpoint holds the adapters only: the frozen base is
            # built as in a fresh run, from `init_from`.)
            model = Griffin(ckpt_model_cfg, device="meta", dtype=torch.float32)
            model = model.to_empty(device=device)
            tok_file = ckpt / "tokenizer.model"
            init_tok = str(tok_file) if tok_file.is_file() else None
        else:
            model, init_tok = _build_model(cfg, device)
        model_cfg: GriffinConfig = model.config
        model.train()
        model.requires_grad_(True)  # `load_model` returns a frozen (inference) model
        base_fp: str | None = None  # under LoRA: which frozen base the adapters are for
        if cfg.lora_rank:
            from ..lora import apply_lora, base_fingerprint

            # Before sharding: adapters on the full modules, the base frozen (only the
            # adapters reach the optimizer and the checkpoints). Drawn from the seed,
            # so every rank starts from the same adapters.
            torch.manual_seed(cfg.seed)
            apply_lora(
                model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets), cfg.lora_dropout
            )
            base_fp = base_fingerprint(model)  # the full weights: before sharding
            if cfg.init_from is None and ckpt is None and dist.is_main:
                _warn(
                    "LoRA without init_from: the adapters train on a frozen, randomly "
                    "initialised base; set init_from to fine-tune a trained model"
                )
        # What the step calls: trunk, tied head and loss in one forward, with
        # activation checkpointing and FSDP2 / DDP applied from outside (in place:
        # under FSDP2 `model`'s parameters become this rank's shards).
        module = parallelize(
            LMObjective(model),
            mode=cfg.data_parallel,
            activation_checkpointing=cfg.gradient_checkpointing,
            dist=dist,
        )

        # -- tokenizer and data -----------------------------------------------------
        tok_path = cfg.tokenizer or init_tok or str(BUNDLED_TOKENIZER_PATH)
        tokenizer = Tokenizer(tok_path)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model's "
                f"vocab_size is {model_cfg.vocab_size}"
            )
        check_carry_state(cfg, model_cfg)
        train_set, val_set = _build_data(cfg, tokenizer, dist, grad_accum)
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
            # Model, optimizer and this rank's RNGs (resharded onto this run by DCP).
            state = load_checkpoint(
                ckpt,
                model=model,
                optimizer=optimizer,
                device=device,
                seed=cfg.seed,
                base_fingerprint=base_fp,
            )
            try:
                train_set.load_state_dict(state["data"])
            except InputError as err:
                raise InputError(f"cannot resume from {ckpt}: {err}") from None
            step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            if dist.is_main:
                clean_incomplete(out_dir)
        if dist.is_main:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(out_dir / TRAIN_CONFIG_NAME) as tmp:
                    Path(tmp).write_text(cfg.to_json() + "\n", encoding="utf-8")
            except OSError as err:
                raise ConfigError(
                    f"cannot write to the output directory {out_dir}: "
                    f"{err.strerror or err} (choose another with --out)"
                ) from None
            if ckpt is not None:
                print(f"rgemma: resuming from {ckpt} (step {step})", file=sys.stderr, flush=True)

        start_record = {
            "event": "start" if ckpt is None else "resume",
            "step": step,
            "resumed_from": str(ckpt) if ckpt else None,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens_per_epoch": train_set.num_tokens,
            "val_tokens": val_set.num_tokens if val_set is not None else 0,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "world_size": dist.world_size,
            "data_parallel": cfg.data_parallel if dist.is_distributed else None,
            "global_batch_size": cfg.batch_size * dist.world_size * grad_accum,
            "grad_accum": grad_accum,
        }
        logger = MetricsLogger(  # truncates metrics.jsonl to the checkpoint's step
            out_dir,
            total_steps=cfg.max_steps,
            start_step=step,
            tokens_seen=tokens_seen,
            log_every=cfg.log_every,
            resume=ckpt is not None,
            progress=cfg.progress,
            tensorboard=cfg.tensorboard,
            device=device,
            is_main=dist.is_main,
        )
        logger.write(start_record)

        result = _loop(
            cfg,
            model,
            module,
            optimizer,
            train_set,
            val_set,
            byte_lengths,
            dist,
            grad_accum,
            step,
            tokens_seen,
            tok_path,
            logger,
            ckpt,
            base_fp,
        )
        return result
    finally:
        exit_stack.close()
        torch.set_num_threads(old_threads)
        torch.set_flush_denormal(False)


def _loop(
    cfg: TrainConfig,
    model: nn.Module,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Any,
    val_set: Any,
    byte_lengths: Tensor,
    dist: Dist,
    grad_accum: int,
    step: int,
    tokens_seen: int,
    tok_path: str,
    logger: MetricsLogger,
    ckpt: Path | None,
    base_fp: str | None,
) -> dict[str, Any]:
    """The optimisation loop from `step` to `cfg.max_steps` (see `train`).

    `model` is the `Griffin` (its parameters sharded under FSDP2), `module` what
    `parallelize` made of its `LMObjective`: the step calls `module`. `base_fp`: under
    LoRA the base's fingerprint, recorded in every checkpoint. SIGTERM or SIGINT ends
    the loop after the current step, with a checkpoint of it (`training.stop`).
    """
    out_dir = Path(cfg.out_dir)
    device = dist.device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tokens_per_step = cfg.batch_size * dist.world_size * grad_accum * cfg.seq_len  # all ranks
    last_eval: dict[str, float] = {}
    last_ckpt = ckpt
    start_step = step

    @logger.timed("eval")  # evaluation time is not training time
    def do_eval() -> None:
        nonlocal last_eval
        if val_set is None:
            return
        budget = cfg.eval_batches
        rows = cfg.batch_size * dist.world_size
        # Every rank scores the same documents, with the figures of one process:
        # under FSDP2 the forward all-gathers parameters, so all ranks must make the
        # same calls. Rank 0 logs.
        with plain_model(module) as eval_model:
            last_eval = evaluate(
                eval_model,
                val_set,
                max_tokens=None if budget is None else budget * rows * cfg.seq_len,
                byte_lengths=byte_lengths,
                chunk_size=cfg.seq_len,
                batch_size=cfg.batch_size,
                bf16=cfg.bf16,
            )
        logger.log_eval(step, last_eval)

    @logger.timed("checkpoint")  # nor is checkpointing
    def do_save() -> None:
        nonlocal last_ckpt
        logger.flush()
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
            previous=last_ckpt,
            base_fingerprint=base_fp,
        )
        logger.log_checkpoint(step, last_ckpt)

    # SIGTERM / SIGINT: finish the step, save it, return (`training.stop`).
    stop, stopped = StopSignals(), None
    data_iter = iter(train_set)
    try:
        stop.install()
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(data_iter) for _ in range(grad_accum)]
            if not cfg.carry_state:  # packed batches hold every rank's rows
                micro = [local_rows(b, dist) for b in micro]
            # Normalise by the number of target tokens of the whole step on all ranks,
            # so the gradient is that of the global mean loss (sum / count). DDP and
            # FSDP2 average gradients over ranks: scaling each rank's loss by
            # world_size (exact for a power of two) turns that into sum / count.
            count = sum(b.loss_mask.sum() for b in micro).to(device)
            count = all_reduce_sum(count, dist).clamp(min=1.0)
            scale = dist.world_size / count
            step_loss = torch.zeros((), device=device)
            for j, b in enumerate(micro):
                # carry_state: continue each stream from where its last segment ended.
                state = train_set.carried_state(j, device) if cfg.carry_state else None
                # DDP all-reduces after the last micro-batch only; FSDP2 reduce-scatters
                # each one (accumulating unsharded gradients would cost a full copy).
                with grad_sync(module, j == len(micro) - 1), _autocast(cfg, device):
                    nll_sum, new_state = module(
                        b.tokens.to(device),
                        b.segment_pos.to(device),
                        b.targets.to(device),
                        b.loss_mask.to(device),
                        state,
                    )
                if cfg.carry_state:
                    train_set.set_carried_state(j, new_state)  # detached
                (nll_sum * scale).backward()
                step_loss += nll_sum.detach() / count
                del nll_sum, new_state
            all_reduce_sum(step_loss, dist)  # the global mean loss, logged by rank 0
            # The norm of the whole gradient (every shard under FSDP2) before clipping;
            # an infinite max norm measures without clipping (factor exactly 1).
            grad_norm = clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            logger.log_step(step, step_loss, grad_norm, lr, tokens_seen)  # syncs every log_every
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                do_eval()
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                do_save()
            stopped = stop.agreed(device)  # the same answer on every rank
            if stopped is not None:
                break
        logger.flush()
        if stopped is not None:  # keep the steps done, skip the end-of-run work
            if last_ckpt is None or last_ckpt.name != checkpoint_name(step):
                do_save()
        else:
            if step > start_step or not last_eval:
                do_eval()
            if last_ckpt is None or step > start_step:
                do_save()
    finally:
        stop.restore()
        logger.close()

    final_dir = None
    if cfg.save_final and stopped is None:
        with logger.timed("checkpoint"):
            final_dir = _save_final(cfg, model, module, out_dir / FINAL_DIR, tok_path, dist)
    result = {
        "step": step,
        "tokens_seen": tokens_seen,
        "losses": logger.losses,
        "train_loss": logger.losses[-1][1] if logger.losses else None,
        "val_loss": last_eval.get("val_loss"),
        "val_ppl": last_eval.get("val_ppl"),
        "val_bpb": last_eval.get("val_bpb"),
        "out_dir": str(out_dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "final_dir": str(final_dir) if final_dir else None,
        "stopped": stopped.name if stopped is not None else None,
    }
    # Denormals back on before the plot: numpy (under matplotlib) warns that the
    # smallest subnormal is zero when they are flushed.
    torch.set_flush_denormal(False)
    result.update(logger.finish(result))  # the end record, summary and plot
    if stopped is not None and dist.is_main:
        print(
            f"rgemma: stopped by {stopped.name} after step {step}: checkpoint {last_ckpt}; "
            "continue with --resume",
            file=sys.stderr,
            flush=True,
        )
    return result


def _save_final(
    cfg: TrainConfig, model: nn.Module, module: nn.Module, path: Path, tok_path: str, dist: Dist
) -> Path | None:
    """Write the trained model as a normal rgemma model directory (`save_model`) from
    rank 0; returns its path there, None on the other ranks. Under FSDP2 the full
    state_dict is gathered first (a collective: every rank calls this).

    With LoRA, the adapter goes to `path/adapter` in PEFT's format (`save_adapter`;
    not for adapters on the RG-LRU gates, which PEFT cannot express) and `path`
    holds the model with the adapter merged in. The training model is merged in
    place: call this last.
    """
    from ..checkpoint import save_model

    if is_fsdp(module):
        state = gather_full_state_dict(module, dist)
        if dist.is_main:
            lora = (cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets), cfg.lora_dropout)
            model = griffin_from_state_dict(
                model.config, state, lora=lora if cfg.lora_rank else None
            )
    final_dir = None
    if dist.is_main:
        adapter_tmp = None
        if cfg.lora_rank:
            from ..lora import GATE_TARGETS, merge_lora, save_adapter

            if set(cfg.lora_targets) & set(GATE_TARGETS):
                _warn(
                    f"LoRA on the RG-LRU gates has no PEFT format: {path} holds the merged "
                    "model only (no adapter directory)"
                )
            else:  # written beside, moved in once the merged model is in place
                adapter_tmp = path.parent / f".{path.name}-{FINAL_ADAPTER}"
                save_adapter(model, adapter_tmp, base_model=cfg.init_from)
            merge_lora(model)
        final_dir = save_model(model, path, tokenizer_path=tok_path)
        if adapter_tmp is not None:
            os.replace(adapter_tmp, final_dir / FINAL_ADAPTER)
    barrier(dist)  # the directory is complete for every rank after this
    return final_dir
