"""The FLASH draft as a vLLM model: the reference `FlashDraft` plus a paged-KV `Attention` layer.

Every computation except attention is the reference's own code. The draft's attention layer is numbered
after the target's layers, so its KV lives in the same paged cache, indexed by the target's block table.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor

from .checkpoint import check_draft_state, check_finite
from .modeling import FlashDraft, VisualFrames


class FlashDraftModel(nn.Module):
    # Tell vLLM's proposer to share the target's embedding and LM head instead of loading copies.
    has_own_embed_tokens = False
    has_own_lm_head = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        self.draft = FlashDraft(self.config)
        layer = self.draft.layer
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.attn = Attention(
            layer.num_heads, layer.head_dim, layer.head_dim**-0.5, num_kv_heads=layer.num_kv_heads,
            cache_config=vllm_config.cache_config, prefix=f"model.layers.{target_layers}.self_attn.attn")
        self.model = nn.Module()  # holds the target's embed_tokens once vLLM shares it
        self.logits_processor = LogitsProcessor(self.config.vocab_size)
        # vLLM's parallel drafting copies this into its placeholder-slot input; FLASH builds slot inputs from
        # their anchor position instead, so its value never reaches the draft.
        self.register_buffer("mask_hidden", torch.zeros(self.config.hidden_size), persistent=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attn(q.flatten(-2), k.flatten(-2), v.flatten(-2))

    def embed_input_ids(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None, slot_index: torch.Tensor | None = None,
                frames: VisualFrames | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat batch of N tokens. slot_index (N,): 0 for real positions, i for the i-th SAR slot appended
        after its anchor; frames: visual runs (in this flat axis) to compress."""
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        n = hidden_states.shape[0]
        hidden, positions = self.draft.input_states(embeds[:n], hidden_states, positions[:n], frames)
        if slot_index is not None:
            slot_index = slot_index[:n]
            anchor = torch.arange(n, device=hidden.device) - slot_index
            hidden = self.draft.slot_inputs(hidden[anchor], slot_index)
        out = self.draft.norm(self.draft.layer(hidden, positions, self._attend))
        return out, out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        state = dict(weights)
        expected = self.draft.state_dict()
        where = f"FLASH draft {self.config.name_or_path or ''}".strip()
        check_draft_state(expected, {k: tuple(v.shape) for k, v in state.items()}, where)
        for name, tensor in state.items():
            check_finite(name, tensor, where)
        self.draft.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
        return {f"draft.{name}" for name, _ in self.draft.named_parameters()}
