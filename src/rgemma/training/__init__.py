"""Training and fine-tuning: `train(TrainConfig) -> dict`.

One loop for both pre-training a fresh `Griffin` (from a preset or an inline model
config) and fine-tuning any checkpoint `load_model` reads (`init_from`):

* data: `rgemma.data` reads text files, directories and JSONL, tokenizes every
  document as `<bos> ... <eos>`, packs documents into sequences of `seq_len` tokens
  (`segment_pos` restarts at 0 at each document, so packed documents never see each
  other) and splits validation off by document;
* loss: cross-entropy in float32 over the positions where `loss_mask` is set,
  summed and divided by their count over the whole (accumulated) batch;
* optimiser: AdamW, no weight decay on norms (`*.scale`), biases (`*.bias`, `*.b`),
  the embedding (`embedder.input_embedding`) and the RG-LRU `a_param`, as in the
  official fine-tuning recipe (`recurrentgemma` colab `finetuning_tutorial`);
  linear warm-up then cosine decay to `min_lr`; global gradient-norm clipping;
  gradient accumulation; optional bfloat16 autocast and activation checkpointing;
* evaluation: held-out loss, perplexity and bits per byte every `eval_every` steps,
  validation documents scored whole over the model's state (`rgemma.scoring`);
* logging: a tqdm bar (loss, tokens/s, ETA) and `out_dir/metrics.jsonl`;
* checkpoints: `out_dir/checkpoints/step_XXXXXXX/`, each written into a temporary
  directory and renamed into place (`io.atomic_dir`), so a kill at any moment
  leaves only complete checkpoints; `resume=True` continues from the newest one
  exactly (the same losses, bit for bit, as a run that was never stopped);
* the final model: `out_dir/final/`, an rgemma model directory (`save_model`)
  with the tokenizer copied in, loadable with `rgemma.load_model`.

Checkpoint layout::

    out_dir/
      metrics.jsonl                 one JSON object per log / eval event
      train_config.json             the config of the latest start or resume
      checkpoints/
        latest                      name of the newest complete checkpoint (a hint)
        step_0000500/
          model/                    rgemma model dir (rgemma_config.json,
                                    model.safetensors, tokenizer.model)
          optimizer.pt              AdamW state_dict
          trainer_state.pt          step, tokens seen, data position, RNG states
          trainer_state.json        the same, human-readable (no RNG)
          train_config.json         the TrainConfig of the run that wrote it
      final/                        rgemma model dir of the last step

Dimension letters: b batch, t time (seq_len), v vocabulary.
"""

from .checkpoint import (
    checkpoint_name,
    clean_incomplete,
    damaged_checkpoints,
    find_checkpoints,
    latest_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig, apply_overrides, model_config_from, read_config_file
from .evaluation import evaluate
from .loop import TrainingDiverged, train
from .loss import masked_loss, token_byte_lengths
from .optim import lr_at, param_groups

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "apply_overrides",
    "checkpoint_name",
    "clean_incomplete",
    "damaged_checkpoints",
    "evaluate",
    "find_checkpoints",
    "latest_checkpoint",
    "lr_at",
    "masked_loss",
    "model_config_from",
    "param_groups",
    "read_config_file",
    "save_checkpoint",
    "token_byte_lengths",
    "train",
]
