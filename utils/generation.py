"""Generation with a chat model: stop ids, prompts, batched greedy decoding, speed, a streaming chat.

Model-agnostic on purpose: Phi-3 ends a turn with ``<|end|>`` (32007) and a document with
``<|endoftext|>`` (32000); the smol demo model (SmolLM2's ChatML) ends a turn with ``<|im_end|>``.
The stop ids are read from the tokenizer, its chat template and the model's generation config,
never hard-coded, and answers are cut at the first stop *token*, never by string surgery.
Attaching and merging adapters is :mod:`utils.adapters`; the memory a batch needs, :mod:`utils.memory`.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from utils.control_tokens import neutralise_control_tokens
from utils.runtime import progress_bar

Messages = list[dict[str, str]]

_MARKER = "\u2063MARKER\u2063"  # a string no template adds by itself, to find what follows an assistant reply


# --- stop ids and prompts ------------------------------------------------------------------------

def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template writes right after an assistant reply (``<|end|>``, ``<|im_end|>``)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}], tokenize=False
    )
    after = text[text.index(_MARKER) + len(_MARKER):]
    for token in sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True):
        if token and after.startswith(token):
            return token
    return None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Every id that ends a reply: the template's end-of-turn token, the tokenizer's eos, the model's eos ids."""
    ids: list[int] = []
    turn_end = end_of_turn_token(tokenizer)
    if turn_end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(turn_end))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if model is not None and model.generation_config.eos_token_id is not None:
        eos = model.generation_config.eos_token_id
        ids.extend(eos if isinstance(eos, list) else [eos])
    if not ids:
        raise ValueError("Found no stop token: the tokenizer has no eos token and its chat template ends turns "
                         "with no special token. Set tokenizer.eos_token to the model's end-of-turn token.")
    return sorted(set(int(i) for i in ids))


def left_padding_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of the tokenizer that pads on the left, as batched generation needs (training pads on the right)."""
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    if left.pad_token is None:
        left.pad_token = left.eos_token
    return left


def render_prompt(messages: Messages, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt text: the chat template with the generation prompt (``<|assistant|>\\n``) and no EOS at the end."""
    if not messages or messages[-1]["role"] == "assistant":
        raise ValueError("A generation prompt must end with a user (or system) turn, not with an assistant reply.")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ends_with_stop = [token for token in (tokenizer.eos_token, end_of_turn_token(tokenizer))
                      if token and text.rstrip().endswith(token)]
    if ends_with_stop:
        raise ValueError(f"The rendered prompt ends with {ends_with_stop[0]!r}: the chat template ignored "
                         "add_generation_prompt=True, so the model would be asked to continue after a stop token.")
    return text


# --- greedy generation ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings, recorded next to every result they produce."""

    max_new_tokens: int = 160
    do_sample: bool = False  # greedy: the same answers on every run
    num_beams: int = 1
    repetition_penalty: float = 1.0
    batch_size: int = 8

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for JSON and tables)."""
        return asdict(self)


@dataclass(frozen=True)
class Generated:
    """One generated reply: its text, its token ids (stop token excluded) and whether a stop token ended it."""

    text: str
    token_ids: list[int]
    stopped: bool


def generation_config(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel,
                      settings: GenerationSettings, **overrides: Any) -> GenerationConfig:
    """A complete GenerationConfig: the settings, the stop ids as eos, the pad id; nothing inherited silently."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    values: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, num_beams=settings.num_beams,
        repetition_penalty=settings.repetition_penalty, eos_token_id=stop_token_ids(tokenizer, model),
        pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
    )
    values.update(overrides)
    return GenerationConfig(**values)


def cut_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The ids before the first stop id, and whether one was found (False: the token budget ran out)."""
    stops = set(stop_ids)
    for position, token in enumerate(token_ids):
        if int(token) in stops:
            return [int(t) for t in token_ids[:position]], True
    return [int(t) for t in token_ids], False


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages],
                   settings: GenerationSettings = GenerationSettings()) -> list[Generated]:
    """Greedy replies to many prompts, ``settings.batch_size`` at a time, left-padded, cut at the first stop id."""
    left = left_padding_tokenizer(tokenizer)
    config = generation_config(left, model, settings)
    stops = stop_token_ids(tokenizer, model)
    texts = [render_prompt(messages, tokenizer) for messages in prompts]
    # Longest prompts first keeps the padding in each batch small; results go back in the caller's order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: dict[int, Generated] = {}
    for start in progress_bar(range(0, len(order), settings.batch_size), desc="generating", unit="batch",
                      disable=len(order) <= settings.batch_size):  # no bar for a single batch
        chunk = order[start:start + settings.batch_size]
        batch = left([texts[i] for i in chunk], add_special_tokens=False, padding=True, return_tensors="pt")
        batch = batch.to(model.device)
        output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        for row, index in enumerate(chunk):
            ids, stopped = cut_at_stop(new_tokens[row].tolist(), stops)
            results[index] = Generated(tokenizer.decode(ids, skip_special_tokens=False), ids, stopped)
    return [results[i] for i in range(len(texts))]


def template_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The special and added tokens (``<|end|>``, ``<|assistant|>``, ...) that must never show in an answer."""
    return sorted({t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t})


def leaked_template_tokens(text: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The template tokens found in an answer (an empty list is what a clean answer gives)."""
    return [token for token in template_tokens(tokenizer) if token in text]


def generation_speed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: Messages,
                     new_tokens: int = 64, repeats: int = 3) -> float:
    """Tokens per second of greedy decoding, one prompt (chat latency), exactly ``new_tokens`` each run; median."""
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=1)
    config = generation_config(tokenizer, model, settings, min_new_tokens=new_tokens)
    inputs = tokenizer(render_prompt(messages, tokenizer), add_special_tokens=False, return_tensors="pt")
    inputs = inputs.to(model.device)
    rates = []
    with torch.inference_mode():
        warm_up = generation_config(tokenizer, model, GenerationSettings(max_new_tokens=2), min_new_tokens=2)
        model.generate(**inputs, generation_config=warm_up)
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            output = model.generate(**inputs, generation_config=config)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            produced = output.shape[1] - inputs["input_ids"].shape[1]
            rates.append(produced / (time.perf_counter() - start))
    return statistics.median(rates)


# --- a multi-turn chat that streams --------------------------------------------------------------

class ChatSession:
    """A conversation with history kept as chat messages; each reply is streamed token by token."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, system: str | None = None,
                 settings: GenerationSettings = GenerationSettings(max_new_tokens=256, batch_size=1)) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.history: Messages = [{"role": "system", "content": system}] if system else []
        self._stops = stop_token_ids(tokenizer, model)

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn, stream the reply (``on_text`` gets each new piece), add it to the history, return it."""
        on_text = on_text or (lambda piece: print(piece, end="", flush=True))  # default: print as it comes
        text = neutralise_control_tokens(text, template_tokens(self.tokenizer))  # no fake turns from the user
        messages = self.history + [{"role": "user", "content": text}]
        inputs = self.tokenizer(render_prompt(messages, self.tokenizer), add_special_tokens=False,
                                return_tensors="pt").to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        config = generation_config(self.tokenizer, self.model, self.settings)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["output"] = self.model.generate(**inputs, generation_config=config, streamer=streamer)
            except BaseException as error:  # re-raised in the caller's thread below
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            on_text(piece)
        worker.join()
        if "error" in result:
            raise result["error"]
        new_tokens = result["output"][0, inputs["input_ids"].shape[1]:].tolist()
        ids, _ = cut_at_stop(new_tokens, self._stops)
        reply = self.tokenizer.decode(ids, skip_special_tokens=True)
        self.history = messages + [{"role": "assistant", "content": reply}]
        return reply

    def reset(self) -> None:
        """Forget the conversation, keeping the system message."""
        self.history = [m for m in self.history if m["role"] == "system"]


def chat_box(session: ChatSession) -> Any:
    """A small ipywidgets chat box (JupyterLab, Colab) around a session; building it never blocks."""
    import ipywidgets as widgets  # lazy: only a Jupyter front end (JupyterLab, Colab) can show the box

    transcript = widgets.Textarea(value="", layout=widgets.Layout(width="100%", height="240px"), disabled=True)
    entry = widgets.Text(placeholder="Ask the Kitchen Coach...", layout=widgets.Layout(width="80%"))
    send = widgets.Button(description="Send", button_style="primary")
    clear = widgets.Button(description="Clear")

    def on_send(_: Any = None) -> None:
        question = entry.value.strip()
        if not question:
            return
        entry.value = ""
        transcript.value += f"You: {question}\nCoach: "

        def add(piece: str) -> None:
            transcript.value += piece

        session.send(question, on_text=add)
        transcript.value += "\n\n"

    def on_clear(_: Any = None) -> None:
        session.reset()
        transcript.value = ""

    send.on_click(on_send)
    clear.on_click(on_clear)
    box = widgets.VBox([transcript, widgets.HBox([entry, send, clear])])
    box.entry, box.send_button = entry, send  # for scripted use and tests
    return box
