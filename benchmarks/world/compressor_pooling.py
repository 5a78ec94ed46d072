"""How sharply a FLASH draft's compressor pools its images and video frames, on training features.

For each image or frame it takes the latents' pooling weights (`LatentCompressor.weights`) and reports their
entropy as a share of uniform pooling's (1.0: every latent is the frame's mean; 0: each latent is one token)
and the largest weight per latent. This is how the toy world's compressor was found to pool every frame to
about its mean (entropy 0.95) before its queries were made larger and its keys normalised.

    .venv/bin/python benchmarks/world/compressor_pooling.py --draft assets/world/drafts/flash \
        --features build/world/features-layers [--samples 600] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch


def pooling_stats(draft, samples: Iterable) -> dict:
    """Mean normalised entropy and mean largest weight of the compressor's pooling over every image / frame of
    `samples` (`vllm_flash.train.Sample`s: layer_states or features, and frames)."""
    compressor = draft.compressor
    if compressor is None:
        raise SystemExit("this draft has no compressor (num_latents = 0)")
    entropies, largest, frames = [], [], 0
    with torch.no_grad():
        for sample in samples:
            if not sample.frames:
                continue
            states = sample.layer_states if draft.config.target_layer_ids else sample.features
            features = draft.combine_features(states.float())
            for start, length in sample.frames:
                if length < 2:
                    continue  # one token: nothing to choose between
                weights = compressor.weights(features[None, start:start + length],
                                             torch.ones(1, length, dtype=torch.bool))[0]
                entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1) / math.log(length)
                entropies.append(entropy.mean().item())
                largest.append(weights.max(-1).values.mean().item())
                frames += 1
    if not frames:
        raise SystemExit("no images or frames in these samples")
    return {"frames": frames, "normalised_entropy": sum(entropies) / frames,
            "largest_weight": sum(largest) / frames}


def main(argv: list[str] | None = None) -> dict:
    from vllm_flash.checkpoint import load_draft
    from vllm_flash.data import FeatureShards

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", required=True)
    p.add_argument("--features", required=True, help="a feature directory of the draft's target")
    p.add_argument("--samples", type=int, default=600, help="every n-th sample is read, this many in all")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    draft = load_draft(args.draft).float()
    shards = FeatureShards(args.features)
    stride = max(1, len(shards) // args.samples)
    stats = pooling_stats(draft, (shards[i] for i in range(0, len(shards), stride)))
    stats["draft"] = args.draft
    print(json.dumps(stats, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1) + "\n")
    return stats


if __name__ == "__main__":
    main()
