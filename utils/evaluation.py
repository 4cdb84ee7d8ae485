"""Evaluation on the held-out test split: assistant-token loss and perplexity, task metrics, results JSON."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import peft
import torch
import transformers
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from utils.atomic import atomic_write_text
from utils.data import follows_house_style
from utils.generation import Generated, Messages, render_prompt
from utils.runtime import progress_bar
from utils.tokenization import IGNORE_INDEX, tokenize_conversation

# --- loss and perplexity on the assistant's tokens -------------------------------------------------

@dataclass(frozen=True)
class LossResult:
    """Mean cross-entropy per assistant token over a split, its perplexity, and what it was computed on."""

    loss: float
    perplexity: float
    assistant_tokens: int
    conversations: int


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``...ForCausalLM`` inside a PEFT wrapper (LoRA layers stay active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its eos token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _labelled_logits(lm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """fp32 logits at the positions that predict a labelled token, those tokens, and the mask that picked them.

    The LM head runs only on those positions: the full-vocabulary logits of the others would be thrown away.
    """
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX
    return lm.get_output_embeddings()(hidden[:, :-1][keep]).float(), targets[keep], keep


def pad_right(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack tokenized rows into a right-padded batch (labels padded with -100, attention mask with 0)."""
    width = max(len(row["input_ids"]) for row in rows)
    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows])
    return {"input_ids": padded("input_ids", pad_id), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX)}


@torch.inference_mode()
def assistant_token_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         conversations: Sequence[dict[str, Any]], max_length: int = 1024,
                         batch_size: int = 8, tokens: str = "assistant") -> LossResult:
    """Cross-entropy averaged over every assistant token of every conversation (prompts and padding excluded).

    Each token counts once, however long its conversation (a micro-average), and the LM head runs only
    on the positions that predict an assistant token: the full-vocabulary logits of the prompt tokens
    would cost time and memory and are thrown away. ``tokens="all"`` scores every token after the first
    instead (prompts and template tokens too; padding still excluded); ``assistant_tokens`` then counts those.
    """
    if tokens not in ("assistant", "all"):
        raise ValueError(f"tokens={tokens!r}: choose 'assistant' (the replies) or 'all' (every token).")
    rows = [tokenize_conversation(c["messages"], tokenizer, max_length) for c in conversations]
    if tokens == "all":
        rows = [{**row, "labels": list(row["input_ids"])} for row in rows]
    rows.sort(key=lambda row: len(row["input_ids"]))  # similar lengths together: little padding
    pad_id = _pad_id(tokenizer)
    lm = _causal_lm(model)
    total, count = 0.0, 0
    for start in progress_bar(range(0, len(rows), batch_size), desc="held-out loss", unit="batch",
                      disable=len(rows) <= batch_size):
        batch = {k: v.to(model.device) for k, v in pad_right(rows[start:start + batch_size], pad_id).items()}
        logits, targets, keep = _labelled_logits(lm, batch)
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += int(keep.sum())
    if count == 0:
        raise ValueError("No assistant tokens to score: are the conversations empty, or max_length too small?")
    loss = total / count
    return LossResult(loss=loss, perplexity=math.exp(loss), assistant_tokens=count, conversations=len(rows))


@torch.inference_mode()
def opening_logprob(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages],
                    opening: str, batch_size: int = 8) -> list[float]:
    """Log-probability that the answer to each prompt starts with ``opening`` (teacher-forced, nothing generated).

    Greedy decoding writes a phrase only once the model prefers it over every other token; this measures how far
    training moved the model towards it before that. The opening is tokenized in context, after the generation
    prompt, exactly as in training; leave out a trailing space (it belongs to the next word's token).
    """
    if not opening or opening != opening.rstrip():
        raise ValueError(f"opening={opening!r}: give a non-empty text without a trailing space.")
    rows = []
    for number, messages in enumerate(prompts, start=1):
        prompt = render_prompt(messages, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = tokenizer(prompt + opening, add_special_tokens=False).input_ids
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"Prompt {number}: the tokens of prompt + {opening!r} do not start with the prompt's "
                             "tokens, so the opening cannot be scored on its own.")
        labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    pad_id = _pad_id(tokenizer)
    lm = _causal_lm(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # similar lengths: little padding
    scores = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(model.device) for k, v in pad_right([rows[i] for i in chunk], pad_id).items()}
        logits, targets, keep = _labelled_logits(lm, batch)
        picked = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        per_row = torch.zeros(keep.shape[0], device=picked.device).index_add_(0, keep.nonzero()[:, 0], picked)
        for index, value in zip(chunk, per_row.tolist()):
            scores[index] = value
    return scores


# --- task metrics ----------------------------------------------------------------------------------

def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """House-style adherence and mean ROUGE-L F1 (longest common word subsequence, stemmed) against the references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("No answers to score.")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    style = [follows_house_style(pred) for pred in predictions]
    return {"house_style": sum(style) / len(style), "rouge_l": sum(rouge) / len(rouge)}


def summarize_generations(generations: Sequence[Generated], references: Sequence[str]) -> dict[str, float]:
    """Task metrics plus how the answers ended: share stopped by a stop token, mean answer length in tokens."""
    scores = score_answers([g.text for g in generations], references)
    scores["stopped"] = sum(g.stopped for g in generations) / len(generations)
    scores["mean_new_tokens"] = sum(len(g.token_ids) for g in generations) / len(generations)
    return scores


def prompts_and_references(conversations: Sequence[dict[str, Any]]) -> tuple[list[Messages], list[str]]:
    """Prompts (each conversation up to its last assistant turn) and reference answers (that turn)."""
    prompts, references = [], []
    for number, conversation in enumerate(conversations, start=1):
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"Test conversation {number} does not end with an assistant turn to compare against.")
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"])
    return prompts, references


# --- results ---------------------------------------------------------------------------------------

def environment_record() -> dict[str, str]:
    """Library versions and device, so that a number in the results can be reproduced."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "device": device, "torch_threads": str(torch.get_num_threads()), "python": platform.python_version()}


def write_results(path: Path, results: dict[str, Any]) -> Path:
    """Write the evaluation results as indented JSON, stamped with the time and the environment."""
    def plain(value: Any) -> Any:
        if hasattr(value, "__dataclass_fields__"):
            return asdict(value)
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"Cannot write {type(value).__name__} to JSON")

    record = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment_record(), **results}
    return atomic_write_text(path, json.dumps(record, indent=2, default=plain) + "\n")  # never half a file


def read_results(path: Path) -> dict[str, Any]:
    """Read results written by :func:`write_results` (for the benchmark and the README)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
