"""Test instrumentation: record which models a notebook kernel holds at once, for utils.memory_budget.

Loaded by an IPython startup file that the root ``conftest.py`` writes (only when ``$PHI3_LORA_MEMORY_TRACE``
names a folder), so every kernel that nbval or nbclient starts under pytest runs it before the notebook's first
cell; it records only where ``$PHI3_LORA_MEMORY_TRACE_NOTEBOOK`` names the notebook (conftest.py sets it for
each notebook nbval runs). The notebooks themselves are not touched. Every ``PreTrainedModel`` built
(``__init__``) or copied (``__setstate__``) is registered by weak reference; a *snapshot* lists the live ones
(and the optimizers holding state):

* after every ``PreTrainedModel.from_pretrained`` returns (``load``),
* after every cell (``cell``),
* at every inference forward call of a top-level model, with the batch shape (``forward``),
* at every ``generate`` call, with batch size, prompt length and ``max_new_tokens`` (``generate``),
* at the first step of every optimizer, with the model it trains and whether a ``transformers.Trainer`` drives
  it (``train``).

and writes ``<trace folder>/<notebook stem>.json`` (atomically) after every cell. Sizes are those of the model
the notebook runs (the tiny one in the tests); ``utils.memory_budget`` turns them into Phi-3-mini bytes.

This is test-harness code: the wrappers around ``from_pretrained``, ``__call__``, ``generate`` and
``prepare_model_for_kbit_training`` exist only inside traced test kernels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import PreTrainedModel
from transformers.generation.utils import GenerationMixin

TRACE_ENV_VAR = "PHI3_LORA_MEMORY_TRACE"  # folder for the traces; unset or empty: no tracing
NOTEBOOK_ENV_VAR = "PHI3_LORA_MEMORY_TRACE_NOTEBOOK"  # the notebook this kernel runs (set by conftest / the test)
SHA_ENV_VAR = "PHI3_LORA_MEMORY_TRACE_NOTEBOOK_SHA256"  # its sha256 when nbval read it (else: the file's now)
FORMAT = 1
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "tie_word_embeddings")

_lock = threading.RLock()
_local = threading.local()  # depth of nested model calls, inside generate
_models: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()  # model -> serial
_optimizers: "weakref.WeakKeyDictionary[torch.optim.Optimizer, str]" = weakref.WeakKeyDictionary()  # -> loop
_kbit_prepared: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_trained: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_state: dict[str, Any] = {"cell": 0, "source": "", "snapshots": [], "failed": [], "errors": [], "serial": 0,
                          "train_shape": None}
_trace: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------
# What is alive
# ------------------------------------------------------------------------------------------------
def _register(model: torch.nn.Module) -> None:
    """Give ``model`` a serial number (its id in the trace) the first time it is seen."""
    with _lock:
        if model not in _models:
            _state["serial"] += 1
            _models[model] = _state["serial"]


def _target_of(name: str) -> str:
    """The module a LoRA parameter belongs to: the name part before ``lora_`` (``...qkv_proj.lora_A...``)."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.startswith("lora_") and index > 0:
            return parts[index - 1]
    return "base"


def _quantization(model: torch.nn.Module) -> str | None:
    """``4bit`` / ``8bit`` for a bitsandbytes model, else None."""
    kinds = {type(module).__name__ for module in model.modules()}
    if "Linear4bit" in kinds or getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    if "Linear8bitLt" in kinds or getattr(model, "is_loaded_in_8bit", False):
        return "8bit"
    return None


def _roots() -> list[torch.nn.Module]:
    """Live models that are not part of another live model (Phi3ForCausalLM, not its inner Phi3Model)."""
    with _lock:
        models = sorted(list(_models.items()), key=lambda item: item[1])
    inner: set[int] = set()
    for model, _ in models:
        inner.update(id(module) for module in model.modules() if module is not model)
    return [model for model, _ in models if id(model) not in inner]


def _is_wrapper(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer that wraps another (accelerate's AcceleratedOptimizer): its state is the inner one's."""
    return isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)


def _census() -> dict[str, Any]:
    """The live models and optimizers: parameters, bytes by dtype, LoRA parameters by module, gradients."""
    counted: dict[tuple[str, int, int], int] = {}  # (device, data pointer, elements) -> the model counted first
    owner: dict[int, tuple[int, str]] = {}  # id(parameter) -> (serial, LoRA target or "base")
    records = []
    for model in _roots():
        serial = _models.get(model)
        record: dict[str, Any] = {
            "serial": serial, "class": type(model).__name__,
            "config": {key: getattr(model.config, key, None) for key in CONFIG_KEYS},
            "quantization": _quantization(model), "kbit_prepared": model in _kbit_prepared,
            "trained": model in _trained, "training_mode": model.training,
            "parameters": 0, "meta_parameters": 0, "base_bytes": 0, "base_shared_bytes": 0,
            "bytes_by_dtype": Counter(), "adapter_by_target": Counter(), "trainable_by_target": Counter(),
            "grad_by_target": Counter(), "devices": set(),
        }
        for name, parameter in model.named_parameters():
            target = _target_of(name)
            owner[id(parameter)] = (serial, target)
            if parameter.device.type == "meta":
                record["meta_parameters"] += parameter.numel()
                continue
            record["parameters"] += parameter.numel()
            record["devices"].add(parameter.device.type)
            size = parameter.numel() * parameter.element_size()
            record["bytes_by_dtype"][str(parameter.dtype).removeprefix("torch.")] += size
            if target == "base":  # the same tensor in an earlier model (a merged model and its wrapper) is shared
                key = (str(parameter.device), parameter.data_ptr(), parameter.numel())
                record["base_bytes"] += size
                if counted.setdefault(key, serial) != serial:
                    record["base_shared_bytes"] += size
            else:
                record["adapter_by_target"][target] += parameter.numel()
            if parameter.requires_grad:
                record["trainable_by_target"][target] += parameter.numel()
            if parameter.grad is not None:
                record["grad_by_target"][target] += parameter.numel()
        if record["parameters"] == 0:  # a meta-device model (a planning skeleton) holds no memory
            continue
        record["devices"] = sorted(record["devices"])
        for key in ("bytes_by_dtype", "adapter_by_target", "trainable_by_target", "grad_by_target"):
            record[key] = dict(sorted(record[key].items()))
        records.append(record)
    optimizers = []
    with _lock:
        live_optimizers = list(_optimizers.items())
    states: set[int] = set()
    for optimizer, loop in live_optimizers:
        if not optimizer.state or _is_wrapper(optimizer) or id(optimizer.state) in states:
            continue
        states.add(id(optimizer.state))
        by_target: Counter = Counter()
        models: set[int] = set()
        state_bytes = 0
        for parameter, values in optimizer.state.items():
            serial, target = owner.get(id(parameter), (None, "unowned"))
            by_target[target] += parameter.numel()
            if serial is not None:
                models.add(serial)
            state_bytes += sum(v.numel() * v.element_size() for v in values.values() if torch.is_tensor(v))
        optimizers.append({"class": type(optimizer).__name__, "loop": loop, "models": sorted(models),
                           "numel_by_target": dict(by_target), "state_bytes": state_bytes})
    return {"models": records, "optimizers": optimizers}


def _snapshot(event: str, **details: Any) -> None:
    """Append one snapshot; consecutive forward calls with the same census keep only the largest."""
    census = _census()
    entry = {"event": event, "cell": _state["cell"], "source": _state["source"], **census, **details}
    with _lock:
        snapshots = _state["snapshots"]
        if event == "forward" and snapshots:
            last = snapshots[-1]
            same = (last["event"] == "forward" and last["cell"] == entry["cell"]
                    and _json(last["models"]) == _json(entry["models"])
                    and _json(last["optimizers"]) == _json(entry["optimizers"]))
            if same:
                last["calls"] = last.get("calls", 1) + 1
                if entry["tokens"] > last["tokens"]:
                    calls = last["calls"]
                    last.update(entry)
                    last["calls"] = calls
                return
        snapshots.append(entry)


def _json(value: Any) -> str:
    """Canonical JSON text (sets and Counters included), for comparison and writing."""
    return json.dumps(value, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else dict(v))


# ------------------------------------------------------------------------------------------------
# Hooks
# ------------------------------------------------------------------------------------------------
_original_init = PreTrainedModel.__init__
_original_setstate = PreTrainedModel.__setstate__
_original_from_pretrained = PreTrainedModel.from_pretrained.__func__
_original_generate = GenerationMixin.generate


def _guarded(function: Any) -> Any:
    """Run a recording step without ever raising into the notebook: an error is kept in the trace instead."""
    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:  # the notebook must run exactly as it does without the tracer
            _state["errors"].append(f"cell {_state['cell']}, {function.__name__}: {type(error).__name__}: {error}")
            return None
    return guarded


def _init(self, *args: Any, **kwargs: Any) -> None:
    """Every model built by transformers joins the registry."""
    _original_init(self, *args, **kwargs)
    _guarded(_register)(self)


def _setstate(self, state: dict) -> None:
    """Copies (``copy.deepcopy``) and unpickled models skip ``__init__``: they join the registry here."""
    _original_setstate(self, state)
    _guarded(_register)(self)


@_guarded
def _record_load(model: Any) -> None:
    """Snapshot right after a load: what is alive together with the new model."""
    _register(model)
    if _quantization(model):
        _patch_peft()
    _snapshot("load", loaded=_models.get(model))


def _from_pretrained(cls, *args: Any, **kwargs: Any):
    """``PreTrainedModel.from_pretrained``, then a ``load`` snapshot."""
    model = _original_from_pretrained(cls, *args, **kwargs)
    _record_load(model)
    return model


def _first_tensor(args: tuple, kwargs: dict, *names: str) -> torch.Tensor | None:
    """The first of ``names`` given as a tensor keyword, else the first positional tensor."""
    for name in names:
        if torch.is_tensor(kwargs.get(name)):
            return kwargs[name]
    return next((a for a in args if torch.is_tensor(a)), None)


@_guarded
def _record_forward(model: Any, args: tuple, kwargs: dict) -> None:
    """Inference calls get a ``forward`` snapshot; training calls only leave their shape for the ``train`` one."""
    inputs = _first_tensor(args, kwargs, "input_ids", "inputs_embeds")
    if inputs is None or inputs.dim() < 2:
        return
    batch, length = int(inputs.shape[0]), int(inputs.shape[1])
    if torch.is_grad_enabled() and model.training:
        _state["train_shape"] = [batch, length]
    else:
        _snapshot("forward", model=_models.get(model), batch=batch, length=length, tokens=batch * length,
                  grad=torch.is_grad_enabled(), labels=kwargs.get("labels") is not None)


def _call(self, *args: Any, **kwargs: Any):
    """``nn.Module.__call__`` for models, recording the outermost model call (not those inside ``generate``).

    PEFT calls the wrapped model's ``forward`` directly, so under PEFT the inner ``Phi3Model`` call is the
    outermost one seen; its input shape is the same.
    """
    depth = getattr(_local, "depth", 0)
    if depth == 0 and not getattr(_local, "generating", False):
        _record_forward(self, args, kwargs)
    _local.depth = depth + 1
    try:
        return torch.nn.Module.__call__(self, *args, **kwargs)
    finally:
        _local.depth = depth


@_guarded
def _record_generate(model: Any, args: tuple, kwargs: dict) -> None:
    """Snapshot with batch size, prompt length, new tokens, beams and returned sequences (for the KV cache)."""
    inputs = _first_tensor(args, kwargs, "input_ids", "inputs")
    batch, prompt = (int(inputs.shape[0]), int(inputs.shape[-1])) if inputs is not None else (1, 0)
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is None:
        new = max(0, int(kwargs.get("max_length", getattr(config, "max_length", None) or 20)) - prompt)
    beams = int(kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1)
    returned = int(kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1)
    _snapshot("generate", model=_models.get(model), batch=batch, prompt=prompt, max_new_tokens=int(new),
              num_beams=beams, num_return_sequences=returned)


def _generate(self, *args: Any, **kwargs: Any):
    """``GenerationMixin.generate``, after a ``generate`` snapshot (nested calls are not recorded)."""
    if getattr(_local, "generating", False):
        return _original_generate(self, *args, **kwargs)
    _record_generate(self, args, kwargs)
    _local.generating = True
    try:
        return _original_generate(self, *args, **kwargs)
    finally:
        _local.generating = False


def _driven_by_trainer() -> bool:
    """True when a ``transformers.Trainer`` method is on the call stack."""
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_class = getattr(trainer_module, "Trainer", None)
    frame = sys._getframe(1)
    while frame is not None and trainer_class is not None:
        if isinstance(frame.f_locals.get("self"), trainer_class):
            return True
        frame = frame.f_back
    return False


@_guarded
def _optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """At an optimizer's first step: snapshot the model it trains and how (Trainer or a hand-written loop)."""
    with _lock:
        if optimizer in _optimizers:
            return
    loop = "trainer" if _driven_by_trainer() else "custom"
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = [m for m in _roots() if any(id(p) in ids for p in m.parameters())]
    for model in trained:
        _trained.add(model)
    with _lock:
        _optimizers[optimizer] = loop
    _snapshot("train", models_trained=[_models.get(m) for m in trained], loop=loop,
              optimizer=type(optimizer).__name__, batch_shape=_state["train_shape"])


def _patch_peft() -> None:
    """Mark models passed through ``peft.prepare_model_for_kbit_training`` (it upcasts non-4-bit weights to fp32)."""
    import peft
    import peft.utils
    import peft.utils.other

    original = peft.utils.other.prepare_model_for_kbit_training
    if getattr(original, "_memory_trace", False):
        return

    def prepare_model_for_kbit_training(model, *args: Any, **kwargs: Any):
        prepared = original(model, *args, **kwargs)
        for candidate in (model, prepared):
            if isinstance(candidate, torch.nn.Module):
                _kbit_prepared.add(candidate)
        return prepared

    prepare_model_for_kbit_training._memory_trace = True
    prepare_model_for_kbit_training.__doc__ = original.__doc__
    for module in (peft, peft.utils, peft.utils.other):
        if getattr(module, "prepare_model_for_kbit_training", None) is original:
            module.prepare_model_for_kbit_training = prepare_model_for_kbit_training


# ------------------------------------------------------------------------------------------------
# Cells and the trace file
# ------------------------------------------------------------------------------------------------
@_guarded
def _pre_run_cell(info: Any) -> None:
    """Count the cell and keep its first line, to say where a peak happens."""
    _state["cell"] += 1
    lines = [line.strip() for line in (getattr(info, "raw_cell", "") or "").splitlines()]
    _state["source"] = next((line for line in lines if line and not line.startswith("#")), "")[:100]
    if "peft" in sys.modules:
        _patch_peft()


@_guarded
def _post_run_cell(result: Any) -> None:
    """Snapshot what the cell left alive and write the trace."""
    if not getattr(result, "success", True):
        _state["failed"].append(_state["cell"])
    _snapshot("cell")
    write_trace()


def write_trace() -> Path:
    """Write the trace JSON atomically (temporary file + rename)."""
    with _lock:
        _trace.update(cells_run=_state["cell"], cells_failed=list(_state["failed"]),
                      tracer_errors=list(_state["errors"]),
                      snapshots=list(_state["snapshots"]), written=time.time())
        text = _json(_trace)
    path = Path(_trace["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def install(shell: Any = None) -> bool:
    """Install the hooks when ``$PHI3_LORA_MEMORY_TRACE`` names a folder and a notebook is named; True if so.

    A kernel that runs no named notebook (one another test starts) is left untouched.
    """
    folder = os.environ.get(TRACE_ENV_VAR, "")
    notebook = Path(os.environ.get(NOTEBOOK_ENV_VAR, "") or ".")
    if not folder or not notebook.is_file() or getattr(PreTrainedModel, "_memory_trace_installed", False):
        return False
    _trace.update(format=FORMAT, notebook=notebook.name, notebook_path=str(notebook),
                  notebook_sha256=os.environ.get(SHA_ENV_VAR) or hashlib.sha256(notebook.read_bytes()).hexdigest(),
                  model_name=os.environ.get("PHI3_LORA_MODEL"), smoke=os.environ.get("PHI3_LORA_SMOKE"),
                  started=time.time(), path=str(Path(folder) / f"{notebook.stem}.json"))
    PreTrainedModel.__init__ = _init
    PreTrainedModel.__setstate__ = _setstate
    PreTrainedModel.from_pretrained = classmethod(_from_pretrained)
    PreTrainedModel.__call__ = _call
    GenerationMixin.generate = _generate
    register_optimizer_step_pre_hook(_optimizer_step)
    PreTrainedModel._memory_trace_installed = True
    if shell is not None:
        shell.events.register("pre_run_cell", _pre_run_cell)
        shell.events.register("post_run_cell", _post_run_cell)
    write_trace()
    return True
