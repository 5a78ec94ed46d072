"""Draft checkpoints (config.json + model.safetensors) and the target's frozen embedding / LM head.

Weights are read from safetensors only; a directory holding only pickle-based weights is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, PretrainedConfig

from .config import FlashConfig
from .modeling import FlashDraft

WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(ValueError):
    """A draft or target checkpoint that cannot be used; the message names the file or tensor."""


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same directory, then rename: a crash leaves the old file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_draft(draft: FlashDraft, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in draft.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config_text = draft.config.to_json_string()
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(config_text))
    return out


def check_draft_dir(draft_dir: str | Path) -> None:
    """Refuse a draft directory before anything is loaded: missing files, or pickle-only weights."""
    path = Path(draft_dir)
    if not path.is_dir():
        raise CheckpointError(f"FLASH draft directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"FLASH draft directory {path} has no config.json")
    if not (path / WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"FLASH draft directory {path} has pickle-based weights {pickles} but no {WEIGHTS_NAME}; "
                "vllm-flash loads safetensors only (convert the weights, do not load pickles)")
        raise CheckpointError(f"FLASH draft directory {path} has no {WEIGHTS_NAME}")


def load_draft_config(draft_dir: str | Path) -> FlashConfig:
    check_draft_dir(draft_dir)
    raw = json.loads((Path(draft_dir) / "config.json").read_text())
    if raw.get("model_type") != FlashConfig.model_type:
        raise CheckpointError(
            f"{Path(draft_dir) / 'config.json'} has model_type={raw.get('model_type')!r}, "
            f"expected {FlashConfig.model_type!r} (is this a FLASH draft?)")
    return FlashConfig.from_pretrained(str(draft_dir))


def check_draft_state(expected: dict[str, torch.Tensor], found: dict[str, tuple[int, ...]],
                      where: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected; one error names all problems."""
    problems = []
    for name, tensor in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name} (expected shape {tuple(tensor.shape)})")
        elif tuple(found[name]) != tuple(tensor.shape):
            problems.append(f"tensor {name} has shape {tuple(found[name])}, expected {tuple(tensor.shape)}")
    problems += [f"unexpected tensor {name}" for name in sorted(set(found) - set(expected))]
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{where}: tensor {name} contains NaN or inf values")


def load_draft(draft_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> FlashDraft:
    """The draft without its target head; call `attach_target_head` (or `load_target_head`) next."""
    config = load_draft_config(draft_dir)
    draft = FlashDraft(config)
    path = Path(draft_dir) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        check_draft_state(draft.state_dict(), shapes, str(path))
        state = {name: f.get_tensor(name) for name in f.keys()}
    for name, tensor in state.items():
        check_finite(name, tensor, str(path))
    draft.load_state_dict(state)
    return draft.to(device=device, dtype=dtype) if dtype else draft.to(device)


# ---------------------------------------------------------------------------------------------------------
# The target's embedding and LM head
# ---------------------------------------------------------------------------------------------------------
def load_target_config(target_dir: str | Path) -> PretrainedConfig:
    if not (Path(target_dir) / "config.json").is_file():
        raise CheckpointError(f"target directory {target_dir} has no config.json")
    return AutoConfig.from_pretrained(str(target_dir), trust_remote_code=False)


def _target_tensor_index(target_dir: Path) -> dict[str, Path]:
    files = sorted(target_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"target directory {target_dir} has no *.safetensors weights")
    index = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            index.update({name: file for name in f.keys()})
    return index


def _pick(index: dict[str, Path], suffix: str) -> str | None:
    # The language model's tensor, not a vision tower's (which has no such suffix in supported targets).
    names = sorted((n for n in index if n.endswith(suffix) and "vision" not in n and "visual" not in n), key=len)
    return names[0] if names else None


def load_target_head(target_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding weight, LM head weight) of a target LMM, read from its safetensors files."""
    target_dir = Path(target_dir)
    index = _target_tensor_index(target_dir)
    embed_name = _pick(index, "embed_tokens.weight")
    if embed_name is None:
        raise CheckpointError(f"target {target_dir}: no '*embed_tokens.weight' tensor found")
    head_name = _pick(index, "lm_head.weight") or embed_name  # tied word embeddings
    out = []
    for name in (embed_name, head_name):
        with safe_open(str(index[name]), framework="pt") as f:
            out.append(f.get_tensor(name))
    return out[0], out[1]


def init_draft_for_target(target_dir: str | Path, **overrides) -> FlashDraft:
    """A randomly initialised draft sized for the target, with the target's head attached."""
    target_config = load_target_config(target_dir)
    config = FlashConfig.for_target(target_config, **overrides)
    draft = FlashDraft(config)
    draft.attach_target_head(*load_target_head(target_dir))
    return draft
