"""Shared machinery for the Phi-3-mini LoRA / QLoRA notebook series.

Import the submodule you need (``from utils.models import load_model_and_tokenizer``); CONTRIBUTING.md's
"Layout" says which module holds what. Importing this package has no side effects: no seeding, no
downloads, no global flags.
"""
