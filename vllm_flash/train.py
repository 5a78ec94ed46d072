"""Training a FLASH draft on a target's own features, top to bottom.

A sample is one token sequence with the target's features at every position. The draft at position t reads
(token t+1, feature t) and its K slots are trained against the features (and token distributions) at
t+1..t+K. This module holds the core loop; the `vllm-flash train` command wraps it with data loading.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .modeling import FlashDraft, VisualFrames, flash_loss


@dataclass
class Sample:
    token_ids: torch.Tensor  # (T,) the whole sequence
    features: torch.Tensor  # (T, d) target features (the hidden states that feed the LM head)
    frames: list[tuple[int, int]] = field(default_factory=list)  # (start, length) of images / frames
    target_from: int = 1  # positions >= this are prediction targets (e.g. only the answer)
    # (T, layers * d) what the draft reads, for a draft reading several target layers (`target_layer_ids`); the
    # slots are still trained against `features`, the states that feed the LM head
    layer_states: torch.Tensor | None = None


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 20
    grad_clip: float = 0.5
    feature_noise: float = 0.1  # uniform noise on the input features (EAGLE; after combining target layers), x their std
    # the paper's 0.1 left the toy world's drafts 5% of tau short of 1.0 (and of 3.0), held out, same data
    ce_weight: float = 1.0
    seed: int = 0
    bf16: bool = False  # autocast the forward pass to bfloat16


def collate(samples: list[Sample]) -> dict:
    """Right-padded batch; frames are flattened into the (B*T) token axis."""
    t = max(len(s.token_ids) for s in samples)
    b, d = len(samples), samples[0].features.shape[-1]
    next_ids = torch.zeros(b, t, dtype=torch.long)
    features = torch.zeros(b, t, d, dtype=samples[0].features.dtype)
    # a draft of final states reads the features themselves: no second copy of them
    layered = samples[0].layer_states is not None
    inputs = torch.zeros(b, t, samples[0].layer_states.shape[-1], dtype=features.dtype) if layered else features
    target_mask = torch.zeros(b, t, dtype=torch.bool)
    input_mask = torch.zeros(b, t, dtype=torch.bool)
    starts, lengths = [], []
    for row, s in enumerate(samples):
        n = len(s.token_ids)
        next_ids[row, : n - 1] = s.token_ids[1:]
        features[row, :n] = s.features
        if layered:
            inputs[row, :n] = s.layer_states
        target_mask[row, s.target_from:n] = True
        input_mask[row, : n - 1] = True  # the last position has no next token
        for start, length in s.frames:
            input_mask[row, start:start + length] = False
            target_mask[row, start:start + length] = False
            starts.append(row * t + start)
            lengths.append(length)
    frames = VisualFrames(torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)) \
        if starts else None
    return {"next_ids": next_ids, "features": features, "inputs": inputs, "frames": frames,
            "target_mask": target_mask, "input_mask": input_mask}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, num_samples: int, batch_size: int, seed: int) -> list[int]:
    """The samples of training step `step`: a fixed function of (step, seed), so a resumed run sees exactly
    the batches an uninterrupted one would. Each epoch is a fresh permutation."""
    start = step * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_samples)
        order = list(range(num_samples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


def save_trainer_state(directory: Path, draft: FlashDraft, opt: torch.optim.Optimizer, step: int,
                       losses: list[float], meta: dict) -> None:
    """Weights, AdamW moments and progress, written atomically (safetensors and JSON, no pickle)."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    params = [p for p in draft.parameters() if p.requires_grad]
    moments = {}
    for i, param in enumerate(params):
        for name, value in opt.state.get(param, {}).items():
            moments[f"{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    weights = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
    atomic_write(directory / "weights.safetensors", lambda tmp: save_file(weights, tmp))
    atomic_write(directory / "optimizer.safetensors", lambda tmp: save_file(moments, tmp))
    state = {"step": step, "losses": losses, "meta": meta,
             "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}
    atomic_write(directory / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(state)))


def load_trainer_state(directory: Path, draft: FlashDraft, opt: torch.optim.Optimizer, meta: dict
                       ) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    state = json.loads((directory / "state.json").read_text())
    for key in ("target", "draft_config"):
        if state["meta"].get(key) != meta.get(key):
            raise ValueError(f"--resume: the checkpoint in {directory} was made for {key}="
                             f"{state['meta'].get(key)!r}, this run has {meta.get(key)!r}")
    draft.load_state_dict(load_file(directory / "weights.safetensors"))
    params = [p for p in draft.parameters() if p.requires_grad]
    moments = load_file(directory / "optimizer.safetensors")
    per_param: dict[int, dict] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": per_param,
                         "param_groups": [{**g, "params": list(range(len(params)))} if i == 0 else g
                                          for i, g in enumerate(state["param_groups"])]})
    return state["step"], state["losses"]


def fit(draft: FlashDraft, samples, cfg: TrainConfig,
        on_step: Callable[[int, float, list[float]], None] | None = None,
        checkpoint_dir: str | Path | None = None, save_every: int = 0, resume: bool = False,
        meta: dict | None = None, progress: bool = False) -> list[float]:
    """Train `draft` in place on `samples` (a list, or any sequence such as FeatureShards).

    With `checkpoint_dir`, progress is saved every `save_every` steps and at the end; `resume=True` continues
    from the last save to the same result as an uninterrupted run. Returns the loss of every step."""
    torch.manual_seed(cfg.seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    meta = meta or {}
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else None
    start, losses = 0, []
    if resume and checkpoint and (checkpoint / "state.json").exists():
        start, losses = load_trainer_state(checkpoint, draft, opt, meta)
    # Under torchrun every rank takes its slice of the same global batch; DDP averages the gradients.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    model = torch.nn.parallel.DistributedDataParallel(draft, find_unused_parameters=True) if distributed \
        else draft
    device = next(draft.parameters()).device
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    draft.train()
    for step in range(start, cfg.steps):
        indices = batch_indices(step, len(samples), cfg.batch_size * world, cfg.seed)[rank::world]
        batch = collate([samples[i] for i in indices])
        noise_rng = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * world + rank)
        # in units of the draft's features' std, added once target layers are combined to them (`slot_features`)
        noise = (torch.rand(batch["features"].shape, generator=noise_rng) - 0.5) * 2 * cfg.feature_noise
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if batch["frames"] is not None:
            batch["frames"] = VisualFrames(batch["frames"].starts.to(device), batch["frames"].lengths.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            predicted = model(batch["next_ids"], batch["inputs"], batch["frames"], noise=noise.to(device))
        result = flash_loss(draft, predicted.float(), batch["features"], batch["target_mask"], batch["input_mask"],
                            cfg.ce_weight)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
        opt.step()
        losses.append(result.loss.item())
        if on_step:
            on_step(step, losses[-1], result.slot_accuracy)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc="/".join(f"{a:.2f}" for a in result.slot_accuracy))
        if checkpoint and save_every and (step + 1) % save_every == 0 and rank == 0:
            save_trainer_state(checkpoint, draft, opt, step + 1, losses, meta)
    if checkpoint and rank == 0:
        save_trainer_state(checkpoint, draft, opt, cfg.steps, losses, meta)
    if bar is not None:
        bar.close()
    draft.eval()
    return losses


@torch.no_grad()
def hf_text_features(target_dir: str | Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Target features (final-norm hidden states) for text-only token sequences, with HF transformers."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    out = []
    for seq in sequences:
        ids = torch.tensor([seq])
        hidden = model.model(input_ids=ids, output_hidden_states=False).last_hidden_state
        out.append(hidden[0].float())
    return out


def distill_text_draft(target_dir: str | Path, out_dir: str | Path, prompts: list[str], *, k: int = 4,
                       num_latents: int = 4, max_tokens: int = 40, steps: int = 400, lr: float = 3e-3,
                       seed: int = 0, llm_options: dict | None = None, **draft_options) -> Path:
    """Self-distillation in miniature: vLLM generates the target's greedy answers to `prompts`, HF gives the
    target's features over them, and a fresh draft (`draft_options`: FlashConfig fields) is fitted to those.
    Text-only."""
    import gc

    from vllm import LLM, SamplingParams

    from .checkpoint import init_draft_for_target, save_draft

    options = dict(dtype="float32", enforce_eager=True, max_model_len=1024, seed=seed,
                   enable_prefix_caching=False)
    options.update(llm_options or {})
    llm = LLM(model=str(target_dir), **options)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    del llm
    gc.collect()
    sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outputs]
    features = hf_text_features(target_dir, sequences)
    samples = [Sample(torch.tensor(seq), feat, target_from=len(o.prompt_token_ids))
               for seq, feat, o in zip(sequences, features, outputs)]
    torch.manual_seed(seed)
    draft = init_draft_for_target(target_dir, num_speculative_tokens=k, num_latents=num_latents, **draft_options)
    draft.config.training = {"method": "self-distillation (text)", "samples": len(samples), "steps": steps,
                             "lr": lr, "max_tokens": max_tokens}
    fit(draft, samples, TrainConfig(steps=steps, lr=lr, batch_size=8, warmup=10, feature_noise=0.0, seed=seed))
    return save_draft(draft, out_dir)
