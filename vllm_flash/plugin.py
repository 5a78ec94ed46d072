"""vLLM general-plugin entry point: loaded by vLLM in every process (engine, workers, Ray actors)."""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm_flash")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from vllm_flash.config import FlashConfig
    from vllm_flash.patches import apply_all, check_vllm_version

    check_vllm_version()  # raises with the supported versions named
    AutoConfig.register(FlashConfig.model_type, FlashConfig, exist_ok=True)
    ModelRegistry.register_model("FlashDraftModel", "vllm_flash.vllm_model:FlashDraftModel")
    apply_all()
    _registered = True
    logger.debug("vllm-flash registered: method 'flash' is available")
