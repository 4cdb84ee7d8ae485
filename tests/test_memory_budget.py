"""Every notebook must fit the real Phi-3-mini on a 16 GB T4: a memory budget from tiny-model runs.

Under pytest every notebook kernel records which models it holds at once (tests/support/memory_trace.py,
installed by the root conftest.py); utils.memory_budget prices each recorded moment as Phi-3-mini on a GPU.
The root conftest.py runs this file after the notebooks, so it reads the traces nbval just wrote; a trace
that is missing, incomplete or written for another version of the notebook is made again here by running
the notebooks (from the first stale one on, since 05 and 06 read what 03 and 04 write).

The arithmetic is checked against references this project did not write: a meta-device
``Phi3ForCausalLM(phi3_mini_config())`` for the parameter count, transformers' own KV cache, and PEFT's LoRA
layers on the full-size model.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest
import torch

from utils.memory import GIB, kv_cache_bytes_per_token
from utils.memory_budget import (
    CARDS,
    CUDA_OVERHEAD_GIB,
    L4,
    T4,
    budget_table,
    full_weight_bytes,
    notebook_peak,
    price_snapshot,
    quantized_weight_bytes,
    read_trace,
    scaled_adapter_parameters,
)
from utils.models import TINY_PHI3_CONFIG
from utils.paths import NOTEBOOKS_DIR, REPO_ROOT
from utils.phi3 import phi3_mini_config
from utils.series import series_notebooks

TRACE_ENV_VAR = "PHI3_LORA_MEMORY_TRACE"
NOTEBOOK_ENV_VAR = "PHI3_LORA_MEMORY_TRACE_NOTEBOOK"
SHA_ENV_VAR = "PHI3_LORA_MEMORY_TRACE_NOTEBOOK_SHA256"
NOTEBOOKS = series_notebooks()
PHI3_MINI_PARAMETERS = 3_821_079_552  # microsoft/Phi-3-mini-4k-instruct: "3.8B parameters"
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
CELL_TIMEOUT_S = 900  # as nbval's --nbval-cell-timeout in pyproject.toml


def _tracer():
    """tests/support/memory_trace.py as a module (for its name parsing)."""
    spec = importlib.util.spec_from_file_location("memory_trace_for_tests", REPO_ROOT / "tests/support/memory_trace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta_phi3_mini() -> torch.nn.Module:
    """The full-size Phi-3-mini on the meta device: real shapes, no memory."""
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        return Phi3ForCausalLM(phi3_mini_config())


def _tiny_model():
    """A randomly initialised tiny Phi-3 (the test model's architecture), fp32 on the CPU."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**TINY_PHI3_CONFIG)).eval()


# --------------------------------------------------------------------------------------------------
# The arithmetic, against independent references
# --------------------------------------------------------------------------------------------------
def test_full_precision_weights_are_phi3_minis_parameters_in_two_bytes():
    parameters = sum(p.numel() for p in _meta_phi3_mini().parameters())
    assert parameters == PHI3_MINI_PARAMETERS
    assert full_weight_bytes() == PHI3_MINI_PARAMETERS * 2
    assert 7.1 < full_weight_bytes() / GIB < 7.2  # the "~7.1 GiB in 16-bit" everyone quotes


def test_the_fp32_upcast_of_a_prepared_4bit_model_is_its_non_linear_weights_times_two_bytes():
    model = _meta_phi3_mini()
    linear_names = {f"{name}.weight" for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and ".layers." in name}
    not_quantized = sum(p.numel() for name, p in model.named_parameters() if name not in linear_names)
    upcast = quantized_weight_bytes("4bit", True) - quantized_weight_bytes("4bit", False)
    assert upcast == not_quantized * (4 - 2)  # embeddings, lm_head, norms: fp16/bf16 -> fp32
    assert quantized_weight_bytes("4bit", True) < full_weight_bytes() / 2.5


def test_kv_cache_per_token_matches_the_cache_transformers_builds():
    model = _meta_phi3_mini().to(torch.bfloat16)
    tokens = 10
    output = model(input_ids=torch.ones(1, tokens, dtype=torch.long, device="meta"), use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes_per_token(phi3_mini_config()) == cache_bytes / tokens == 393_216  # 0.375 MiB per token


def test_adapter_parameters_scale_to_what_peft_builds_on_phi3_mini():
    from peft import LoraConfig, get_peft_model

    settings = dict(r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    tiny = get_peft_model(_tiny_model(), LoraConfig(**settings))
    target_of = _tracer()._target_of
    by_target: dict[str, int] = {}
    for name, parameter in tiny.named_parameters():
        if "lora_" in name:
            by_target[target_of(name)] = by_target.get(target_of(name), 0) + parameter.numel()
    assert set(by_target) == set(LORA_TARGETS)
    full = get_peft_model(_meta_phi3_mini(), LoraConfig(**settings))
    expected = sum(p.numel() for name, p in full.named_parameters() if "lora_" in name)
    assert scaled_adapter_parameters(by_target, TINY_PHI3_CONFIG) == pytest.approx(expected, rel=1e-12)


def _snapshot(models: list[dict], event: str = "cell", **details) -> dict:
    """A hand-written trace moment."""
    return {"event": event, "cell": 1, "source": "", "models": models, "optimizers": [], **details}


def _full_model(serial: int, **fields) -> dict:
    """A traced tiny full-precision model without adapters."""
    return {"serial": serial, "config": dict(TINY_PHI3_CONFIG), "quantization": None, "base_bytes": 100,
            "base_shared_bytes": 0, "adapter_by_target": {}, "trainable_by_target": {}, "grad_by_target": {},
            **fields}


def test_two_full_models_do_not_fit_a_t4_but_one_does():
    one, two = [_full_model(1)], [_full_model(1), _full_model(2)]
    overhead = CUDA_OVERHEAD_GIB * GIB
    assert price_snapshot(_snapshot(one), T4).total == PHI3_MINI_PARAMETERS * 2 + overhead
    assert price_snapshot(_snapshot(two), T4).total == 2 * PHI3_MINI_PARAMETERS * 2 + overhead
    # Two bare fp16 copies leave ~10 MiB of a T4: the first forward pass (a 256-token check) overflows it.
    check = dict(batch=1, length=256, tokens=256, grad=False)
    with_one = {"notebook": "one", "snapshots": [_snapshot(one), _snapshot(one, "forward", **check)]}
    with_two = {"notebook": "two", "snapshots": [_snapshot(one), _snapshot(two, "forward", **check)]}
    assert notebook_peak(with_one, T4).fits
    assert not notebook_peak(with_two, T4).fits and notebook_peak(with_two, L4).fits


def test_a_model_sharing_its_weights_with_another_is_counted_once():
    shared = _full_model(2, base_shared_bytes=100)  # e.g. merge_and_unload's result next to its PEFT wrapper
    cost = price_snapshot(_snapshot([_full_model(1), shared]), T4)
    assert cost.parts["model weights"] == PHI3_MINI_PARAMETERS * 2


def test_the_command_prints_the_table_and_fails_when_a_notebook_does_not_fit_a_t4(tmp_path, capsys):
    from utils.memory_budget import main

    one, two = _snapshot([_full_model(1)], "forward", batch=1, length=256, tokens=256, grad=False), \
        _snapshot([_full_model(1), _full_model(2)], "forward", batch=1, length=256, tokens=256, grad=False)
    (tmp_path / "01_one.json").write_text(json.dumps({"notebook": "01_one.ipynb", "snapshots": [one]}))
    assert main([str(tmp_path)]) == 0
    (tmp_path / "02_two.json").write_text(json.dumps({"notebook": "02_two.ipynb", "snapshots": [two]}))
    assert main([str(tmp_path)]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0")]
    assert rows[-1].startswith("| 02_two.ipynb | 14.8 **does not fit** | 14.8 fits | 14.8 fits |"), rows


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_single_trainer_run_at_the_gpu_profile_fits_every_card(method):
    """The GPU profile sizes its batch to the card (utils.memory.plan_batch): training alone must fit."""
    lora = {"qkv_proj": 2 * 16 * (64 + 192), "o_proj": 2 * 16 * 128, "gate_up_proj": 2 * 16 * (64 + 512),
            "down_proj": 2 * 16 * (256 + 64)}  # r=16 on the tiny model's two layers
    record = _full_model(1, adapter_by_target=lora, trainable_by_target=lora,
                         quantization="4bit" if method == "qlora" else None, kbit_prepared=method == "qlora")
    moment = _snapshot([record], "train", models_trained=[1], loop="trainer", optimizer="AdamW")
    for card in CARDS:
        cost = price_snapshot(moment, card)
        assert cost.parts["activations (training)"] > 0 and cost.parts["logits (training)"] > 0
        assert cost.total / GIB <= card.memory_gib, (method, card.label, cost.parts)


# --------------------------------------------------------------------------------------------------
# The tracer, on a notebook of its own
# --------------------------------------------------------------------------------------------------
def _run_traced(notebook_path: Path, env: dict[str, str] | None = None) -> None:
    """Execute a notebook in a kernel of this environment with the tracer on (what nbval does, via nbclient)."""
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbval.kernel import CURRENT_ENV_KERNEL_NAME, NbvalKernelspecManager

    content = notebook_path.read_bytes()  # hashed as read, so the trace names the version that ran
    notebook = nbformat.reads(content.decode("utf-8"), as_version=4)
    saved = {key: os.environ.get(key) for key in [NOTEBOOK_ENV_VAR, SHA_ENV_VAR, *(env or {})]}
    os.environ.update({NOTEBOOK_ENV_VAR: str(notebook_path.resolve()), SHA_ENV_VAR: hashlib.sha256(content).hexdigest(),
                       **(env or {})})
    try:
        manager = KernelManager(kernel_name=CURRENT_ENV_KERNEL_NAME, kernel_spec_manager=NbvalKernelspecManager())
        client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S, allow_errors=True,  # as nbval-lax
                                resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
        client.execute(cwd=str(NOTEBOOKS_DIR))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _trace_folder() -> Path:
    """The folder conftest.py points the tracer at; the tests need it."""
    folder = os.environ.get(TRACE_ENV_VAR, "")
    if not folder:
        pytest.skip(f"${TRACE_ENV_VAR} is set to an empty string: memory tracing was switched off on purpose")
    return Path(folder)


def test_the_tracer_sees_models_alive_together_copies_generation_and_training(tmp_path):
    cells = [
        "import gc\nimport torch\nfrom utils.models import load_model_and_tokenizer\n"
        "model, tokenizer = load_model_and_tokenizer('tiny', verbose=False)",
        "second, _ = load_model_and_tokenizer('tiny', verbose=False)\nwith torch.no_grad():\n"
        "    second(input_ids=torch.ones(3, 7, dtype=torch.long))",
        "del second\ngc.collect()",
        "model.generate(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5), "
        "max_new_tokens=4, do_sample=False)",
        "optimizer = torch.optim.AdamW(model.lm_head.parameters())\nmodel.train()\n"
        "batch = torch.ones(2, 9, dtype=torch.long)\nmodel(input_ids=batch, labels=batch).loss.backward()\n"
        "optimizer.step()",
        "import copy\ntwin = copy.deepcopy(model)",
    ]
    path = tmp_path / "99_tracer_check.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]), path)
    _trace_folder()  # the kernels load the tracer only when conftest.py switched tracing on
    _run_traced(path, {TRACE_ENV_VAR: str(tmp_path / "traces")})
    trace = read_trace(tmp_path / "traces" / "99_tracer_check.json")
    assert trace["cells_run"] == 6 and not trace["tracer_errors"] and not trace["cells_failed"]
    assert trace["notebook_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    alive = {(s["event"], s["cell"]): [m["serial"] for m in s["models"]] for s in trace["snapshots"]}
    assert len(alive[("load", 2)]) == 2 and len(alive[("forward", 2)]) == 2 and len(alive[("cell", 2)]) == 2
    assert len(alive[("cell", 3)]) == 1  # del + gc.collect() freed the second model
    generate = next(s for s in trace["snapshots"] if s["event"] == "generate")
    assert (generate["batch"], generate["prompt"], generate["max_new_tokens"]) == (2, 5, 4)
    train = next(s for s in trace["snapshots"] if s["event"] == "train")
    assert train["loop"] == "custom" and train["models_trained"] == alive[("cell", 3)]
    assert train["batch_shape"] == [2, 9]
    after_training = next(s for s in trace["snapshots"] if (s["event"], s["cell"]) == ("cell", 5))
    lm_head = TINY_PHI3_CONFIG["vocab_size"] * TINY_PHI3_CONFIG["hidden_size"]
    assert after_training["optimizers"][0]["state_bytes"] >= 2 * lm_head * 4  # AdamW's two fp32 moments
    twin = trace["snapshots"][-1]["models"]
    assert len(twin) == 2 and twin[1]["base_shared_bytes"] == 0  # a deep copy is a second set of weights


# --------------------------------------------------------------------------------------------------
# The notebooks
# --------------------------------------------------------------------------------------------------
def trace_problem(notebook: Path, folder: Path) -> str | None:
    """Why the trace of ``notebook`` cannot be used (missing, another version, incomplete), or None."""
    path = folder / f"{notebook.stem}.json"
    if not path.is_file():
        return f"no trace at {path}"
    try:
        trace = read_trace(path)
    except ValueError as error:
        return str(error)
    if trace.get("notebook_sha256") != hashlib.sha256(notebook.read_bytes()).hexdigest():
        return f"{path} was written for another version of {notebook.name}"
    code_cells = sum(cell.cell_type == "code" for cell in nbformat.read(notebook, as_version=4).cells)
    if trace.get("cells_run", 0) < code_cells:
        return f"{path} covers {trace.get('cells_run', 0)} of {code_cells} code cells"
    if trace.get("tracer_errors"):
        return f"{path}: the tracer failed: {trace['tracer_errors'][:3]}"
    return None


@pytest.fixture(scope="module")
def traces() -> dict[str, dict | str]:
    """Each notebook's trace from this run's nbval pass (stale ones made again here), or why there is none."""
    folder = _trace_folder()
    problems = {notebook.name: trace_problem(notebook, folder) for notebook in NOTEBOOKS}
    stale = [index for index, notebook in enumerate(NOTEBOOKS) if problems[notebook.name]]
    if stale:
        for notebook in NOTEBOOKS[stale[0]:]:  # 05 and 06 read the adapters 03 and 04 write
            reason = problems[notebook.name] or "an earlier notebook was rerun"
            print(f"memory budget: running {notebook.name} ({reason})")
            _run_traced(notebook)
            gc.collect()
    found: dict[str, dict | str] = {}
    for notebook in NOTEBOOKS:
        problem = trace_problem(notebook, folder)
        found[notebook.name] = problem or read_trace(folder / f"{notebook.stem}.json")
    complete = [trace for trace in found.values() if isinstance(trace, dict)]
    details = [notebook_peak(trace, T4).describe() for trace in complete]
    text = (f"Estimated peak GPU memory (GiB) with Phi-3-mini, from the tiny-model traces in {folder}\n\n"
            f"{budget_table(complete)}\n\nWhere each peak happens on a T4:\n" + "\n".join(details) + "\n")
    temporary = folder / ".budget.md.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, folder / "budget.md")
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_fits_phi3_mini_on_a_16_gb_t4(notebook, traces):
    trace = traces[notebook.name]
    assert isinstance(trace, dict), f"no usable memory trace: {trace}"
    assert not trace["cells_failed"], (f"code cells {trace['cells_failed']} of {notebook.name} failed (see the "
                                       "notebook's own test): its memory budget would be incomplete")
    peak = notebook_peak(trace, T4)
    assert peak.fits, f"does not fit: {peak.describe()}"
