"""Ship a trained adapter anywhere: GGUF for llama.cpp and Ollama, Llama layout, and a Hub-ready folder.

Every format is made by the tools that read it, or checked by them:

* **GGUF** files are written by llama.cpp's own converters (``convert_hf_to_gguf.py``,
  ``convert_lora_to_gguf.py`` and their ``gguf-py``), taken from the pinned, sha256-checked
  ``llama-cpp-python`` sdist that the series already fetches for the Phi-3 tokenizer.
* **Ollama**: a Modelfile whose ``TEMPLATE`` is derived from the tokenizer's own chat template (rendered
  with placeholder messages) and whose ``stop`` parameters come from the tokenizer's stop ids.
* **Llama layout**: Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; an adapter on
  the fused layers is split for a Llama-layout base (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/
  ``up_proj``) and fused back, with the same products ``B·A·scale``.
* **The Hub**: an adapter folder with a generated model card, pushed only when ``HF_TOKEN`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from utils.adapters import serving_chat_template
from utils.assets import (LLAMA_CPP_SDIST_SHA256, LLAMA_CPP_VERSION, AssetError, llama_cpp_sdist,
                          phi3_vocab_dir)
from utils.atomic import atomic_folder
from utils.convert import FUSED_PROJECTIONS, fused_widths
from utils.generation import end_of_turn_token, stop_token_ids
from utils.paths import DATA_DIR, cache_dir

EXPORT_DIR = "export"  # under outputs_dir(): every exported format (notebook 07)
LLAMA_CPP_TREE_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

LLAMA_CPP_UNSUPPORTED = ("lm_head", "embed_tokens")  # llama.cpp cannot apply LoRA there (llama.cpp#11554)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class ExportError(ValueError):
    """An adapter or model cannot be exported to the asked format; the message says what to do instead."""


# --- llama.cpp's converters, from the verified sdist ------------------------------------------------

def llama_cpp_tree() -> Path:
    """llama.cpp's Python converters and ``gguf-py`` (no C++), extracted once from the verified sdist."""
    sdist = llama_cpp_sdist()
    target = cache_dir() / f"llama.cpp-{sdist.name.removesuffix('.tar.gz')}"
    if (target / "convert_lora_to_gguf.py").is_file() and (target / "gguf-py" / "gguf").is_dir():
        return target
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with atomic_folder(target, manifest=False) as staging, tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers()
                   if member.name.startswith(prefix) and (member.isfile() or member.isdir())
                   and member.name[len(prefix):].startswith(LLAMA_CPP_TREE_MEMBERS)]
        if not any(member.name.endswith("convert_lora_to_gguf.py") for member in members):
            raise AssetError(f"{sdist}: no vendor/llama.cpp/convert_lora_to_gguf.py in the sdist")
        for member in members:
            member.name = member.name[len(prefix):]
        archive.extractall(staging, members=members, filter="data")
    return target


# Run llama.cpp's converter scripts unchanged, with the sdist's gguf-py first on sys.path, several in one
# process (importing torch and transformers is most of a small conversion's time). Phi3MiniModel.set_vocab
# reads a sentencepiece ``tokenizer.model``; the embedded models carry the same Phi-3 vocabulary as
# ``tokenizer.json`` (built from llama.cpp's ggml-vocab-phi-3.gguf) or SmolLM2's BPE tokenizer instead. For
# those, and only for the vocabulary, the shim below copies the tokenizer.ggml.* metadata that llama.cpp
# itself wrote into ggml-vocab-phi-3.gguf (from Microsoft's tokenizer.model), or takes llama.cpp's BPE path.
_CONVERTER_SHIM = r'''
import json, runpy, sys
tree, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [tree, tree + "/gguf-py"]
import gguf
from conversion import phi
original_set_vocab = phi.Phi3MiniModel.set_vocab


def vocab_setter(kind, vocab_gguf):
    def set_vocab(self):
        if kind == "bpe":
            return self._set_vocab_gpt2()
        fields = gguf.GGUFReader(vocab_gguf).fields
        self.gguf_writer.add_tokenizer_model(fields["tokenizer.ggml.model"].contents())
        if "tokenizer.ggml.pre" in fields:
            self.gguf_writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"].contents())
        self.gguf_writer.add_token_list(fields["tokenizer.ggml.tokens"].contents())
        self.gguf_writer.add_token_scores(fields["tokenizer.ggml.scores"].contents())
        self.gguf_writer.add_token_types(fields["tokenizer.ggml.token_type"].contents())
        n_vocab = len(fields["tokenizer.ggml.tokens"].contents())
        gguf.SpecialVocab(self.dir_model, n_vocab=n_vocab).add_to_gguf(self.gguf_writer)
    return original_set_vocab if kind == "sentencepiece" else set_vocab


for script, arguments, kind, vocab_gguf in jobs:
    phi.Phi3MiniModel.set_vocab = vocab_setter(kind, vocab_gguf)
    sys.argv = [script] + arguments
    try:
        runpy.run_path(tree + "/" + script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
'''


@dataclass(frozen=True)
class ConversionJob:
    """One run of a llama.cpp converter script: its arguments and how it gets the model's vocabulary."""

    script: str
    arguments: list[str]
    vocab_kind: str = "sentencepiece"
    vocab_gguf: str = ""


def run_converters(jobs: list[ConversionJob]) -> str:
    """Run llama.cpp's converter scripts in one fresh Python; returns their log, raises with it on failure."""
    payload = json.dumps([[job.script, job.arguments, job.vocab_kind, job.vocab_gguf] for job in jobs])
    command = [sys.executable, "-c", _CONVERTER_SHIM, str(llama_cpp_tree()), payload]
    environment = {**os.environ, "NO_LOCAL_GGUF": "1"}  # the shim puts the sdist's gguf-py on sys.path itself
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        scripts = ", ".join(sorted({job.script for job in jobs}))
        raise ExportError(f"llama.cpp's {scripts} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result.stderr


def _vocab_route(model_dir: Path) -> tuple[str, Path | None]:
    """How llama.cpp gets this model's vocabulary: its tokenizer.model, the Phi-3 vocab GGUF, or the BPE path."""
    from gguf import GGUFReader  # PyPI's gguf (pinned); the converters use the sdist's own copy in a subprocess

    if (model_dir / "tokenizer.model").is_file():
        return "sentencepiece", None
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if (tokenizer.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        return "bpe", None  # SmolLM2's byte-level BPE: llama.cpp's own GPT-2 path
    vocab_gguf = phi3_vocab_dir() / "ggml-vocab-phi-3.gguf"
    tokens = GGUFReader(str(vocab_gguf)).fields["tokenizer.ggml.tokens"].contents()
    vocab = {**tokenizer["model"]["vocab"], **{item["content"]: item["id"] for item in tokenizer["added_tokens"]}}
    if len(vocab) != len(tokens) or any(vocab.get(token) != index for index, token in enumerate(tokens)):
        raise ExportError(f"{model_dir}: no tokenizer.model, and its tokenizer.json is not Phi-3's vocabulary, so "
                          f"llama.cpp's converter has no vocabulary to write. Copy the model's tokenizer.model there.")
    return "phi3-vocab", vocab_gguf  # the same 32064 tokens, as llama.cpp wrote them from Phi-3's tokenizer.model


def _atomic_file(target: Path) -> Path:
    """A temporary path beside ``target`` (rename it into place when complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def model_gguf_job(model_dir: str | Path, outfile: str | Path, outtype: str = "f16") -> ConversionJob:
    """The ``convert_hf_to_gguf.py`` run that writes a Hugging Face model folder (base or merged) as GGUF."""
    kind, vocab = _vocab_route(Path(model_dir))
    arguments = [str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    # llama.cpp gives Phi-3's special tokens their whitespace handling only when general.name contains "phi3"
    # (llama-vocab.cpp), and then expects Phi-3's "</s>": name a Phi-3 vocabulary so, and no other.
    name = re.sub(r"[-_]?phi-?3", "", Path(model_dir).name, flags=re.I) or "model"
    arguments += ["--model-name", name if kind == "bpe" else f"{name}-phi3"]
    return ConversionJob("convert_hf_to_gguf.py", arguments, kind, str(vocab or ""))


def model_to_gguf(model_dir: str | Path, outfile: str | Path, outtype: str = "f16") -> Path:
    """Convert a Hugging Face model folder (base or merged) to GGUF with llama.cpp's ``convert_hf_to_gguf.py``."""
    return write_ggufs({Path(outfile): model_gguf_job(model_dir, _atomic_file(Path(outfile)), outtype)})[0]


def write_ggufs(jobs: Mapping[Path, ConversionJob]) -> list[Path]:
    """Run the conversions (each writing a temporary file) in one process, then rename each into place."""
    run_converters(list(jobs.values()))
    for target, job in jobs.items():
        os.replace(job.arguments[job.arguments.index("--outfile") + 1], target)
    return list(jobs)


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT adapter folder's config and tensors (safetensors only)."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: expected a PEFT adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    return json.loads(config_path.read_text(encoding="utf-8")), load_file(str(weights_path))


def _targets(config: Mapping[str, Any]) -> list[str]:
    """The adapter's ``target_modules`` as a list; a regex string cannot be rewritten safely."""
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise ExportError(f"target_modules is the pattern {targets!r}: list the module names to export it.")
    return list(targets)


def llama_cpp_blockers(config: Mapping[str, Any], tensors: Iterable[str]) -> list[str]:
    """The modules of an adapter that llama.cpp cannot apply LoRA to (``lm_head``, ``embed_tokens``)."""
    named = set(_targets(config)) | set(config.get("modules_to_save") or [])
    named |= {name.split(".")[-3] if ".lora_" in name else name for name in tensors}
    if config.get("trainable_token_indices"):
        named.add("embed_tokens")
    return sorted(module for module in LLAMA_CPP_UNSUPPORTED if any(module in name for name in named))


def check_llama_cpp_adapter(folder: str | Path) -> None:
    """Refuse, with what to do instead, an adapter that llama.cpp cannot load."""
    config, tensors = read_adapter(folder)
    blockers = llama_cpp_blockers(config, tensors)
    if blockers:
        raise ExportError(
            f"{folder}: the adapter has LoRA (or saved modules) on {', '.join(blockers)}. llama.cpp cannot apply "
            f"an adapter there (llama.cpp issue 11554). Either retrain without them (target_modules without "
            f"{' / '.join(blockers)}, modules_to_save=None), or merge the adapter into the base (notebook 06) "
            f"and export the merged model with model_to_gguf()."
        )


def adapter_scales(config: Mapping[str, Any], module_names: Iterable[str]) -> dict[str, tuple[int, float]]:
    """PEFT's (rank, scale) per adapted module, with ``rank_pattern`` / ``alpha_pattern`` and rsLoRA applied."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def pattern_value(pattern: Mapping[str, Any], name: str, default: float) -> float:
        for key, value in pattern.items():  # PEFT matches a key as a suffix of the module name
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    scales = {}
    for name in module_names:
        r = int(pattern_value(rank_pattern, name, rank))
        a = float(pattern_value(alpha_pattern, name, alpha))
        scales[name] = (r, a / (r ** 0.5 if config.get("use_rslora") else r))
    return scales


def _lora_modules(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names (``base_model.model.`` removed) that carry a ``lora_A`` tensor."""
    return sorted(name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                  for name in tensors if name.endswith(".lora_A.weight"))


def _write_adapter(folder: Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   extra_files: Iterable[Path] = ()) -> Path:
    """Write a PEFT adapter folder atomically (staging folder, then rename)."""
    with atomic_folder(folder, manifest=False) as staging:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(staging / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in extra_files:
            shutil.copy2(path, staging / path.name)
    return folder


def llama_cpp_ready_adapter(folder: str | Path, out_dir: str | Path) -> Path:
    """The adapter with one global ``lora_alpha`` (what llama.cpp reads): per-module scales folded into B.

    ``convert_lora_to_gguf.py`` writes a single ``adapter.lora.alpha`` and llama.cpp scales each tensor by
    ``alpha / rank`` (rank read from the tensor's shape, so ``rank_pattern`` is fine); an adapter with
    ``alpha_pattern`` or rsLoRA would be scaled wrongly.
    """
    config, tensors = read_adapter(folder)
    scales = adapter_scales(config, _lora_modules(tensors))
    alpha = float(config["lora_alpha"])
    fixed = dict(tensors)
    for name, (rank, scale) in scales.items():
        key = f"base_model.model.{name}.lora_B.weight"
        fixed[key] = tensors[key] * (scale / (alpha / rank))
    new_config = {**config, "alpha_pattern": {}, "use_rslora": False}
    return _write_adapter(Path(out_dir), new_config, fixed)


def adapter_gguf_job(adapter_dir: str | Path, base_dir: str | Path, outfile: str | Path, outtype: str = "f16",
                     scratch: Path | None = None) -> ConversionJob:
    """The ``convert_lora_to_gguf.py`` run for a PEFT adapter, after refusing what llama.cpp cannot load.

    An adapter with per-module alphas (``alpha_pattern``, rsLoRA) is first rewritten into ``scratch`` with
    the scales folded into B, since llama.cpp reads one alpha.
    """
    adapter_dir = Path(adapter_dir)
    check_llama_cpp_adapter(adapter_dir)
    config, _ = read_adapter(adapter_dir)
    if config.get("alpha_pattern") or config.get("use_rslora"):
        if scratch is None:
            raise ExportError(f"{adapter_dir}: per-module scales need a scratch folder to fold them into B.")
        adapter_dir = llama_cpp_ready_adapter(adapter_dir, scratch / f"{adapter_dir.name}-one-alpha")
    return ConversionJob("convert_lora_to_gguf.py",
                         [str(adapter_dir), "--base", str(base_dir), "--outfile", str(outfile), "--outtype", outtype])


def adapter_to_gguf(adapter_dir: str | Path, base_dir: str | Path, outfile: str | Path,
                    outtype: str = "f16") -> Path:
    """Convert a PEFT LoRA adapter to a GGUF adapter with llama.cpp's ``convert_lora_to_gguf.py``."""
    outfile = Path(outfile)
    with tempfile.TemporaryDirectory(prefix="gguf-adapter-") as scratch:
        job = adapter_gguf_job(adapter_dir, base_dir, _atomic_file(outfile), outtype, Path(scratch))
        return write_ggufs({outfile: job})[0]


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """What a GGUF file says about itself, read with ``gguf.GGUFReader``: type, architecture, alpha, tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str) -> Any:
        return reader.fields[name].contents() if name in reader.fields else None

    return {
        "file": str(path),
        "type": field("general.type"),
        "architecture": field("general.architecture"),
        "lora_alpha": field("adapter.lora.alpha"),
        "file_type": field("general.file_type"),
        "tensors": {tensor.name: (tuple(int(n) for n in tensor.shape), tensor.tensor_type.name)
                    for tensor in reader.tensors},
    }


# --- Llama layout: split and fuse ---------------------------------------------------------------------

def _renamed_targets(targets: list[str], mapping: Mapping[str, tuple[str, ...]]) -> list[str]:
    """``target_modules`` with each key of ``mapping`` replaced by its parts (order kept, no duplicates)."""
    renamed: list[str] = []
    for target in targets:
        for name in mapping.get(target, (target,)):
            if name not in renamed:
                renamed.append(name)
    return renamed


def split_fused_adapter(adapter_dir: str | Path, out_dir: str | Path, base_config: Any,
                        base_model_name_or_path: str | None = None) -> Path:
    """Split a Phi-3 adapter for a Llama-layout base: ``qkv_proj`` -> q/k/v, ``gate_up_proj`` -> gate/up.

    A fused layer computes ``[q; k; v] = (W + s·B·A) x``: each part uses the same ``A`` (copied) and its own
    rows of ``B`` (split), so rank, alpha and every product ``B_part·A`` are exactly those of the fused adapter.
    """
    config, tensors = read_adapter(adapter_dir)
    widths = fused_widths(base_config)
    split: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        fused = next((f for f in FUSED_PROJECTIONS if f".{f}.lora_" in name), None)
        if fused is None:
            split[name] = tensor
            continue
        parts = FUSED_PROJECTIONS[fused]
        if ".lora_A." in name:
            for part in parts:
                split[name.replace(f".{fused}.", f".{part}.")] = tensor.clone()
        else:
            if tensor.shape[0] != sum(widths[fused]):
                raise ExportError(f"{adapter_dir}: {name} has {tensor.shape[0]} rows, but the base config says "
                                  f"{fused} has {sum(widths[fused])} ({' + '.join(map(str, widths[fused]))}).")
            for part, rows in zip(parts, tensor.split(list(widths[fused]), dim=0)):
                split[name.replace(f".{fused}.", f".{part}.")] = rows.clone()
    new_config = dict(config)
    new_config["target_modules"] = _renamed_targets(_targets(config), FUSED_PROJECTIONS)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        new_config[key] = {re.sub(rf"{fused}$", part, name): value for name, value in pattern.items()
                           for fused in FUSED_PROJECTIONS if name.endswith(fused) for part in FUSED_PROJECTIONS[fused]}
        new_config[key].update({name: value for name, value in pattern.items()
                                if not name.endswith(tuple(FUSED_PROJECTIONS))})
    if base_model_name_or_path is not None:
        new_config["base_model_name_or_path"] = base_model_name_or_path
    return _write_adapter(Path(out_dir), new_config, split)


@dataclass(frozen=True)
class FuseReport:
    """What fusing a Llama-layout adapter did: modules whose A's were shared (rank kept) or stacked (rank grew)."""

    folder: Path
    shared_rank: list[str]
    grown_rank: dict[str, int]  # fused module -> its new rank

    def __str__(self) -> str:
        """One line per outcome, for the notebook."""
        lines = [f"{self.folder}: {len(self.shared_rank)} fused modules kept their rank (the parts shared A)"]
        if self.grown_rank:
            ranks = sorted(set(self.grown_rank.values()))
            lines.append(f"{len(self.grown_rank)} fused modules stacked their parts' A's: rank grew to "
                         f"{ranks} (rank_pattern/alpha_pattern keep each scale; the product is exact)")
        return "\n".join(lines)


def fuse_llama_adapter(adapter_dir: str | Path, out_dir: str | Path, base_config: Any,
                       base_model_name_or_path: str | None = None) -> FuseReport:
    """Fuse a Llama-layout adapter for Phi-3's layout: q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``.

    Where the parts share ``A`` and scale (an adapter split from a fused one), ``A`` is kept and the ``B``'s
    are stacked: the exact original. Otherwise the ``A``'s are stacked (rank ``r_q + r_k + r_v``) and ``B``
    becomes block-diagonal, so ``B·A`` is still exactly ``[B_q·A_q; B_k·A_k; B_v·A_v]``; the fused rank grows,
    and ``rank_pattern``/``alpha_pattern`` keep the scale. A part without an adapter gets zero rows of ``B``.
    """
    config, tensors = read_adapter(adapter_dir)
    widths = fused_widths(base_config)
    modules = _lora_modules(tensors)
    scales = adapter_scales(config, modules)
    part_of = {part: (fused, index) for fused, parts in FUSED_PROJECTIONS.items() for index, part in enumerate(parts)}
    groups: dict[str, dict[int, str]] = {}  # fused module name -> {part index: part module name}
    fused_tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        leaf = module.rsplit(".", 1)[-1]
        if leaf in part_of:
            fused, index = part_of[leaf]
            groups.setdefault(f"{module.rsplit('.', 1)[0]}.{fused}", {})[index] = module
        else:
            for kind in ("lora_A", "lora_B"):
                key = f"base_model.model.{module}.{kind}.weight"
                fused_tensors[key] = tensors[key]
    rank_pattern = {k: v for k, v in (config.get("rank_pattern") or {}).items() if k.rsplit(".", 1)[-1] not in part_of}
    alpha_pattern = {k: v for k, v in (config.get("alpha_pattern") or {}).items()
                     if k.rsplit(".", 1)[-1] not in part_of}
    default_scale = adapter_scales({**config, "rank_pattern": {}, "alpha_pattern": {}}, ["x"])["x"][1]
    shared, grown = [], {}
    for fused_module, parts in sorted(groups.items()):
        fused = fused_module.rsplit(".", 1)[-1]
        row_widths = widths[fused]
        a = {i: tensors[f"base_model.model.{m}.lora_A.weight"] for i, m in parts.items()}
        b = {i: tensors[f"base_model.model.{m}.lora_B.weight"] for i, m in parts.items()}
        scale = {i: scales[m][1] for i, m in parts.items()}
        first = min(parts)
        for i, rows in b.items():
            if rows.shape[0] != row_widths[i]:
                raise ExportError(f"{adapter_dir}: {parts[i]} has {rows.shape[0]} rows of B, the base config says "
                                  f"{row_widths[i]}.")
        dtype = a[first].dtype
        if all(torch.equal(a[i], a[first]) for i in a):  # one shared A: stack the B's, rank unchanged
            rank = a[first].shape[0]
            stacked_a = a[first]
            blocks = [b[i] * (scale[i] / scale[first]) if i in b else torch.zeros(width, rank, dtype=dtype)
                      for i, width in enumerate(row_widths)]
            stacked_b = torch.cat(blocks, dim=0)
            shared.append(fused_module)
        else:  # different A's: stack them, block-diagonal B (the rank grows to the sum of the parts' ranks)
            stacked_a = torch.cat([a[i] for i in sorted(a)], dim=0)
            rank = stacked_a.shape[0]
            stacked_b = torch.zeros(sum(row_widths), rank, dtype=b[first].dtype)
            row, column = 0, 0
            for i, width in enumerate(row_widths):
                if i in b:
                    r = a[i].shape[0]
                    stacked_b[row:row + width, column:column + r] = b[i] * (scale[i] / scale[first])
                    column += r
                row += width
            grown[fused_module] = rank
        if rank != int(config["r"]) or scale[first] != default_scale:
            rank_pattern[fused_module] = rank
            alpha_pattern[fused_module] = scale[first] * (rank ** 0.5 if config.get("use_rslora") else rank)
        fused_tensors[f"base_model.model.{fused_module}.lora_A.weight"] = stacked_a
        fused_tensors[f"base_model.model.{fused_module}.lora_B.weight"] = stacked_b
    inverse = {part: (fused,) for fused, parts in FUSED_PROJECTIONS.items() for part in parts}
    new_config = dict(config)
    new_config["target_modules"] = _renamed_targets(_targets(config), inverse)
    new_config["rank_pattern"], new_config["alpha_pattern"] = rank_pattern, alpha_pattern
    if base_model_name_or_path is not None:
        new_config["base_model_name_or_path"] = base_model_name_or_path
    folder = _write_adapter(Path(out_dir), new_config, fused_tensors)
    return FuseReport(folder, shared, grown)


# --- building the llama_cpp binding (make llama-cpp) ---------------------------------------------------

# A CPU-only build of the library and the binding: no examples, tests, tools, server or multimodal (llava/mtmd).
LLAMA_CPP_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "
                        "-DLLAMA_BUILD_TOOLS=OFF -DGGML_BUILD_EXAMPLES=OFF -DGGML_BUILD_TESTS=OFF")
WHEELS_ENV_VAR = "PHI3_LORA_WHEELS"  # where the built wheel is kept (outside the repo, so fresh clones reuse it)


def wheel_cache() -> Path:
    """Folder for wheels built here: ``$PHI3_LORA_WHEELS``, else ``~/.cache/phi3-lora-course/wheels``."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi3-lora-course" / "wheels"
    return Path(os.environ.get(WHEELS_ENV_VAR) or default)


def _cpu_key() -> str:
    """The machine and its CPU features (the build uses -march=native), as a short key."""
    flags = ""
    if Path("/proc/cpuinfo").is_file():
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def build_llama_cpp(python: str = sys.executable) -> str:
    """Install the ``llama_cpp`` binding from the verified sdist: built once per CPU, then from the kept wheel."""
    import importlib.metadata

    try:
        if importlib.metadata.version("llama_cpp_python") == LLAMA_CPP_VERSION:
            return f"llama-cpp-python {LLAMA_CPP_VERSION} is already installed"
    except importlib.metadata.PackageNotFoundError:
        pass
    folder = wheel_cache() / f"llama_cpp_python-{LLAMA_CPP_VERSION}-{LLAMA_CPP_SDIST_SHA256[:12]}-{_cpu_key()}"
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    note = f"installed the wheel built earlier ({folder})"
    if not wheels:
        sdist = llama_cpp_sdist()
        environment = {**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS,
                       "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        print(f"Building llama-cpp-python {LLAMA_CPP_VERSION} from {sdist} (CPU only, "
              f"{environment['CMAKE_BUILD_PARALLEL_LEVEL']} jobs; about 18 minutes on 2 cores, once)", flush=True)
        start = time.perf_counter()
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder, manifest=False) as staging:
            subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(staging), str(sdist)],
                           check=True, env=environment)
            seconds = time.perf_counter() - start
            (staging / "build.json").write_text(json.dumps(
                {"seconds": round(seconds, 1), "cpus": os.cpu_count(), "cmake_args": LLAMA_CPP_CMAKE_ARGS}) + "\n")
        wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
        note = f"built in {seconds / 60:.1f} minutes on {os.cpu_count()} CPUs; wheel kept in {folder}"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheels[-1])], check=True)
    return f"llama-cpp-python {LLAMA_CPP_VERSION}: {note}"


def main(argv: list[str] | None = None) -> int:
    """``python -m utils.export build-llama-cpp`` (what ``make llama-cpp`` runs)."""
    import argparse

    parser = argparse.ArgumentParser(description="Export tools of the Phi-3 LoRA course.")
    parser.add_argument("command", choices=["build-llama-cpp"])
    parser.parse_args(argv)
    print(build_llama_cpp())
    return 0


# --- llama.cpp itself: logits from the built binding --------------------------------------------------

# Largest logit difference llama.cpp vs transformers (fp32), relative to the largest logit, by GGUF type of the
# base model. Measured 2026-11-30 (relative): f16 5.8e-4 (tiny) and 1.5e-3 to 2.0e-3 (smol, three test prompts);
# q8_0 9e-3 to 1.3e-2 (tiny), 3.5e-2 to 4.6e-2 with the adapter and 6.9e-2 without it (smol). Each tolerance is
# about 2.5x the largest value measured.
GGUF_TOLERANCE = {"f16": 5e-3, "q8_0": 1.5e-1}


def llama_cpp_available() -> bool:
    """True when the ``llama_cpp`` binding is importable (``make llama-cpp`` builds it from the pinned sdist)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_logits(model_gguf: str | Path, token_ids: list[int], lora_gguf: str | Path | None = None,
                     threads: int = 1) -> torch.Tensor:
    """llama.cpp's logits for every position of ``token_ids`` (no tokenizing: the same ids as transformers)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_gguf), lora_path=str(lora_gguf) if lora_gguf else None, n_ctx=max(64, len(token_ids)),
                n_batch=max(64, len(token_ids)), logits_all=True, n_threads=threads, n_threads_batch=threads,
                verbose=False, seed=0)
    try:
        llm.eval(list(token_ids))
        return torch.from_numpy(llm.scores[:len(token_ids)].copy())
    finally:
        llm.close()


def relative_difference(got: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, the same relative to the reference's largest absolute logit)."""
    largest = float((got.float() - reference.float()).abs().max())
    return largest, largest / float(reference.float().abs().max())


# --- Ollama ---------------------------------------------------------------------------------------------

_PLACEHOLDERS = {"system": "\u2063SYSTEM\u2063", "user": "\u2063USER\u2063", "assistant": "\u2063ASSISTANT\u2063",
                 "user2": "\u2063USER2\u2063"}


@dataclass(frozen=True)
class TurnFormat:
    """The text a chat template writes around each role's content, read off the template itself."""

    default_system: str  # written when the conversation has no system turn ("" for Phi-3)
    prefix: dict[str, str]  # role -> text before its content
    suffix: dict[str, str]  # role -> text after its content (end-of-turn token and newline)
    generation_prompt: str  # what opens the assistant's reply


def turn_format(tokenizer: Any) -> TurnFormat:
    """Render the tokenizer's chat template with placeholder messages and read off each role's wrapping text."""
    template = serving_chat_template(tokenizer.chat_template)
    p = _PLACEHOLDERS
    end = end_of_turn_token(tokenizer)
    if end is None:
        raise ExportError("The chat template ends an assistant turn with no special token: cannot derive stops.")

    def render(messages: list[tuple[str, str]]) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)

    full = render([("system", p["system"]), ("user", p["user"]), ("assistant", p["assistant"]), ("user", p["user2"])])
    order = [p["system"], p["user"], p["assistant"], p["user2"]]
    missing = [role for role, mark in zip(("system", "user", "assistant", "second user"), order) if mark not in full]
    if missing:
        raise ExportError(f"The chat template drops the {', '.join(missing)} turn(s) of a conversation, so no Ollama "
                          "TEMPLATE can be derived from it: use the model's current template (system turn included).")
    cuts = [full.index(mark) for mark in order]
    gaps = [full[cuts[i] + len(order[i]):cuts[i + 1]] for i in range(3)] + [full[cuts[3] + len(p["user2"]):]]

    def split_gap(gap: str) -> tuple[str, str]:
        if not gap.startswith(end):
            raise ExportError(f"The chat template writes {gap[:20]!r} after a turn, not the end-of-turn token {end!r}.")
        after = len(end) + (len(gap) - len(end) - len(gap[len(end):].lstrip()))
        return gap[:after], gap[after:]

    (system_suffix, user_prefix), (user_suffix, assistant_prefix) = split_gap(gaps[0]), split_gap(gaps[1])
    assistant_suffix, user_prefix_again = split_gap(gaps[2])
    _, generation_prompt = split_gap(gaps[3])
    if user_prefix_again != user_prefix:
        raise ExportError("The chat template wraps the first and later user turns differently: write TEMPLATE by hand.")
    alone = render([("user", p["user"])])
    default_system = alone[:alone.index(user_prefix + p["user"])]
    system_prefix = full[:cuts[0]]
    return TurnFormat(default_system, {"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
                      {"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
                      generation_prompt)


def _go_literal(text: str) -> str:
    """Text for a Go template: ``{{`` would open an action, so it is written as a string action."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(tokenizer: Any) -> str:
    """Ollama's Go ``TEMPLATE`` (over ``.Messages``, system turn included) derived from the chat template."""
    f = turn_format(tokenizer)
    go = _go_literal
    default = ""
    if f.default_system:
        default = ('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                   f"{go(f.default_system)}{{{{ end }}}}")
    return (
        default
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + f'{{{{ if eq .Role "system" }}}}{go(f.prefix["system"])}{{{{ .Content }}}}{go(f.suffix["system"])}'
        + f'{{{{ else if eq .Role "user" }}}}{go(f.prefix["user"])}{{{{ .Content }}}}{go(f.suffix["user"])}'
        + f'{{{{ else if eq .Role "assistant" }}}}{go(f.prefix["assistant"])}{{{{ .Content }}}}'
        + f'{{{{ if not $last }}}}{go(f.suffix["assistant"])}{{{{ end }}}}{{{{ end }}}}'
        + f'{{{{ if and $last (ne .Role "assistant") }}}}{go(f.generation_prompt)}{{{{ end }}}}{{{{ end }}}}'
    )


def ollama_modelfile(tokenizer: Any, base_gguf: str, adapter_gguf: str | None = None, system: str | None = None,
                     model: Any | None = None) -> str:
    """An Ollama Modelfile: the base GGUF, the adapter GGUF, the derived TEMPLATE and the stop tokens."""
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, model))
    stops.sort(key=lambda token: token != end_of_turn_token(tokenizer))  # end of turn first, then end of text
    template = ollama_template(tokenizer)
    if '"""' in template or (system and '"""' in system):
        raise ExportError('The TEMPLATE or SYSTEM text contains """, which a Modelfile cannot quote.')
    lines = [f"FROM {base_gguf}"]
    if adapter_gguf:
        lines.append(f"ADAPTER {adapter_gguf}")
    lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


MODELFILE_COMMANDS = ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "MESSAGE", "LICENSE", "REQUIRES")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Parse a Modelfile as Ollama's parser does (command, then a word, a "quoted" or \"\"\"multi-line\"\"\" value)."""
    commands: list[tuple[str, str]] = []
    position = 0
    pattern = re.compile(r'[ \t]*(?:#[^\n]*|(\w+)[ \t]+("""(.*?)"""|"((?:[^"\\\n]|\\.)*)"|([^\n]*)))?[ \t]*(?:\n|$)',
                         re.S)
    while position < len(text):
        match = pattern.match(text, position)
        if match is None or match.end() == position:
            line = text[:position].count("\n") + 1
            raise ExportError(f"Modelfile line {line}: cannot parse {text[position:position + 40]!r}")
        position = match.end()
        command = match.group(1)
        if command is None:
            continue
        if command.upper() not in MODELFILE_COMMANDS:
            raise ExportError(f"Modelfile: unknown command {command!r} (valid: {', '.join(MODELFILE_COMMANDS)})")
        if match.group(3) is not None:
            value = match.group(3)
        elif match.group(4) is not None:
            value = json.loads(f'"{match.group(4)}"')
        else:
            value = match.group(5).strip()
        commands.append((command.upper(), value))
    return commands


# --- what the notebook needs around the formats -----------------------------------------------------

TRAINING_FIELDS = ("steps", "max_length", "profile", "tokens", "seconds", "eval_loss_before", "eval_loss_after")


def local_model_dir(source: str) -> Path:
    """A local folder for a model: the folder itself, or the Hub snapshot (config, tokenizer, weights)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))


def model_revision(model_dir: Path) -> str:
    """The base model's revision: the Hub commit of a snapshot, else the sha256 of its first weights file."""
    if model_dir.parent.name == "snapshots":
        return model_dir.name  # huggingface_hub names a snapshot folder after its commit
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        return "unknown"
    digest = hashlib.sha256()
    with open(weights[0], "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"local build, {weights[0].name} sha256 {digest.hexdigest()[:16]}"


def training_summary(adapter_dir: Path) -> dict[str, Any]:
    """The training run's settings and results that 03 saved beside the adapter (``training_metrics.json``)."""
    path = Path(adapter_dir) / "training_metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text(encoding="utf-8"))
    return {key: metrics[key] for key in TRAINING_FIELDS if key in metrics}


# --- the Hub ------------------------------------------------------------------------------------------

def data_licence(datasheet: Path = DATA_DIR / "README.md") -> str:
    """The course data set's licence, read from its datasheet's "Licence" section."""
    text = datasheet.read_text(encoding="utf-8")
    section = text.split("## Licence", 1)[-1]
    match = re.search(r"\*\*([^*]+)\*\*", section)
    if match is None:
        raise ExportError(f"{datasheet}: no **licence** in its Licence section.")
    return match.group(1).strip()


def model_card(adapter_dir: Path, base_model: str, base_revision: str, training: Mapping[str, Any],
               metrics: Mapping[str, Any] | None, repo_id: str) -> str:
    """A Hub model card for the adapter: base model, data and licence, training config, metrics, use, limits."""
    config, _ = read_adapter(adapter_dir)
    licence = data_licence()
    lora = {key: config.get(key) for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")}
    train_rows = "\n".join(f"| {key} | {value} |" for key, value in training.items())
    lora_rows = "\n".join(f"| {key} | {value} |" for key, value in lora.items())
    if metrics:
        metric_rows = "\n".join(f"| {name} | {values.get('loss', float('nan')):.4f} | "
                                f"{values.get('perplexity', float('nan')):.2f} |"
                                for name, values in metrics.get("loss", {}).items())
        metric_text = ("Held-out loss on the assistant's tokens of the test split (notebook 05):\n\n"
                       f"| model | loss | perplexity |\n|---|---|---|\n{metric_rows}\n")
        if metrics.get("test_split", {}).get("smoke"):
            metric_text += "\nThese come from a smoke run (a few conversations, tiny model): not a result.\n"
    else:
        metric_text = "Not evaluated yet: run notebook 05 before exporting to include its metrics.\n"
    front = {"base_model": base_model, "library_name": "peft", "license": licence.lower(),
             "tags": ["lora", "peft", "phi3", "kitchen-coach"], "pipeline_tag": "text-generation"}
    front_matter = "\n".join(f"{key}: {json.dumps(value)}" for key, value in front.items())
    return f"""---
{front_matter}
---

# {repo_id}

A LoRA adapter for **{base_model}** (revision `{base_revision}`), trained by the Phi-3 LoRA course (notebook 03)
on its *Kitchen Coach* conversations: every answer starts with `In short: ` and ends with `Tip: `.

## Base model

`{base_model}`, revision `{base_revision}`. Load the adapter on exactly this base and layout (Phi-3's fused
`qkv_proj` / `gate_up_proj`); a Llama-layout Phi-3 needs the split adapter (`utils.export.split_fused_adapter`).

## Data

The course's *Kitchen Coach* data set (train split), licence **{licence}**; its datasheet is `data/README.md` in
the course repository.

## Training

| LoRA setting | value |
|---|---|
{lora_rows}

| training | value |
|---|---|
{train_rows}

## Evaluation

{metric_text}
## How to load it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_model}", revision="{base_revision}")
model = PeftModel.from_pretrained(base, "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")  # the tokenizer and chat template it was trained with
```

Stop generation at `<|end|>` as well as `<|endoftext|>` (the tokenizer's end-of-turn and eos tokens).

## Intended use and limits

- For learning and demonstrating LoRA fine-tuning: a small house-style cooking assistant.
- Not for food-safety, medical or allergy advice: the data set is small and was written for teaching; answers can
  be wrong or out of date. It inherits the base model's biases and limits.
- English only; conversations up to about 1,000 tokens were seen in training.
"""


def hub_folder(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str, base_revision: str,
               training: Mapping[str, Any], metrics: Mapping[str, Any] | None, repo_id: str) -> Path:
    """An adapter folder ready for ``upload_folder``: adapter, tokenizer and chat template, and the model card."""
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir)
    config = {**config, "base_model_name_or_path": base_model, "revision": base_revision}
    keep = [adapter_dir / name for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                            "special_tokens_map.json", "tokenizer.model")
            if (adapter_dir / name).is_file()]
    folder = _write_adapter(Path(out_dir) / ".building", config, tensors, keep)
    (folder / "README.md").write_text(model_card(adapter_dir, base_model, base_revision, training, metrics, repo_id),
                                      encoding="utf-8")
    target = Path(out_dir)
    if target.exists():
        shutil.rmtree(target / ".previous", ignore_errors=True)
    final = target / "adapter"
    if final.exists():
        final.rename(target / ".previous")
    folder.rename(final)
    shutil.rmtree(target / ".previous", ignore_errors=True)
    return final


def push_adapter(folder: str | Path, repo_id: str, token: str | None = None,
                 private: bool = True) -> list[tuple[str, int]]:
    """Upload the folder with ``huggingface_hub`` when a token is given; always return (file, bytes) uploaded.

    Without a token nothing touches the network: the list is exactly what would be uploaded.
    """
    folder = Path(folder)
    files = [(str(path.relative_to(folder)), path.stat().st_size) for path in sorted(folder.rglob("*"))
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    if token:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=[name for name, _ in files])
    return files


if __name__ == "__main__":
    raise SystemExit(main())
