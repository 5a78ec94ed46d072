"""FlashProposer: FLASH on vLLM's shared spec-decode machinery.

It is vLLM's EAGLE proposer with parallel drafting: per verify step the draft runs once over the newly
verified positions plus K-1 SAR slots appended to each request, and the K sampled positions become the K
draft tokens. FLASH changes three things about the inputs, and nothing else:
- positions: the draft's are 1-D token indices, which also drive the KV slot mapping, so M-RoPE targets
  work (vLLM's parallel drafting otherwise reads the target's 3-D positions and refuses M-RoPE);
- slot inputs: slot i is its anchor's hidden input plus a learned slot embedding (`slot_index`);
- visual context: each image / video frame in the chunk is compressed to C latents (`frames`).
A draft that reads several target layers (`target_layer_ids`) gets them from the runner as EAGLE-3 does, and
combines them to one feature per position before the inputs are laid out.
A draft with a token mixer also changes how its K draft tokens are sampled: slot by slot, each slot's features
corrected by the token drafted before it (`_sample_draft_tokens`).
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.eagle import EagleProposer

from .modeling import VisualFrames
from .serving import request_frames


class FlashProposer(EagleProposer):
    def __init__(self, vllm_config, device, runner=None) -> None:
        super().__init__(vllm_config, device, runner)
        # The runner's request states tell where each request's images lie; the base class drops it.
        self.runner = runner
        self._flash_inputs: dict[str, Any] = {"slot_index": None, "frames": None}
        if runner is not None and self.draft_model_config.hf_config.target_layer_ids:
            # The runner asks the target for those layers' states (`eagle_aux_hidden_state_layer_ids` in the
            # draft's config) and hands them over concatenated only when this is set; it sets it for eagle3 alone.
            runner.use_aux_hidden_state_outputs = True

    def _init_parallel_drafting_params(self) -> None:
        # Placeholder token and hidden state for the appended slots; the FLASH model replaces both.
        self.parallel_drafting_token_id = 0
        self.parallel_drafting_hidden_state_tensor = torch.zeros(self.hidden_size, dtype=self.dtype,
                                                                 device=self.device)

    def load_model(self, target_model) -> None:
        # The draft takes no multimodal embeddings (visual positions use compressed target features), so the
        # runner need not gather them for it; saying so up front also skips vLLM's text-only fallback warning.
        self.supports_mm_inputs = False
        super().load_model(target_model)

    def _maybe_share_embeddings(self, target_language_model) -> None:
        # A FLASH draft never has its own embedding or LM head: it reads the target's, by reference.
        self.model.model.embed_tokens = target_language_model.model.embed_tokens

    def _maybe_share_lm_head(self, target_language_model) -> None:
        self.model.lm_head = target_language_model.lm_head

    def _warn_if_multimodal(self) -> None:
        pass  # FLASH drafts from visual context; nothing falls back to text-only.

    def _set_positions(self, num_tokens: int, positions: torch.Tensor) -> None:
        self.positions[:num_tokens] = positions  # always 1-D token indices here

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions, target_hidden_states,
                              token_indices_to_sample, cad: CommonAttentionMetadata, num_rejected_tokens_gpu):
        query_start = cad.query_start_loc
        query_lens = query_start[1:] - query_start[:-1]
        first_index = cad.seq_lens - query_lens  # token index of each request's first query token
        num_target = target_token_ids.shape[0]
        request = torch.repeat_interleave(torch.arange(len(query_lens), device=query_start.device), query_lens,
                                          output_size=num_target)
        index_positions = (first_index[request] + torch.arange(num_target, device=query_start.device)
                           - query_start[:-1][request]).to(torch.int64)
        frames = self._chunk_frames(cad)
        target_hidden_states = self.model.draft.combine_features(target_hidden_states)
        num_tokens, token_indices_to_sample, new_cad = super().set_inputs_first_pass(
            target_token_ids, next_token_ids, index_positions, target_hidden_states, token_indices_to_sample,
            cad, num_rejected_tokens_gpu)
        slot_index = None
        if self.needs_extra_input_slots:
            k = self.extra_slots_per_request
            slot_index = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
            slots = token_indices_to_sample.view(-1, k).long()
            slot_index[slots] = torch.arange(k, device=self.device).expand_as(slots)
        self._flash_inputs = {"slot_index": slot_index, "frames": frames}
        return num_tokens, token_indices_to_sample, new_cad

    def build_model_inputs_first_pass(self, num_tokens: int, num_input_tokens: int,
                                      mm_embed_inputs) -> tuple[dict[str, Any], int]:
        kwargs, size = super().build_model_inputs_first_pass(num_tokens, num_input_tokens, mm_embed_inputs)
        kwargs.update(self._flash_inputs)
        return kwargs, size

    def _sample_draft_tokens(self, hidden_states: torch.Tensor, sampling_metadata) -> tuple[torch.Tensor, Any]:
        draft = self.model.draft
        if draft.token_mixer is None or self.num_speculative_tokens == 1:
            return super()._sample_draft_tokens(hidden_states, sampling_metadata)
        greedy = not self._enable_probabilistic_draft_probs or sampling_metadata.all_greedy

        def sample(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            logits = self.model.compute_logits(h)
            # sampled slot by slot, each token's probabilities are those it was drawn from, given the tokens
            # drafted before it: what the rejection sampler needs to keep the target's distribution
            return (logits.argmax(dim=-1), None) if greedy else self._sample_from_logits(logits, sampling_metadata)

        # the sampled rows are request-major: K consecutive slots per request
        slots = hidden_states.view(-1, self.num_speculative_tokens, hidden_states.shape[-1])
        tokens, probs = draft.decode_slots(slots, self.model.embed_input_ids, sample)
        return tokens.reshape(-1), None if greedy else torch.stack(probs, dim=1).flatten(0, 1)

    def _chunk_frames(self, cad: CommonAttentionMetadata) -> VisualFrames | None:
        """Visual frames overlapping this step's tokens, as runs in the drafter's (expanded) token axis."""
        batch = self.runner.input_batch
        num_reqs = cad.num_reqs
        states = [self.runner.requests.get(req_id) for req_id in batch.req_ids[:num_reqs]]
        query_start = cad.query_start_loc_cpu.tolist()
        if cad.seq_lens_cpu_upper_bound is not None:
            # Cheap host-side check first: decode steps of image requests (the common case) skip the device
            # sync below. The upper bound may exceed the true length by the pending draft tokens.
            upper = cad.seq_lens_cpu_upper_bound.tolist()
            slack = self.num_speculative_tokens + 1
            if not any(state is not None and state.mm_features and
                       max(f.mm_position.offset + f.mm_position.length for f in state.mm_features)
                       > upper[r] - (query_start[r + 1] - query_start[r]) - slack
                       for r, state in enumerate(states)):
                return None
        elif not any(state is not None and state.mm_features for state in states):
            return None
        seq_lens = cad.seq_lens.cpu().tolist()  # exact chunk bounds (a device sync, only with images in batch)
        extra = self.net_num_new_slots_per_request
        starts, lengths = [], []
        for r, state in enumerate(states):
            if state is None or not state.mm_features:
                continue
            q_len = query_start[r + 1] - query_start[r]
            chunk_start, chunk_end = seq_lens[r] - q_len, seq_lens[r]
            out_start = query_start[r] + r * extra
            for start, length in request_frames(state.mm_features):
                lo, hi = max(start, chunk_start), min(start + length, chunk_end)
                if hi > lo:  # a frame cut by a prefix-cache hit is compressed from the part computed now
                    starts.append(out_start + lo - chunk_start)
                    lengths.append(hi - lo)
        if not starts:
            return None
        return VisualFrames(torch.tensor(starts, device=self.device), torch.tensor(lengths, device=self.device))
