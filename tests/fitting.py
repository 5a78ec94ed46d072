"""Fit a FLASH draft to a tiny target's own greedy outputs (self-distillation in miniature)."""
from __future__ import annotations

import random

import torch

from vllm_flash.checkpoint import init_draft_for_target, save_draft
from vllm_flash.tiny_targets import CORPUS_WORDS, chat_prompt
from vllm_flash.train import Sample, TrainConfig, fit, hf_text_features

from .vllm_helpers import greedy, token_ids, with_llm


def training_prompts(kind: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [chat_prompt(kind, "red circle")] + [
        chat_prompt(kind, " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 12))))
        for _ in range(n - 1)]


def fit_draft_on_own_outputs(target, out, kind="qwen2_5_vl", k=4, steps=400, n=16):
    """A draft fitted (near memorised) to the target's greedy continuations of `training_prompts(kind, n)`:
    a 1-layer draft does not generalise across a random target's chaotic outputs, but on these prompts it
    is right often, which is what exercising full and partial acceptance needs."""
    outputs = with_llm(target, None, lambda llm: llm.generate(training_prompts(kind, n), greedy(max_tokens=40)),
                       enable_prefix_caching=False)
    sequences = [list(o.prompt_token_ids) + ids for o, ids in zip(outputs, token_ids(outputs))]
    features = hf_text_features(target, sequences)
    samples = [Sample(torch.tensor(seq), feat, target_from=len(o.prompt_token_ids))
               for seq, feat, o in zip(sequences, features, outputs)]
    torch.manual_seed(0)
    draft = init_draft_for_target(target, num_speculative_tokens=k, num_latents=4)
    fit(draft, samples, TrainConfig(steps=steps, lr=3e-3, batch_size=8, warmup=10, feature_noise=0.0))
    return save_draft(draft, out)
