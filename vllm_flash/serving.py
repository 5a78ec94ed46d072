"""What vLLM needs to know to serve a FLASH draft: config checks at start-up, and where each request's
images and video frames lie in its token sequence."""
from __future__ import annotations

from typing import Any

from .checkpoint import load_draft_config
from .config import validate_against_target


def prepare_flash_speculative_config(spec: Any) -> None:
    """Called from vLLM's SpeculativeConfig for method='flash', before the draft's ModelConfig is built.
    Raises (so vLLM refuses to start) with a message naming any problem with the draft."""
    if spec.model is None:
        raise ValueError("speculative method 'flash' needs 'model': the directory of a FLASH draft "
                         "(made by `vllm-flash init` or `vllm-flash train`)")
    draft_config = load_draft_config(spec.model)
    if spec.target_model_config is not None:
        validate_against_target(draft_config, spec.target_model_config.hf_config, spec.num_speculative_tokens)
    if spec.num_speculative_tokens is None:
        spec.num_speculative_tokens = draft_config.num_speculative_tokens
    # The draft is a plain eager module (no torch.compile / CUDA-graph capture of its custom inputs).
    spec.enforce_eager = True


def _num_frames(feature: Any) -> int:
    """Frames of one multimodal item: the temporal grid of a video (one per temporal patch), else 1."""
    if feature.modality != "video" or feature.data is None:
        return 1
    for key in ("video_grid_thw", "grid_thw"):
        try:
            elem = feature.data[key]
        except (KeyError, TypeError):
            continue
        grid = getattr(elem, "data", elem)
        return max(1, int(grid.reshape(-1)[0]))
    return 1


def request_frames(mm_features: list[Any]) -> list[tuple[int, int]]:
    """(start, length) in token indices of every image and video frame of one request, in order."""
    frames = []
    for feature in mm_features:
        pos = feature.mm_position
        runs = [(pos.offset, pos.length)]
        if pos.is_embed is not None:
            # Only embedding positions carry visual features; split them into contiguous runs.
            flags = pos.is_embed.tolist()
            runs, start = [], None
            for i, flag in enumerate(flags + [False]):
                if flag and start is None:
                    start = i
                elif not flag and start is not None:
                    runs.append((pos.offset + start, i - start))
                    start = None
        n = _num_frames(feature)
        if len(runs) == 1 and n > 1:
            offset, length = runs[0]
            per = length // n
            runs = [(offset + f * per, per) for f in range(n)]
        frames.extend(runs)
    return frames
