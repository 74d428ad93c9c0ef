"""Training and fine-tuning: `train(TrainConfig) -> dict`.

One loop for both pre-training a fresh `Griffin` (from a preset or an inline model
config) and fine-tuning any checkpoint `load_model` reads (`init_from`):

* data: `rgemma.data` reads text files, directories and JSONL, tokenizes every
  document as `<bos> ... <eos>`, packs documents into sequences of `seq_len` tokens
  (`segment_pos` restarts at 0 at each document, so packed documents never see each
  other; chats are never cut, and shortened from the left with a warning when longer
  than `seq_len`) or, with `carry_state`, streams them whole with the model's state
  carried from one segment to the next, detached (`data.StreamDataset`), and splits
  validation off by document;
* loss: cross-entropy in float32 over the positions where `loss_mask` is set,
  summed and divided by their count over the whole (accumulated) batch;
* optimiser: AdamW, no weight decay on norms (`*.scale`), biases (`*.bias`, `*.b`),
  the embedding (`embedder.input_embedding`) and the RG-LRU `a_param`, as in the
  official fine-tuning recipe (`recurrentgemma` colab `finetuning_tutorial`);
  linear warm-up then cosine decay to `min_lr`; global gradient-norm clipping;
  gradient accumulation; optional bfloat16 autocast and activation checkpointing;
* processes (`training.distributed`, `training.parallel`): under `torchrun` each
  rank trains its slice of every batch (the rows and loss normalisation of one
  process with `batch_size x processes`), with FSDP2 (`fully_shard` per residual
  block and at the root, the `LMObjective`) or DDP, applied from outside the model
  with activation checkpointing; only rank 0 logs and writes files;
* evaluation: held-out loss, perplexity and bits per byte every `eval_every` steps,
  validation documents scored whole over the model's state (`rgemma.scoring`);
* metrics (`training.metrics.MetricsLogger`, rank 0 only): `out_dir/metrics.jsonl`
  always, TensorBoard with `tensorboard=True`, a tqdm bar with ETA on a terminal or a
  line every `log_every` steps elsewhere, a summary at the end (training throughput
  with evaluation and checkpoint time counted apart) and `out_dir/loss.png`;
* checkpoints (`training.checkpoint`): `out_dir/checkpoints/step_XXXXXXX/`, sharded
  with `torch.distributed.checkpoint` (every rank writes its shards), written into a
  temporary directory and published by one rename once every rank is done, so a
  kill of any rank at any moment leaves only complete checkpoints; `resume=True`
  continues from the newest one exactly (the same losses, bit for bit, as a run
  that was never stopped), also on another number of processes (DCP reshards);
  `load_model(checkpoint or out_dir)` reads the model out of one;
* stops (`training.stop`): SIGTERM and SIGINT finish the step, write a checkpoint
  and return (`rgemma train` exits 0 after SIGTERM, 130 after SIGINT); a full disk
  is a one-line `CheckpointError` with the previous checkpoint intact;
* the final model: `out_dir/final/`, an rgemma model directory (`save_model`)
  with the tokenizer copied in, loadable with `rgemma.load_model` (gathered from
  the shards under FSDP2; with LoRA the merged model, and `final/adapter/` the
  adapter in PEFT's format).

Checkpoint layout::

    out_dir/
      metrics.jsonl                 one JSON object per log / eval / checkpoint event
      loss.png                      the loss curve (when matplotlib is installed)
      tensorboard/                  TensorBoard events (with tensorboard=True)
      train_config.json             the config of the latest start or resume
      checkpoints/
        latest                      name of the newest complete checkpoint (a hint)
        step_0000500/               complete when published (`is_complete`):
          dcp/                      torch.distributed.checkpoint: .metadata and one
                                    __R_0.distcp per rank R; `model.<param name>`
                                    (the trainable parameters: under LoRA only the
                                    adapters) and `optim.state.<param name>.*`,
                                    `optim.param_groups.<param name>.*` (AdamW)
          rng/rank_00000.pt         each rank's torch, Python, numpy (CUDA) RNG states
          trainer_state.pt          step, tokens seen, data position, world size
          trainer_state.json        the same, human-readable (no tensors)
          train_config.json         the TrainConfig of the run that wrote it
          rgemma_config.json        the model's config (as `save_model` writes it)
          tokenizer.model           the run's tokenizer
          COMPLETE                  written last: step, world size, every file's size
        .tmp-step_0000600/          a checkpoint being written (or a killed write's
                                    leftover, removed on resume)
      final/                        rgemma model dir of the last step

Dimension letters: b batch, t time (seq_len), v vocabulary.
"""

from .checkpoint import (
    checkpoint_name,
    clean_incomplete,
    damaged_checkpoints,
    find_checkpoints,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    load_checkpoint_model,
    read_checkpoint_state,
    save_checkpoint,
)
from .config import TrainConfig, apply_overrides, model_config_from, read_config_file
from .evaluation import evaluate
from .loop import train
from .loss import masked_loss, token_byte_lengths
from .metrics import MetricsLogger, TrainingDiverged, plot_metrics, read_metrics
from .optim import lr_at, param_groups

__all__ = [
    "MetricsLogger",
    "TrainConfig",
    "TrainingDiverged",
    "apply_overrides",
    "checkpoint_name",
    "clean_incomplete",
    "damaged_checkpoints",
    "evaluate",
    "find_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "load_checkpoint_model",
    "lr_at",
    "masked_loss",
    "model_config_from",
    "param_groups",
    "plot_metrics",
    "read_checkpoint_state",
    "read_config_file",
    "read_metrics",
    "save_checkpoint",
    "token_byte_lengths",
    "train",
]
