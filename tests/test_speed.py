"""utils.speed: each speed lever gives the same loss and gradients as the reference computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Phi3Config, Phi3ForCausalLM

from utils.speed import (
    VARLEN_SDPA,
    score_only_labelled_positions,
    sequence_boundaries,
    use_varlen_sdpa,
)

LENGTHS = (7, 3, 11)  # three conversations packed into one padding-free row


def small_gqa_phi3(attn: str = "sdpa") -> Phi3ForCausalLM:
    """A 2-layer random Phi-3 with grouped-query attention (4 query heads share 2 key/value heads)."""
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=None, pad_token_id=0, attn_implementation=attn,
                        use_cache=False)  # with a cache, SDPA ignores packed position_ids
    return Phi3ForCausalLM(config).float()


def packed_batch(lengths: tuple[int, ...] = LENGTHS) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Random sequences and the padding-free batch trl's collator builds from them."""
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 97, (n,), generator=generator) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = {
        "input_ids": torch.cat(sequences)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
        "max_length_q": max(lengths), "max_length_k": max(lengths),
    }
    return sequences, batch


def test_sequence_boundaries_and_bad_input():
    assert sequence_boundaries(torch.tensor([0, 3, 3, 8])) == [(0, 3), (3, 8)]
    with pytest.raises(ValueError, match="start at 0"):
        sequence_boundaries(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="never decrease"):
        sequence_boundaries(torch.tensor([0, 5, 3]))


def test_varlen_sdpa_matches_each_sequence_alone_logits_and_gradients():
    reference = small_gqa_phi3()
    varlen = copy.deepcopy(reference)
    use_varlen_sdpa(varlen)
    assert varlen.config._attn_implementation == VARLEN_SDPA
    sequences, batch = packed_batch()

    separate = torch.cat([reference(input_ids=s[None]).logits[0] for s in sequences])
    separate.square().mean().backward()
    packed = varlen(**batch).logits[0]
    packed.square().mean().backward()

    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-4)
    for (name, p_ref), (_, p_var) in zip(reference.named_parameters(), varlen.named_parameters()):
        torch.testing.assert_close(p_var.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_varlen_sdpa_equals_block_diagonal_sdpa_and_differs_from_unmasked():
    """Same result as SDPA's block-diagonal mask; without boundaries the sequences would leak into each other."""
    masked = small_gqa_phi3()
    varlen = copy.deepcopy(masked)
    use_varlen_sdpa(varlen)
    _, batch = packed_batch()
    with torch.no_grad():
        expected = masked(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        got = varlen(**batch).logits
        leaked = masked(input_ids=batch["input_ids"]).logits  # one causal row: later sequences see earlier ones
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (leaked[0, LENGTHS[0]:] - expected[0, LENGTHS[0]:]).abs().max() > 1e-3


def test_varlen_sdpa_falls_back_to_masked_sdpa_for_padded_batches():
    reference = small_gqa_phi3()
    varlen = copy.deepcopy(reference)
    use_varlen_sdpa(varlen)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(varlen(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits)


def fused_loss_and_grads(model: Phi3ForCausalLM, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Loss of trl's fused LM head (as SFTTrainer calls it) and the gradients it gives."""
    model.zero_grad()
    out = model(**batch, labels=labels, fused_lm_head=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_scoring_only_labelled_positions_is_exact(monkeypatch):
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    scored_rows = []  # how many positions each call projects through the LM head
    original_apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *args: scored_rows.append(hidden.shape[0]) or original_apply(hidden, *args))

    model = small_gqa_phi3()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    _, batch = packed_batch()
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]  # a few "assistant" tokens in the first and last conversation
    labels[0, 15:21] = ids[0, 15:21]
    batch = {k: v for k, v in batch.items() if k != "input_ids"} | {"input_ids": ids}

    every_loss, every_grads = fused_loss_and_grads(model, batch, labels)
    with score_only_labelled_positions(vocab_chunk=32):  # several vocabulary tiles
        compact_loss, compact_grads = fused_loss_and_grads(model, batch, labels)
    model.zero_grad()
    logits = model(**batch).logits  # the plain forward: full logits, the textbook loss
    reference = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    reference.backward()

    assert scored_rows[:2] == [sum(LENGTHS) - 1, int((labels[0, 1:] != -100).sum())]  # every position, then 9
    torch.testing.assert_close(compact_loss, reference.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(compact_loss, every_loss, atol=1e-6, rtol=1e-5)
    for name, grad in compact_grads.items():
        torch.testing.assert_close(grad, every_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_score_only_labelled_positions_restores_trl():
    import trl.trainer.utils as trl_utils

    before = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    with score_only_labelled_positions(vocab_chunk=1024):
        assert trl_utils._use_triton(torch.device("cpu")) is True
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 1024
    assert (trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE) == before


def test_labelled_head_trainer_gives_trls_loss_and_gradients():
    """utils.speed.labelled_head_trainer against trl's own SFTTrainer.compute_loss on one assistant-only batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from utils.models import load_model_and_tokenizer
    from utils.speed import labelled_head_trainer

    model, tokenizer = load_model_and_tokenizer("tiny", verbose=False)
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    args = SFTConfig(output_dir="/tmp/labelled-head-test", assistant_only_loss=True, per_device_train_batch_size=1,
                     use_cpu=True, report_to="none", max_length=256)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = labelled_head_trainer(SFTTrainer)(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                                                train_dataset=Dataset.from_list([{"messages": messages}]))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    for parameter in trainer.model.parameters():  # B = 0 would make every LoRA A gradient zero
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)
    n = int((batch["labels"][:, 1:] != -100).sum())
    results = []
    for compute in (SFTTrainer.compute_loss, type(trainer).compute_loss):
        trainer.model.zero_grad()
        loss = compute(trainer, trainer.model, dict(batch), num_items_in_batch=torch.tensor(n))
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.requires_grad]
        results.append((float(loss.detach()), grads))
    (reference, reference_grads), (ours, our_grads) = results
    assert ours == pytest.approx(reference, rel=1e-5)
    for a, b in zip(reference_grads, our_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
