"""Fit a FLASH draft to a tiny target's own greedy outputs (self-distillation in miniature)."""
from __future__ import annotations

from vllm_flash.tiny_targets import text_prompts
from vllm_flash.train import distill_text_draft


def training_prompts(kind: str, n: int) -> list[str]:
    return text_prompts(kind, n)


def fit_draft_on_own_outputs(target, out, kind="qwen2_5_vl", k=4, n=16):
    """A draft fitted (near memorised) to the target's greedy continuations of `training_prompts(kind, n)`:
    a 1-layer draft does not generalise across a random target's chaotic outputs, but on these prompts it
    is right often, which is what exercising full and partial acceptance needs. It has a token mixer, as
    `vllm-flash train` gives by default, so its slots are drafted one after another."""
    return distill_text_draft(target, out, training_prompts(kind, n), k=k, slot_token_mixer=True)
