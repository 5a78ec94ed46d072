"""How sharply a FLASH draft's compressor pools its images and video frames, on training features.

For each image or frame it takes the latents' pooling weights (`LatentCompressor.weights`) and reports their
entropy as a share of uniform pooling's (1.0: every latent is the frame's mean; 0: each latent is one token)
and the largest weight per latent. This is how the toy world's compressor was found to pool every frame to
about its mean (entropy 0.95) before its queries were made larger and its keys normalised.

    .venv/bin/python benchmarks/world/compressor_pooling.py --draft assets/world/drafts/flash \
        --features build/world/features-layers [--samples 600] [--json out.json]

With `--data`, the JSONL the features were extracted from (the distilled rows), it also scores the image
captions by how many objects their scene has (2 to 5, one per 28-px token of the 3x3 grid): which distinct
tokens the latents pick (each latent's largest weight) and what share of the objects' tokens that covers, and,
teacher-forced, how often each draft slot drafts the target's token, beside `--compare`'s draft (e.g.
flash_nocompress). That is how the image captions' compression loss was found to lie in the 4- and 5-object
scenes, where independent latents picked the same object twice and left one out (README, "Train your own
draft"):

    .venv/bin/python benchmarks/world/compressor_pooling.py --draft assets/world/drafts/flash \
        --features build/world/features-layers --data build/world/data/distill-6000.jsonl \
        --compare assets/world/drafts/flash_nocompress --target assets/world/target
"""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
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


def object_coverage(draft, images: Iterable) -> dict:
    """Per object count: the distinct tokens the latents pick (each latent's largest weight) and the share of the
    objects' tokens among them, over `images`: (frame features (L, feature_size), the objects' token indices)."""
    picked, covered, count = Counter(), Counter(), Counter()
    with torch.no_grad():
        for states, cells in images:
            features = draft.combine_features(states.float())
            weights = draft.compressor.weights(features[None], torch.ones(1, len(features), dtype=torch.bool))[0]
            picks = set(weights.argmax(-1).tolist())
            picked[len(cells)] += len(picks)
            covered[len(cells)] += len(picks & set(cells)) / len(cells)
            count[len(cells)] += 1
    return {n: {"images": count[n], "distinct_picks": round(picked[n] / count[n], 3),
                "object_coverage": round(covered[n] / count[n], 3)} for n in sorted(count)}


def slot_accuracy(draft, samples: list, batch_size: int = 12) -> list[float]:
    """Teacher-forced, the share of answer positions at which each draft slot's token is the target's (the
    target's token read from its own features through the LM head), as training scores it (`flash_loss`)."""
    from vllm_flash.train import collate

    right, total = None, None
    with torch.no_grad():
        for b in range(0, len(samples), batch_size):
            batch = collate(samples[b:b + batch_size])
            predicted = draft(batch["next_ids"], batch["inputs"].float(), batch["frames"])
            target = draft.logits(batch["features"].float()).argmax(-1)
            k = predicted.shape[2]
            right, total = right or [0] * k, total or [0] * k
            for i in range(k):
                span = predicted.shape[1] - 1 - i
                mask = batch["target_mask"][:, 1 + i:] & batch["input_mask"][:, :span]
                right[i] += (draft.logits(predicted[:, :span, i]).argmax(-1) == target[:, 1 + i:])[mask].sum().item()
                total[i] += int(mask.sum())
    return [round(r / max(t, 1), 4) for r, t in zip(right, total)]


def image_captions_by_objects(shards, data: Path, per_count: int) -> dict:
    """The feature samples of the image captions among `data`'s rows (aligned with the features), grouped by their
    scene's object count, at most `per_count` each, with their objects' token indices (row-major, one token a
    grid cell)."""
    from vllm_flash import world

    groups: dict = {}
    for i, line in enumerate(data.read_text().splitlines()):
        task, split, index = json.loads(line)["id"].rsplit("-", 2)
        if task != "image_caption":
            continue
        scene = world.example(task, world.SPLIT_SEEDS[split] + int(index))["scenes"][0]
        group = groups.setdefault(len(scene), [])
        if len(group) < per_count:
            group.append((shards[i], [o.row * 3 + o.col for o in scene]))
    return dict(sorted(groups.items()))


def main(argv: list[str] | None = None) -> dict:
    from vllm_flash.checkpoint import load_draft
    from vllm_flash.data import FeatureShards

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft", required=True)
    p.add_argument("--features", required=True, help="a feature directory of the draft's target")
    p.add_argument("--samples", type=int, default=600, help="every n-th sample is read, this many in all")
    p.add_argument("--json", default=None)
    p.add_argument("--data", help="the JSONL the features were extracted from: score the image captions by object "
                                  "count too")
    p.add_argument("--compare", help="with --data: a second draft of the same target, scored beside it")
    p.add_argument("--target", help="with --data: the target, whose LM head scores the drafts' slots")
    p.add_argument("--per-count", type=int, default=120, help="with --data: image captions per object count")
    args = p.parse_args(argv)
    draft = load_draft(args.draft).float()
    shards = FeatureShards(args.features)
    stride = max(1, len(shards) // args.samples)
    stats = pooling_stats(draft, (shards[i] for i in range(0, len(shards), stride)))
    stats["draft"] = args.draft
    if args.data:
        from vllm_flash.checkpoint import load_target_head

        if not args.target:
            p.error("--data needs --target")
        head = load_target_head(args.target)
        drafts = {args.draft: draft, **({args.compare: load_draft(args.compare).float()} if args.compare else {})}
        for d in drafts.values():
            d.attach_target_head(*head)
            d.eval()
        groups = image_captions_by_objects(shards, Path(args.data), args.per_count)
        images = [((s.layer_states if draft.config.target_layer_ids else s.features)[start:start + length], cells)
                  for group in groups.values() for s, cells in group for start, length in s.frames]
        stats["by_object_count"] = object_coverage(draft, images)
        for n, group in groups.items():
            stats["by_object_count"][n]["slot_accuracy"] = {
                name: slot_accuracy(d, [s for s, _ in group]) for name, d in drafts.items()}
    print(json.dumps(stats, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=1) + "\n")
    return stats


if __name__ == "__main__":
    main()
