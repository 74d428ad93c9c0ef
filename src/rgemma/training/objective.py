"""The training objective as one module: model trunk, output head and loss in one forward.

`LMObjective(model)(tokens, segment_pos, targets, loss_mask, state)` returns the
summed masked next-token negative log-likelihood and the model's new state. The head
and the loss run inside this module's `forward`, so that wrappers applied from
outside (`training.parallel`: FSDP2 with this module as the root, DDP, activation
checkpointing of the blocks) see every parameter use, the tied embedding's included,
inside a forward call.

Dimension letters: b batch, t time, d width, v vocabulary.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..model import Griffin
from ..ops import linear_cross_entropy
from ..state import GriffinState


class LMObjective(nn.Module):
    """Masked next-token cross-entropy of a `Griffin` (official: the loss of the
    `recurrentgemma` fine-tuning colab, soft-capped logits, float32).

    Args:
        model: the `Griffin` to train; kept as the submodule `model` (state_dict keys
            `model.<official key>`).
    """

    def __init__(self, model: Griffin):
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: Tensor,
        segment_pos: Tensor,
        targets: Tensor,
        loss_mask: Tensor,
        state: GriffinState | None = None,
    ) -> tuple[Tensor, GriffinState]:
        """Args: tokens, targets (b, t) int64; segment_pos (b, t) int64 (-1 padding);
        loss_mask (b, t) float (1 where the target is learned); state: the state to
        continue from (None: empty).

        Returns: (sum of masked NLLs in nats, float32 scalar; new state).
        """
        h, new_state = self.model.hidden(tokens, segment_pos, state, validate=False)
        # The head and the loss fused and chunked over rows: no (b, t, v) logits exist
        # (`ops.linear_cross_entropy`; `training.loss.masked_loss` over the model's
        # logits is its reference).
        embedding = self.model.embedder.input_embedding  # (v, d), tied
        cap = self.model.config.logits_soft_cap
        nll_sum = linear_cross_entropy(h, embedding, targets, loss_mask, cap)
        return nll_sum, new_state
