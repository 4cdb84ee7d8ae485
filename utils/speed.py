"""Training-speed levers that need code, each exact (same loss and gradients as the reference).

Measured by ``python -m benchmarks.train_speed`` (see ``benchmarks/README.md``):

* :func:`register_varlen_sdpa` - padding-free batches without the quadratic waste. A padding-free
  batch is one long row holding several conversations. With flash-attention (GPU) each conversation
  attends only to itself; PyTorch's SDPA instead gets a block-diagonal mask over the whole row and
  computes (and stores) every cross-conversation score only to mask it away. ``sdpa_varlen`` runs
  causal SDPA once per conversation, using the ``cu_seq_lens_q`` boundaries that trl's padding-free
  collator already sends, so nothing is padded and nothing is computed across conversations.
* :func:`score_only_labelled_positions` - trl 1.x projects hidden states through the LM head in
  tiles (``add_fused_lm_head``), but off Triton devices (CPU) it scores every position and masks
  the loss afterwards. With assistant-only loss most positions carry no label; this makes the CPU
  path score only the labelled ones, as the GPU path already does. It patches a private trl name:
  the benchmark uses it only to size the LM head's cost.
* :func:`labelled_head_trainer` - the same saving with public APIs only: an ``SFTTrainer`` subclass whose
  ``compute_loss`` passes the labelled positions as the model's ``logits_to_keep`` (same loss and gradients).
  The series trains with it on a CPU (:func:`utils.training.sft_trainer_class`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import trl.trainer.utils as trl_utils
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "sdpa_varlen"  # the attn_implementation name registered by register_varlen_sdpa()


def sequence_boundaries(cu_seq_lens: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each packed sequence from cumulative lengths ``[0, l1, l1+l2, ...]``."""
    points = [int(x) for x in cu_seq_lens.tolist()]
    if not points or points[0] != 0 or any(b < a for a, b in zip(points, points[1:])):
        raise ValueError(f"cu_seq_lens must start at 0 and never decrease, got {points[:8]}...")
    return [(a, b) for a, b in zip(points, points[1:]) if b > a]


def varlen_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA per packed sequence (``cu_seq_lens_q``) with a causal mask; plain SDPA for ordinary batches.

    Shapes follow transformers' attention interface: ``query`` is ``(batch, heads, seq, head_dim)``
    and the result ``(batch, seq, heads, head_dim)``.
    """
    packed = cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
    if packed and cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        packed = False  # queries and keys split differently (a cache): leave it to the masked path
    spans = sequence_boundaries(cu_seq_lens_q) if packed else []
    if packed and (spans[-1][1] != query.shape[2] or (sliding_window and max(b - a for a, b in spans) > sliding_window)):
        packed = False  # boundaries do not cover the row, or a sequence needs the sliding-window mask
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outputs = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                       dropout_p=dropout if module.training else 0.0, scale=scaling)
        for a, b in spans
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_varlen_sdpa() -> str:
    """Register :func:`varlen_sdpa_attention_forward` as ``attn_implementation="sdpa_varlen"``; returns the name."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention_forward)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # the mask of the fallback (unpacked) path
    return VARLEN_SDPA


def use_varlen_sdpa(model: torch.nn.Module) -> None:
    """Switch a loaded model (or a PEFT wrapper around one) to per-sequence SDPA for padding-free batches."""
    register_varlen_sdpa()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(VARLEN_SDPA)


@contextlib.contextmanager
def score_only_labelled_positions(vocab_chunk: int = 8192) -> Iterator[None]:
    """Within the block, trl's fused LM head scores only positions whose label is not -100, on every device.

    ``vocab_chunk`` is the width of the logit tiles (trl's default, 32768, allocates a
    ``tokens x 32768`` fp32 buffer; 8192 costs a quarter of that memory at the same speed on a CPU).
    The computation is the one trl runs on GPUs: same log-probabilities, loss and gradients.
    """
    original_compact, original_chunk = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._use_triton = lambda device: True  # read by add_fused_lm_head only to choose compact scoring
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = vocab_chunk
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = original_compact, original_chunk


def labelled_positions_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                            num_items_in_batch: int | torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """Causal-LM loss with the LM head run only where some row predicts a labelled token (public APIs only).

    Uses the model's own ``logits_to_keep`` argument with the positions ``t`` whose next label ``t+1``
    is not -100 in any row of the batch (for a batch of one conversation: exactly the labelled ones),
    then the summed cross-entropy divided by ``num_items_in_batch`` (the labelled tokens of the whole
    optimizer step, as trl's loss does) or by this batch's labelled tokens.
    """
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
    model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    outputs = model(**model_inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits.float()  # (batch, kept positions, vocab)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1),
                            ignore_index=-100, reduction="sum")
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(total.device)
    return total / divisor, outputs


def labelled_head_trainer(trainer_class: type) -> type:
    """A subclass of ``trainer_class`` (an ``SFTTrainer``) whose ``compute_loss`` is :func:`labelled_positions_loss`.

    ``compute_loss`` is the Trainer's documented override point. On a CPU trl scores every position
    with the full-vocabulary head (its compact path needs Triton); this scores only labelled ones. The
    per-step entropy and token-accuracy metrics trl logs are not computed.
    """

    class LabelledHeadTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         num_items_in_batch: int | torch.Tensor | None = None) -> Any:
            loss, outputs = labelled_positions_loss(model, inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    LabelledHeadTrainer.__name__ = LabelledHeadTrainer.__qualname__ = f"LabelledHead{trainer_class.__name__}"
    return LabelledHeadTrainer
