"""Training a FLASH draft on a target's own features, top to bottom.

A sample is one token sequence with the target's features at every position. The draft at position t reads
(token t+1, feature t) and its K slots are trained against the features (and token distributions) at
t+1..t+K. This module holds the core loop; the `vllm-flash train` command wraps it with data loading.
"""
from __future__ import annotations

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


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 20
    grad_clip: float = 0.5
    feature_noise: float = 0.1  # uniform noise on input features (EAGLE), relative to their std
    ce_weight: float = 0.1
    seed: int = 0


def collate(samples: list[Sample]) -> dict:
    """Right-padded batch; frames are flattened into the (B*T) token axis."""
    t = max(len(s.token_ids) for s in samples)
    b, d = len(samples), samples[0].features.shape[-1]
    next_ids = torch.zeros(b, t, dtype=torch.long)
    features = torch.zeros(b, t, d, dtype=samples[0].features.dtype)
    target_mask = torch.zeros(b, t, dtype=torch.bool)
    input_mask = torch.zeros(b, t, dtype=torch.bool)
    starts, lengths = [], []
    for row, s in enumerate(samples):
        n = len(s.token_ids)
        next_ids[row, : n - 1] = s.token_ids[1:]
        features[row, :n] = s.features
        target_mask[row, s.target_from:n] = True
        input_mask[row, : n - 1] = True  # the last position has no next token
        for start, length in s.frames:
            input_mask[row, start:start + length] = False
            target_mask[row, start:start + length] = False
            starts.append(row * t + start)
            lengths.append(length)
    frames = VisualFrames(torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)) \
        if starts else None
    return {"next_ids": next_ids, "features": features, "frames": frames, "target_mask": target_mask,
            "input_mask": input_mask}


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit(draft: FlashDraft, samples: list[Sample], cfg: TrainConfig,
        on_step: Callable[[int, float, list[float]], None] | None = None) -> list[float]:
    """Train `draft` in place; returns the loss of every step."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    losses = []
    draft.train()
    for step in range(cfg.steps):
        batch = collate(rng.sample(samples, min(cfg.batch_size, len(samples))))
        features = batch["features"]
        noisy = features + (torch.rand_like(features) - 0.5) * 2 * cfg.feature_noise * features.std()
        predicted = draft(batch["next_ids"], noisy, batch["frames"])
        result = flash_loss(draft, predicted, features, batch["target_mask"], batch["input_mask"], cfg.ce_weight)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
        opt.step()
        losses.append(result.loss.item())
        if on_step:
            on_step(step, losses[-1], result.slot_accuracy)
    draft.eval()
    return losses


@torch.no_grad()
def hf_text_features(target_dir: str | Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Target features (final-norm hidden states) for text-only token sequences, with HF transformers."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(target_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    del config
    out = []
    for seq in sequences:
        ids = torch.tensor([seq])
        hidden = model.model(input_ids=ids, output_hidden_states=False).last_hidden_state
        out.append(hidden[0].float())
    return out


def distill_text_draft(target_dir: str | Path, out_dir: str | Path, prompts: list[str], *, k: int = 4,
                       num_latents: int = 4, max_tokens: int = 40, steps: int = 400, lr: float = 3e-3,
                       seed: int = 0, llm_options: dict | None = None) -> Path:
    """Self-distillation in miniature: vLLM generates the target's greedy answers to `prompts`, HF gives the
    target's features over them, and a fresh draft is fitted to those. Text-only."""
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
    draft = init_draft_for_target(target_dir, num_speculative_tokens=k, num_latents=num_latents)
    draft.config.training = {"method": "self-distillation (text)", "samples": len(samples), "steps": steps,
                             "lr": lr, "max_tokens": max_tokens}
    fit(draft, samples, TrainConfig(steps=steps, lr=lr, batch_size=8, warmup=10, feature_noise=0.0, seed=seed))
    return save_draft(draft, out_dir)
