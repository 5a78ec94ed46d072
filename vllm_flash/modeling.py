"""The FLASH draft model in plain PyTorch.

One place for every piece of the draft: the latent-query visual compressor and its token layout, the
embedding/feature fusion, the semi-autoregressive (SAR) slot expansion, the single decoder layer, the loss.
`FlashDraft` is the reference used for training and for checking the vLLM version against; the vLLM model
(`vllm_flash.vllm_model`) owns a `FlashDraft` and calls these same functions, swapping only the attention
kernel (dense masked SDPA here, vLLM's paged `Attention` there).

Conventions (see FLASH.md):
- A draft position t reads (embedding of token t+1, target feature at t) and its slot i predicts the target
  feature at t+1+i, i.e. token t+2+i. At inference the last position's K slots give K draft tokens.
- Draft rotary positions are 1-D: the token's index in the sequence, except that every token of one image
  or video frame takes the index of the frame's first token. M-RoPE targets are handled the same way: the
  draft never needs the target's 3-D positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import FlashConfig

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Small shared layers
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class Rotary(nn.Module):
    """Neox-style rotary embedding. Its cos and sin are read from a table of every position below
    `max_positions` (built on first use, on the positions' device; not weights), not computed per call: the
    values are the same, and inside vLLM, once the ngram proposer's numba kernels had run in the process (as in
    `vllm-flash bench`), computing them per call cost FLASH's proposer about 4 ms a step at batch 16 (3.3 ms
    became 7.7; the cause inside torch was not found). vLLM's own rotary layers read such a table too."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos_sin is None or self._cos_sin[0].device != device:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                                             / self.head_dim))
            freqs = torch.arange(self.max_positions, device=device, dtype=torch.float32)[:, None] * inv_freq
            self._cos_sin = (freqs.cos(), freqs.sin())
        return self._cos_sin

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each x (..., L, H, D) rotated by `positions` (..., L), each below `max_positions`; the table is read
        once for all of them (the queries and the keys)."""
        cos, sin = (t[positions][..., None, :] for t in self._table(positions.device))  # (..., L, 1, D/2)
        rotated = []
        for x in xs:
            x1, x2 = x.float().chunk(2, dim=-1)
            rotated.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype))
        return tuple(rotated)


class Fusion(nn.Module):
    """Text-position input: fuse [embedding(token t+1); feature(t)] into one hidden vector."""

    def __init__(self, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "gated":  # SiLU(W_g x) * (W_u x), as in the released FLASH code
            self.gate = nn.Linear(2 * hidden, hidden, bias=False)
            self.up = nn.Linear(2 * hidden, hidden, bias=False)
        else:  # EAGLE's plain linear layer
            self.fc = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = torch.cat([embeds.to(features.dtype), features], dim=-1)
        if self.kind == "gated":
            return F.silu(self.gate(x)) * self.up(x)
        return self.fc(x)


class TargetLayerCombiner(nn.Module):
    """Several target layers' states (concatenated) -> one feature: each layer's state RMS-normalised with its
    own weight (residual streams grow with depth and carry a few huge dimensions: unnormalised, the toy world's
    draft lost 0.3 of tau), then projected together, as EAGLE-3's fc. All layers are normalised at once, in one
    pass of small ops rather than one per layer, since the draft runs every step."""

    def __init__(self, hidden: int, num_layers: int, eps: float) -> None:
        super().__init__()
        self.hidden, self.num_layers, self.eps = hidden, num_layers, eps
        self.norm_weight = nn.Parameter(torch.ones(num_layers, hidden))
        self.proj = nn.Linear(num_layers * hidden, hidden, bias=False)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        x = states.float().unflatten(-1, (self.num_layers, self.hidden))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        return self.proj(x.flatten(-2).to(self.proj.weight.dtype))


class TokenMixer(nn.Module):
    """Slot i's feature corrected by the token drafted at slot i-1, fused with it as the input fusion fuses
    (embedding; feature), then projected back. The projection starts at zero: a fresh mixer changes nothing.
    The SAR pass cannot see earlier slots' tokens (they are drafted after it); this runs after it, slot by slot,
    at the cost of two small matrix products per slot."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fusion = Fusion(hidden, "gated")
        self.out = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, features: torch.Tensor, previous_embeds: torch.Tensor) -> torch.Tensor:
        return features + self.out(self.fusion(previous_embeds, features))


class LatentCompressor(nn.Module):
    """F^_V = softmax(Q K^T / sqrt(d)) F_V with C learnable queries, applied per image or video frame; the keys K
    are the frame's features RMS-normalised (`key_norm`), the values F_V the features as they are.

    A fresh latent's scores are then about N(0, QUERY_INIT_STD^2) whatever the target's width and feature scale,
    so the pooling can pick out single tokens from the start. With unit-norm queries and raw keys, as before,
    the toy world's scores stayed below about 1 through training: every latent stayed near its frame's mean
    (pooling entropy 0.95 of uniform's), and more latents or heads changed nothing (README, "Train your own
    draft"). key_norm=False scores the raw features: what drafts trained before were trained with.

    Two options (off in FLASH as published): `saliency` adds to every latent's scores a learned scale times how
    far each token lies from its frame's mean, and `exclusion` > 0 pools latent by latent, each scoring down
    the tokens the ones before it took. Together the toy world's latents pick nearly every object of a scene,
    where independent ones left about one of five unpicked (README, "Train your own draft")."""

    QUERY_INIT_STD = 3.0

    def __init__(self, num_latents: int, hidden: int, key_norm: bool = True, eps: float = 1e-6,
                 exclusion: float = 0.0, saliency: bool = False) -> None:
        super().__init__()
        self.key_norm, self.eps, self.exclusion = key_norm, eps, exclusion
        self.queries = nn.Parameter(torch.randn(num_latents, hidden) * self.QUERY_INIT_STD)
        self.saliency_scale = nn.Parameter(torch.tensor(self.QUERY_INIT_STD)) if saliency else None

    def weights(self, frames: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """How each latent pools its frame: (G, C, L), each row summing to 1 over the valid tokens."""
        keys = frames.float()
        if self.key_norm:
            keys = keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + self.eps)
        scores = torch.einsum("cd,gld->gcl", self.queries.float(), keys) / math.sqrt(frames.shape[-1])
        if self.saliency_scale is not None:
            # how far each token stands from its frame's mean, relative to the frame's average such distance
            mask = valid[..., None].float()
            mean = (frames.float() * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
            distance = (frames.float() - mean).pow(2).mean(-1).sqrt() * valid
            distance = distance / (distance.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
                                   ).clamp(min=self.eps)
            scores = scores + self.saliency_scale * distance[:, None, :]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        if not self.exclusion:
            return torch.softmax(scores, dim=-1)
        # latent by latent, each scoring down what the ones before it took: independent latents picked the same
        # object twice and left one of a 4- or 5-object scene out (README, "Train your own draft")
        taken = torch.zeros_like(scores[:, 0])
        weights = []
        for c in range(scores.shape[1]):
            weights.append(torch.softmax(scores[:, c] - self.exclusion * taken, dim=-1))
            taken = taken + weights[-1]
        return torch.stack(weights, dim=1)

    def forward(self, frames: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """frames: (G, L, d) padded visual features; valid: (G, L) bool. Returns (G, C, d)."""
        return self.weights(frames, valid).to(frames.dtype) @ frames


def latent_layout(lengths: torch.Tensor, num_latents: int, max_len: int) -> torch.Tensor:
    """Which compressed token fills each of a frame's token slots: slot k of an n-token frame holds latent
    floor(k * C / n). vLLM keeps one draft KV entry per target position, so an n-token frame keeps n entries,
    each a copy of one of its C latents (n/C copies each, in runs). Attention over those copies equals
    attention over the C latents plus a fixed log(copies) bias; the draft trains on exactly this layout, and
    the copies share one rotary position, so their keys are identical. Serving and training both call this.
    Returns (G, max_len) int64; entries past a frame's length are clamped, meaningless indices."""
    k = torch.arange(max_len, device=lengths.device)
    return ((k[None, :] * num_latents) // lengths.clamp(min=1)[:, None]).clamp(max=num_latents - 1)


@dataclass
class VisualFrames:
    """Visual token runs in a flat token axis: frame g covers tokens [starts[g], starts[g] + lengths[g])."""

    starts: torch.Tensor  # (G,) int64
    lengths: torch.Tensor  # (G,) int64

    def __len__(self) -> int:
        return int(self.starts.numel())


def apply_visual_inputs(
    compressor: LatentCompressor | None,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    features: torch.Tensor,
    frames: VisualFrames,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the hidden inputs at visual tokens by their frame's compressed features (which bypass the
    text fusion), and give every token of a frame the frame's first position. hidden/features: (N, d),
    positions: (N,). Without a compressor (ablation) the raw features are used, one per token."""
    if len(frames) == 0:
        return hidden, positions
    lengths = frames.lengths
    max_len = int(lengths.max())
    offsets = torch.arange(max_len, device=hidden.device)
    index = frames.starts[:, None] + offsets[None, :]  # (G, L)
    valid = offsets[None, :] < lengths[:, None]
    index = torch.where(valid, index, frames.starts[:, None])
    frame_features = features[index]  # (G, L, d)
    if compressor is not None:
        latents = compressor(frame_features, valid)  # (G, C, d)
        slots = latent_layout(lengths, latents.shape[1], max_len)
        values = torch.gather(latents, 1, slots[..., None].expand(-1, -1, latents.shape[-1]))
    else:
        values = frame_features
    hidden = hidden.clone()
    positions = positions.clone()
    flat_index = index[valid]
    hidden[flat_index] = values[valid].to(hidden.dtype)
    positions[flat_index] = positions[frames.starts][:, None].expand(-1, max_len)[valid]
    return hidden, positions


# ---------------------------------------------------------------------------------------------------------
# The decoder layer (attention kernel injected)
# ---------------------------------------------------------------------------------------------------------
class DraftLayer(nn.Module):
    def __init__(self, config: FlashConfig) -> None:
        super().__init__()
        d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.rotary = Rotary(hd, config.rope_theta, config.max_position_embeddings)
        self.input_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.post_attention_norm = RMSNorm(d, config.rms_norm_eps)
        self.gate_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x: (..., L, d); positions: (..., L). `attend(q, k, v)` takes (..., L, heads, head_dim) tensors
        with rotary applied and returns (..., L, heads * head_dim)."""
        shape = x.shape[:-1]
        y = self.input_norm(x)
        q = self.q_proj(y).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(y).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(y).view(*shape, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        x = x + self.o_proj(attend(q, k, v))
        y = self.post_attention_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


def sar_mask(num_positions: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """The SAR block mask over T*K tokens ordered (t, i) -> t*K + i: slot (t, i) sees slot 0 of every
    earlier position and slots 0..i of its own block. True = may attend."""
    t = torch.arange(num_positions, device=device).repeat_interleave(k)
    i = torch.arange(k, device=device).repeat(num_positions)
    earlier_slot0 = (i[None, :] == 0) & (t[None, :] < t[:, None])
    own_block = (t[None, :] == t[:, None]) & (i[None, :] <= i[:, None])
    return earlier_slot0 | own_block


def dense_attention(mask: torch.Tensor) -> Attend:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, L, H, D) -> (B, H, L, D); grouped KV heads are repeated to the query head count.
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))
        repeat = q.shape[-3] // k.shape[-3]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(-3, -2).flatten(-2)

    return attend


# ---------------------------------------------------------------------------------------------------------
# The draft
# ---------------------------------------------------------------------------------------------------------
class FlashDraft(nn.Module):
    """FLASH draft: fusion + compressor + SAR slots + one decoder layer + RMSNorm, read out by the target's
    frozen LM head. The target's embedding and LM head are attached, never saved with the draft."""

    def __init__(self, config: FlashConfig) -> None:
        super().__init__()
        self.config = config
        d, k = config.hidden_size, config.num_speculative_tokens
        # several target layers' states, concatenated, are projected to one feature (EAGLE-3's fc)
        self.feature_combiner = TargetLayerCombiner(d, len(config.target_layer_ids), config.rms_norm_eps) \
            if config.target_layer_ids else None
        self.fusion = Fusion(d, config.fusion)
        self.compressor = LatentCompressor(config.num_latents, d, config.compressor_key_norm, config.rms_norm_eps,
                                           config.compressor_exclusion, config.compressor_saliency) \
            if config.num_latents > 0 else None
        self.slot_embedding = nn.Parameter(torch.randn(k - 1, d) * 0.02)
        self.slot_gate = nn.Parameter(torch.ones(k - 1)) if config.slot_residual_gate else None
        self.token_mixer = TokenMixer(d) if config.slot_token_mixer else None
        self.layer = DraftLayer(config)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.register_buffer("embed_weight", torch.empty(0), persistent=False)
        self.register_buffer("lm_head_weight", torch.empty(0), persistent=False)

    def attach_target_head(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        self.embed_weight = embed_weight.detach()
        self.lm_head_weight = lm_head_weight.detach()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_weight)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.lm_head_weight.to(features.dtype).t()

    # -- the pieces the vLLM model reuses -------------------------------------------------------------------
    def combine_features(self, target_states: torch.Tensor) -> torch.Tensor:
        """(..., feature_size) target states -> (..., d) features: the identity for a draft reading the target's
        final hidden states."""
        if self.feature_combiner is None:
            return target_states
        return self.feature_combiner(target_states)

    def input_states(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                     frames: VisualFrames | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (N, d) inputs -> (N, d) hidden inputs and (N,) draft positions."""
        hidden = self.fusion(embeds, features)
        if frames is not None:
            hidden, positions = apply_visual_inputs(self.compressor, hidden, positions, features, frames)
        return hidden, positions

    def slot_inputs(self, anchor: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Slot i of a block: anchor hidden h_t (optionally gated) plus slot_embedding[i]; slot 0 is h_t."""
        zero = self.slot_embedding.new_zeros(1, self.slot_embedding.shape[-1])
        offsets = torch.cat([zero, self.slot_embedding], dim=0)[slot]
        if self.slot_gate is not None:
            gates = torch.cat([self.slot_gate.new_ones(1), self.slot_gate])[slot]
            anchor = anchor * gates[..., None].to(anchor.dtype)
        return anchor + offsets.to(anchor.dtype)

    # -- reference forward over whole sequences (training, checking) -----------------------------------------
    def forward(self, next_ids: torch.Tensor, features: torch.Tensor,
                frames: VisualFrames | None = None, k: int | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """All positions at once with the SAR block mask.

        next_ids: (B, T) token t+1 at position t; features: (B, T, feature_size) target states at t;
        frames: visual runs in the flattened (B*T) token axis. Returns predicted features (B, T, K, d).
        With a token mixer, slot i reads the token t+1+i, the one slot i-1 should draft: its draft is used only
        when every slot before it was accepted, that is, drafted exactly the target's tokens.
        """
        out = self.slot_features(next_ids, features, frames, k, noise)
        k = out.shape[2]
        if self.token_mixer is None or k == 1:
            return out
        previous = torch.stack([F.pad(next_ids[:, i:], (0, i)) for i in range(1, k)], dim=2)  # (B, T, K-1)
        return torch.cat([out[:, :, :1], self.token_mixer(out[:, :, 1:], self.embed(previous))], dim=2)

    def slot_features(self, next_ids: torch.Tensor, features: torch.Tensor,
                      frames: VisualFrames | None = None, k: int | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """The SAR pass alone: (B, T, K, d), no slot reading an earlier slot's token. `noise` (B, T, d), in units
        of the features' std, is added to the combined features (training's input noise)."""
        k = k or self.config.num_speculative_tokens
        features = self.combine_features(features)
        if noise is not None:
            features = features + noise.to(features.dtype) * features.detach().std()
        b, t, d = features.shape
        positions = torch.arange(t, device=features.device).expand(b, t).reshape(-1)
        hidden, positions = self.input_states(self.embed(next_ids).reshape(b * t, d),
                                              features.reshape(b * t, d), positions, frames)
        hidden, positions = hidden.view(b, t, d), positions.view(b, t)
        slot = torch.arange(k, device=features.device)
        x = self.slot_inputs(hidden[:, :, None, :].expand(b, t, k, d), slot.expand(b, t, k))
        pos = positions[:, :, None] + slot
        mask = sar_mask(t, k, features.device)
        out = self.layer(x.reshape(b, t * k, d), pos.reshape(b, t * k), dense_attention(mask))
        return self.norm(out).view(b, t, k, d)

    @torch.no_grad()
    def draft_logits(self, next_ids: torch.Tensor, features: torch.Tensor,
                     frames: VisualFrames | None = None, k: int | None = None) -> torch.Tensor:
        """Logits (K, V) of the K draft tokens proposed after the last position of one sequence.
        next_ids: (T,), features: (T, feature_size)."""
        slots = self.slot_features(next_ids[None], features[None], frames, k)[0, -1:]

        def greedy(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.logits(h)
            return logits.argmax(-1), logits

        return torch.cat(self.decode_slots(slots, self.embed, greedy)[1])

    def decode_slots(self, slots: torch.Tensor, embed, sample) -> tuple[torch.Tensor, list]:
        """The K draft tokens of N blocks from their SAR-pass features `slots` (N, K, d): slot by slot, each
        read by the token mixer (if any) with the token drafted before it. `sample(features (N, d))` returns
        (tokens (N,), anything kept per slot); `embed` maps tokens to embeddings. Returns (tokens (N, K), kept)."""
        tokens, kept = [], []
        for i in range(slots.shape[1]):
            h = slots[:, i]
            if i and self.token_mixer is not None:
                h = self.token_mixer(h, embed(tokens[-1]).to(h.dtype))
            token, extra = sample(h)
            tokens.append(token)
            kept.append(extra)
        return torch.stack(tokens, dim=1), kept

    def propose(self, next_ids: torch.Tensor, features: torch.Tensor,
                frames: VisualFrames | None = None, k: int | None = None) -> torch.Tensor:
        """K greedy draft tokens after the last position of one sequence."""
        return self.draft_logits(next_ids, features, frames, k).argmax(-1)


@dataclass
class FlashLoss:
    loss: torch.Tensor
    slot_accuracy: list[float]
    slot_count: list[int]


def flash_loss(draft: FlashDraft, predicted: torch.Tensor, target_features: torch.Tensor,
               target_mask: torch.Tensor, input_mask: torch.Tensor, ce_weight: float) -> FlashLoss:
    """SmoothL1(predicted, target feature) + ce_weight * soft cross-entropy against the target's token
    distribution, over the K slots. Slot i at position t is scored when position t is a text input
    (input_mask) and position t+1+i is a prediction target (target_mask)."""
    b, t, k, _ = predicted.shape
    total = predicted.new_zeros(())
    count = 0
    accuracy, counts = [], []
    for i in range(k):  # K is small; everything inside is batched over positions
        span = t - 1 - i
        if span <= 0:
            accuracy.append(0.0)
            counts.append(0)
            continue
        mask = target_mask[:, 1 + i:] & input_mask[:, :span]
        pred = predicted[:, :span, i][mask]
        target = target_features[:, 1 + i:][mask]
        n = pred.shape[0]
        counts.append(n)
        if n == 0:
            accuracy.append(0.0)
            continue
        regression = F.smooth_l1_loss(pred.float(), target.float(), reduction="sum") / pred.shape[-1]
        draft_logp = torch.log_softmax(draft.logits(pred).float(), dim=-1)
        with torch.no_grad():
            target_logits = draft.logits(target).float()
            target_p = torch.softmax(target_logits, dim=-1)
            accuracy.append((draft_logp.argmax(-1) == target_logits.argmax(-1)).float().mean().item())
        soft_ce = -(target_p * draft_logp).sum()
        total = total + regression + ce_weight * soft_ce
        count += n
    return FlashLoss(total / max(count, 1), accuracy, counts)


def frames_from_token_ids(token_ids: torch.Tensor | list[int], image_token_id: int | None,
                          video_token_id: int | None, frames_per_video: list[int] | None = None,
                          offset: int = 0) -> tuple[list[int], list[int]]:
    """(starts, lengths) of images and video frames in one token sequence: each contiguous run of image
    tokens is one image; the i-th run of video tokens is split into frames_per_video[i] equal frames."""
    ids = torch.as_tensor(token_ids)
    starts: list[int] = []
    lengths: list[int] = []
    videos = iter(frames_per_video or [])
    for token, split in ((image_token_id, False), (video_token_id, True)):
        if token is None:
            continue
        flags = torch.cat([torch.tensor([False]), ids == token, torch.tensor([False])]).int()
        edges = torch.diff(flags)
        run_starts = torch.nonzero(edges == 1).flatten().tolist()
        run_ends = torch.nonzero(edges == -1).flatten().tolist()
        for s, e in zip(run_starts, run_ends):
            n = next(videos, 1) if split else 1
            per = (e - s) // n
            for f in range(n):
                starts.append(offset + s + f * per)
                lengths.append(per)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    return [starts[i] for i in order], [lengths[i] for i in order]
