"""SpeculativeConfig learns the "flash" method.

vLLM validates `method` against a Literal and builds the draft's ModelConfig in `__post_init__`. FLASH
drafts load like a generic draft model (their own config.json and weights, resolved through vLLM's model
registry), then draft from the target's hidden states with one-pass parallel drafting.
"""
from __future__ import annotations

import typing

from . import Patch, register

METHOD = "flash"


def _widen_method_literal(original: dict) -> dict:
    from vllm.config.speculative import SpeculativeMethod

    annotations = dict(original)
    annotations["method"] = typing.Optional[typing.Literal[SpeculativeMethod, METHOD]]
    return annotations


def _rebuild(cls) -> None:
    # Pydantic validates from a schema built at class creation, and vLLM's CLI reads the dataclass
    # field's type for --spec-method choices: both must see the widened Literal.
    from pydantic.dataclasses import rebuild_dataclass

    cls.__dataclass_fields__["method"].type = cls.__annotations__["method"]
    rebuild_dataclass(cls, force=True)


def _flash_post_init(original):
    def __post_init__(self):
        if self.method != METHOD:
            return original(self)
        from vllm_flash.serving import prepare_flash_speculative_config

        prepare_flash_speculative_config(self)
        # Build the draft ModelConfig the way vLLM does for any separate draft checkpoint.
        self.method = "draft_model"
        try:
            original(self)
        finally:
            self.method = METHOD
        self.parallel_drafting = True

    return __post_init__


def _flash_uses_hidden_states(original):
    def use_eagle(self) -> bool:
        # vLLM's stand-in for "drafts from the target's hidden states".
        return self.method == METHOD or original(self)

    return use_eagle


register(Patch("vllm.config.speculative:SpeculativeConfig", "__annotations__",
               why="admit method='flash' in the validated `method` Literal (and --spec-method choices)",
               make=_widen_method_literal, after=_rebuild))
register(Patch("vllm.config.speculative:SpeculativeConfig", "__post_init__",
               why="for 'flash': validate the draft against the target, build its ModelConfig as a "
                   "separate draft checkpoint, turn on one-pass parallel drafting",
               make=_flash_post_init, after=_rebuild))
register(Patch("vllm.config.speculative:SpeculativeConfig", "use_eagle",
               why="'flash' drafts from target hidden states, so the runner takes its EAGLE path",
               make=_flash_uses_hidden_states))
