"""VllmConfig keeps each image whole in one prefill chunk when FLASH drafts.

FLASH compresses each image / video frame from the target features of all its tokens, so the draft must see
them in one forward pass: vLLM's `disable_chunked_mm_input` scheduler option guarantees it.
"""
from __future__ import annotations

from . import Patch, register


def _keep_images_whole(original):
    def __post_init__(self, *args, **kwargs):
        spec = self.speculative_config
        if spec is not None and spec.method == "flash" and not self.scheduler_config.disable_chunked_mm_input:
            self.scheduler_config.disable_chunked_mm_input = True
        return original(self, *args, **kwargs)

    return __post_init__


register(Patch("vllm.config.vllm:VllmConfig", "__post_init__",
               why="with method='flash', set scheduler disable_chunked_mm_input=True so an image is never "
                   "split across prefill chunks",
               make=_keep_images_whole))
