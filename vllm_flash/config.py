"""FlashConfig: what a FLASH draft is, and which target it fits.

Saved as the draft's `config.json`. The target's embedding and LM head are not part of the draft: they are
shared with (vLLM) or loaded from (training) the target, so the config records the target's identity and
shapes, and `validate_against_target` refuses a draft that does not fit.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

FUSION_TYPES = ("gated", "linear")


class FlashConfigError(ValueError):
    """A draft config that is invalid, or that does not fit its target."""


class FlashConfig(PretrainedConfig):
    model_type = "flash_draft"

    def __init__(
        self,
        # The target this draft belongs to.
        target_architecture: str = "",
        hidden_size: int = 256,
        vocab_size: int = 8192,
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        target_uses_mrope: bool = False,
        target_num_hidden_layers: int = 0,
        # Which target states the draft reads: None, the final hidden states (FLASH as published); or the
        # residual stream after each of these target layers, concatenated (EAGLE-3's multi-layer features).
        target_layer_ids: list[int] | None = None,
        # FLASH itself.
        num_speculative_tokens: int = 4,
        num_latents: int = 36,
        # The compressor scores RMS-normalised visual features (`LatentCompressor`). False, the default for a
        # config without the field, is how drafts trained before it were trained; `for_target` sets True.
        compressor_key_norm: bool = False,
        # How strongly a latent avoids the tokens the latents before it pooled (`LatentCompressor`): 0, each
        # latent pools on its own (FLASH as published, and every draft trained before the field).
        compressor_exclusion: float = 0.0,
        # Whether every latent's scores also favour the tokens that stand out from their frame (`LatentCompressor`).
        compressor_saliency: bool = False,
        fusion: str = "gated",
        slot_residual_gate: bool = False,
        slot_token_mixer: bool = False,
        # The single decoder layer.
        num_attention_heads: int = 4,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        intermediate_size: int = 1024,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        # Provenance (training data and settings), free-form.
        training: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.target_architecture = target_architecture
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.target_uses_mrope = target_uses_mrope
        self.target_num_hidden_layers = target_num_hidden_layers
        self.target_layer_ids = list(target_layer_ids) if target_layer_ids else None
        self.num_speculative_tokens = num_speculative_tokens
        self.num_latents = num_latents
        self.compressor_key_norm = bool(compressor_key_norm)
        self.compressor_exclusion = float(compressor_exclusion)
        self.compressor_saliency = bool(compressor_saliency)
        self.fusion = fusion
        self.slot_residual_gate = slot_residual_gate
        # K = 1 has no slot after the first for a token mixer to correct
        self.slot_token_mixer = bool(slot_token_mixer) and num_speculative_tokens > 1
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.training = training or {}
        # vLLM reads these generic names from any draft config.
        self.num_hidden_layers = 1
        if self.target_layer_ids:  # the layers whose states vLLM's runner hands the drafter ("aux hidden states")
            kwargs["eagle_aux_hidden_state_layer_ids"] = self.target_layer_ids
        kwargs.setdefault("architectures", ["FlashDraftModel"])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Internal consistency; raises FlashConfigError naming the field."""
        if self.fusion not in FUSION_TYPES:
            raise FlashConfigError(f"fusion={self.fusion!r} is not one of {FUSION_TYPES}")
        for name in ("hidden_size", "vocab_size", "num_speculative_tokens", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size"):
            if int(getattr(self, name)) < 1:
                raise FlashConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_latents < 0:
            raise FlashConfigError(f"num_latents={self.num_latents} must be >= 0 (0 = no compression)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FlashConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise FlashConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.target_layer_ids is not None:
            top = self.target_num_hidden_layers
            bad = [i for i in self.target_layer_ids if not 1 <= int(i) <= top]
            if bad or len(set(self.target_layer_ids)) != len(self.target_layer_ids):
                raise FlashConfigError(
                    f"target_layer_ids={self.target_layer_ids}: each must be a distinct target layer, "
                    f"1..{top} (the residual stream after that many of the target's {top} layers)")

    @property
    def feature_size(self) -> int:
        """Width of the target features the draft reads, before it combines them to hidden_size."""
        return self.hidden_size * len(self.target_layer_ids or [None])

    @classmethod
    def for_target(cls, target_config: PretrainedConfig, **overrides: Any) -> "FlashConfig":
        """A draft sized for `target_config`: its attention shape matches the target's, so the draft's
        KV cache sits in the target's KV cache group in vLLM."""
        facts = target_facts(target_config)
        text = target_config.get_text_config()
        heads = text.num_attention_heads
        fields = dict(
            target_architecture=facts["architecture"],
            hidden_size=facts["hidden_size"],
            vocab_size=facts["vocab_size"],
            image_token_id=facts["image_token_id"],
            video_token_id=facts["video_token_id"],
            target_uses_mrope=facts["uses_mrope"],
            target_num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(text),
            max_position_embeddings=text.max_position_embeddings,
            compressor_key_norm=True,
        )
        fields.update(overrides)
        return cls(**fields)


def _rope_theta(text_config: PretrainedConfig) -> float:
    theta = getattr(text_config, "rope_theta", None)
    if theta is None:
        params = getattr(text_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def target_facts(target_config: PretrainedConfig) -> dict[str, Any]:
    """The facts about a target LMM that a draft must agree with, read from its HF config."""
    text = target_config.get_text_config()
    image_token_id = getattr(target_config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(target_config, "image_token_index", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    uses_mrope = bool(rope.get("mrope_section")) if isinstance(rope, dict) else False
    vision = getattr(target_config, "vision_config", None)
    return {
        "architecture": (target_config.architectures or [""])[0],
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "image_token_id": image_token_id,
        "video_token_id": getattr(target_config, "video_token_id", None),
        "uses_mrope": uses_mrope,
        # where M-RoPE puts visual tokens (Qwen2-VL family): merged patches per side, and time steps per second
        "spatial_merge_size": getattr(vision, "spatial_merge_size", None),
        "tokens_per_second": getattr(vision, "tokens_per_second", None),
    }


def validate_against_target(draft: FlashConfig, target_config: PretrainedConfig,
                            num_speculative_tokens: int | None = None) -> None:
    """Refuse a draft that does not fit `target_config`, or a K it was not built for.

    Every mismatch is reported at once, each naming the field, the draft's value and the target's.
    """
    facts = target_facts(target_config)
    draft_values = {
        "architecture": draft.target_architecture,
        "hidden_size": draft.hidden_size,
        "vocab_size": draft.vocab_size,
        "image_token_id": draft.image_token_id,
        "video_token_id": draft.video_token_id,
        "uses_mrope": draft.target_uses_mrope,
    }
    problems = [
        f"{name}: draft has {draft_values[name]!r}, target has {facts[name]!r}"
        for name in draft_values
        if draft_values[name] != facts[name]
    ]
    depth = target_config.get_text_config().num_hidden_layers
    if draft.target_layer_ids and draft.target_num_hidden_layers != depth:
        problems.append(f"num_hidden_layers: the draft reads target layers {draft.target_layer_ids} of a "
                        f"{draft.target_num_hidden_layers}-layer target, the target has {depth}")
    if num_speculative_tokens is not None and num_speculative_tokens > draft.num_speculative_tokens:
        problems.append(
            f"num_speculative_tokens: requested {num_speculative_tokens}, but the draft has "
            f"{draft.num_speculative_tokens} slots (it was built for K <= {draft.num_speculative_tokens})")
    if problems:
        raise FlashConfigError("FLASH draft does not fit the target model:\n  " + "\n  ".join(problems))
