"""The model runner builds a FlashProposer for method='flash'.

The runner picks its drafter in an if/elif chain; with `use_eagle()` true for flash it constructs an
EagleProposer. FlashProposer subclasses EagleProposer, so constructing it in that place keeps every
`isinstance(drafter, EagleProposer)` branch of the runner (hidden-state plumbing, KV cache, metrics).
"""
from __future__ import annotations

from . import Patch, register


def _flash_new(original):
    def __new__(cls, vllm_config, *args, **kwargs):
        spec = vllm_config.speculative_config
        if cls.__name__ == "EagleProposer" and spec is not None and spec.method == "flash":
            from vllm_flash.proposer import FlashProposer

            cls = FlashProposer
        return object.__new__(cls)

    return __new__


register(Patch("vllm.v1.spec_decode.eagle:EagleProposer", "__new__",
               why="EagleProposer(...) builds a FlashProposer (its subclass) when method='flash'",
               make=_flash_new))
