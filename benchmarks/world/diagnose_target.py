"""Where the toy target goes wrong: teacher-forced loss and next-token accuracy per task on training and on
held-out rows (equal: under-fitted, train better: over-fitted), the reference words it misses most, and how
often it misses the place an object moves to in a video caption, by whether the move happens inside one of the
frame pairs that Qwen2.5-VL's vision tower sees together or across two pairs.

    .venv/bin/python benchmarks/world/diagnose_target.py --world build/world --stages shallow-4,deep
    .venv/bin/python benchmarks/world/diagnose_target.py --world build/world --rows 60 --probe-rows 600
    .venv/bin/python benchmarks/world/diagnose_target.py --world build/world --stages target --shape-questions 600
    .venv/bin/python benchmarks/world/diagnose_target.py --world build/world --stages target --count-readout 2400
    .venv/bin/python benchmarks/world/diagnose_target.py --world build/world --stages target --shape-counts 1600

A stage is any checkpoint folder under WORLD (shallow, shallow-2, ..., deep). About 2 min on 2 cores for one stage
at the default 48 rows per task and split (most of it encoding the rows).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_target  # noqa: E402

from vllm_flash import world as toy_world  # noqa: E402


def rows(world: Path, task: str, split: str, n: int) -> list:
    """The first n rows of a task's split, encoded as the target's training saw them."""
    data = world / "data"
    subset = data / f".diagnose-{task}-{split}.jsonl"  # beside the data: rows name their media relative to it
    subset.write_text("\n".join((data / f"{task}-{split}.jsonl").read_text().splitlines()[:n]) + "\n")
    try:
        return train_target.encode_split(world / "shallow-init", subset)
    finally:
        subset.unlink()


def move_destinations(words: list[str], hits: list[bool]):
    """(where, hit) for each move in one video caption's words ("... moves to the top center."), hit when every
    word naming the destination is. The caption's event k (k = 1, 2, ...; sentence k + 1 after the frame count
    and the first scene) is the change from frame k - 1 to frame k, and the vision tower sees each group of
    FRAMES_PER_GROUP frames (a pair) together."""
    group = train_target.FRAMES_PER_GROUP
    sentence = 0
    for i, word in enumerate(words):
        if word == "moves" and words[i + 1:i + 3] == ["to", "the"]:
            k = sentence - 1
            inside = (k - 1) // group == k // group
            place = slice(i + 3, words.index(".", i))  # "top center", "middle right", or "middle" alone
            yield "inside a frame pair" if inside else "across frame pairs", all(hits[place])
        sentence += word.endswith(".")


WORD_KINDS = {"shape": set(toy_world.SHAPES), "colour": set(toy_world.COLORS),
              "place": set(toy_world.ROWS) | set(toy_world.COLS)}


@torch.no_grad()
def diagnose(model, samples: list, tokenizer, batch_size: int = 8) -> dict:
    loss, right, total = 0.0, 0, 0
    missed, seen = collections.Counter(), collections.Counter()
    destinations = collections.defaultdict(lambda: [0, 0])  # where -> [missed, seen]
    for i in range(0, len(samples), batch_size):
        batch = train_target.collate(samples[i:i + batch_size])
        for logits, labels in zip(model(**batch).logits[:, :-1], batch["labels"][:, 1:]):
            keep = labels != -100
            logits, labels = logits[keep], labels[keep]
            loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            hits = (logits.argmax(-1) == labels).tolist()
            right += sum(hits)
            total += len(hits)
            words = [tokenizer.decode([t]).strip() for t in labels.tolist()]
            seen.update(words)
            missed.update(w for w, h in zip(words, hits) if not h)
            for where, hit in move_destinations(words, hits):
                destinations[where][0] += not hit
                destinations[where][1] += 1
    worst = [(w, f"{missed[w]}/{seen[w]}") for w, _ in missed.most_common(8)]
    return {"loss": round(loss / total, 4), "token_accuracy": round(right / total, 4), "most_missed": worst,
            "missed_by_kind": {kind: f"{sum(missed[w] for w in words)}/{sum(seen[w] for w in words)}"
                               for kind, words in WORD_KINDS.items()},
            "move_destination_missed": {where: f"{m}/{n}" for where, (m, n) in sorted(destinations.items())}}


@torch.no_grad()
def visual_groups(model, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups, tokens, hidden) outputs of the vision tower and (groups, 2, 9, 3) labels of what each grid cell
    holds, one group per image or video frame pair, as the training probe reads them."""
    features, labels = [], []
    for s in samples:
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if pixels in s.inputs:
                out = model.model.visual(s.inputs[pixels].float(), grid_thw=s.inputs[grid]).pooler_output
                labels.append(train_target.scene_labels(s.row_id))
                features.append(out.reshape(len(labels[-1]), -1, out.shape[-1]))
    return torch.cat(features), torch.cat(labels)


def probe_readout(fit: tuple, checks: dict, steps: int = 400) -> dict:
    """Fit a fresh probe (the training one) on the frozen tower's outputs for `fit`, then the share of occupied
    cells whose shape, colour and size it reads right (and of shapes alone) on each set in `checks`. Equal on
    rows the target trained on and on held-out rows: the tower generalises, so misread objects in held-out
    captions come from the language model; lower held out: the tower has learned its training scenes."""
    x, y = fit
    probe = train_target.VisionProbe(x.shape[1], x.shape[2])
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(steps):
        loss = probe.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = {}
    with torch.no_grad():
        for name, (xc, yc) in checks.items():
            guess = torch.stack([part.argmax(-1) for part in probe.logits(xc, len(yc))], dim=-1)
            occupied = yc[..., 0] > 0
            right = (guess == yc)[occupied]
            result[name] = {"objects_read_right": round(right.all(-1).float().mean().item(), 4),
                            "shapes_read_right": round(right[:, 0].float().mean().item(), 4),
                            "objects": int(occupied.sum())}
    return result


@torch.no_grad()
def shape_question_attention(model, samples: list, image_token_id: int, tokenizer) -> dict:
    """Where the target looks when it says how many objects of a shape there are ("How many triangles are
    there?" "There are two ..."): at the position that predicts the count, per layer, the head whose attention
    on the picture's objects falls most on the asked shape's cells, and that share, for the questions whose count
    it gets right and those it gets wrong, beside the share those cells are of the objects. A head near 1 picks
    the shape's objects out; near the baseline it does not look by shape."""
    per_layer = collections.defaultdict(lambda: {"right": [], "wrong": []})
    counted = collections.Counter()
    for s in samples:
        positions = train_target.shape_question_positions(s, tokenizer, image_token_id)
        if positions is None:
            continue
        # from the question's shape word on: a count found there is carried to the count's predictor
        looking, objects, asked = positions
        out = model(**train_target.collate([s]), output_attentions=True)
        at = looking.stop - 1  # "There are|two"
        right = out.logits[0, at].argmax().item() == s.token_ids[at + 1].item()
        counted["right" if right else "wrong"] += 1
        span = looking.stop - looking.start
        for layer, attention in enumerate(out.attentions):
            on_objects = attention[0][:, looking][:, :, objects]  # (heads, positions, objects)
            share = (on_objects[..., asked].sum(-1) / on_objects.sum(-1).clamp_min(1e-9)).flatten()
            per_layer[layer]["right" if right else "wrong"].append(
                torch.stack([share, asked.float().mean().expand_as(share)]))
    result = {"questions": dict(counted), "layers": {}}
    for layer, groups in per_layer.items():
        both = torch.stack(groups["right"] + groups["wrong"])  # (questions, 2, heads x positions)
        best = int(both[:, 0].mean(0).argmax())
        result["layers"][layer] = {"head": best // span, "tokens_before_count": span - 1 - best % span, **{
            kind: [round(torch.stack(g)[:, 0, best].mean().item(), 3), round(torch.stack(g)[:, 1, best].mean().item(), 3)]
            for kind, g in groups.items() if g}}
    return result


POSITIONS = ("one or more", "count")  # the names of train_target.DECIDING's two positions


@torch.no_grad()
def count_states(model, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """For each shape question among `samples`, teacher-forced: the residual stream at every layer (the
    embeddings first) at the position that says "is" or "are" (one or more) and at the one that predicts the
    count, (questions, 2, layers + 1, hidden); and how many objects have the asked shape."""
    states, counts = [], []
    for s in samples:
        question = train_target.shape_question(s.row_id)
        if not question:
            continue
        shape, scene = question
        hidden = model(**train_target.collate([s]), output_hidden_states=True).hidden_states
        states.append(torch.stack([h[0, train_target.deciding(s)] for h in hidden], dim=1))
        counts.append(sum(o.shape == shape for o in scene))
    return torch.stack(states), torch.tensor(counts)


@torch.no_grad()
def picture_states(model, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """For each question among `samples` (of any kind), teacher-forced: the residual stream at every layer (the
    embeddings first) at the last prompt token, (questions, 1, layers + 1, hidden), where the whole picture and
    question have been seen and nothing of the answer; and how many objects of each shape the picture holds,
    (questions, shapes)."""
    states = [torch.stack([h[0, s.target_from - 1] for h in
                           model(**train_target.collate([s]), output_hidden_states=True).hidden_states])
              for s in samples]
    return torch.stack(states).unsqueeze(1), torch.stack([train_target.shape_counts(s.row_id) for s in samples])


def linear_readout(fit: tuple, check: tuple, steps: int = 300) -> dict:
    """Per position and layer of `fit`'s and `check`'s states (questions, positions, layers, hidden), a linear
    read-out of the counts (questions[, counts per question]) fitted on `fit` and scored on `check`: the share of
    its counts right, over all and over those of two or more."""
    (xf, yf), (xc, yc) = fit, check
    yf, yc = yf.view(len(yf), -1), yc.view(len(yc), -1)
    classes = int(max(yf.max(), yc.max())) + 1
    many = yc >= 2
    result = []
    for position in range(xf.shape[1]):
        layers = {}
        for layer in range(xf.shape[2]):
            x = xf[:, position, layer]
            mean, scale = x.mean(0), x.std(0) + 1e-6
            read = torch.nn.Linear(x.shape[-1], yf.shape[1] * classes)
            opt = torch.optim.AdamW(read.parameters(), lr=1e-2, weight_decay=0.05)
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(read((x - mean) / scale).view(-1, classes), yf.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                got = read((xc[:, position, layer] - mean) / scale).view(len(yc), -1, classes).argmax(-1)
            right = got == yc
            layers[layer] = [round(right.float().mean().item(), 3), round(right[many].float().mean().item(), 3)]
        result.append(layers)
    return result


def readout_baseline(counts: torch.Tensor) -> dict:
    """What always saying the commonest count gets (over all, and over counts of two or more)."""
    return {"counts": torch.bincount(counts.flatten()).tolist(), "commonest": [
        round((y == y.flatten().mode().values).float().mean().item(), 3) for y in (counts, counts[counts >= 2])]}


def count_readout(fit: tuple, check: tuple, steps: int = 300) -> dict:
    """Per position and layer, the share of `check`'s counts that a linear read-out fitted on `fit`'s states
    gets right, over all questions and over those with two or more of the shape, beside always saying the
    commonest count. Near that baseline at every layer: the target does not work the count out; it guesses."""
    read = linear_readout(fit, check, steps)
    return {"questions": len(check[1]), **readout_baseline(check[1]), **dict(zip(POSITIONS, read))}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default=str(train_target.ROOT / "build" / "world"))
    p.add_argument("--stages", default="deep", help="comma-separated checkpoint folders under WORLD")
    p.add_argument("--rows", type=int, default=48, help="rows per task and split")
    p.add_argument("--probe-rows", type=int, default=0,
                   help="also fit a linear probe on the vision tower's outputs for this many training images and "
                        "clips, and say how well it reads the objects on other training rows and held out")
    p.add_argument("--count-readout", type=int, default=0,
                   help="only say, per layer, how well a linear read-out finds a shape question's count in the "
                        "target's state: fitted on the shape questions among this many training questions, "
                        "checked on those among a quarter as many held out")
    p.add_argument("--shape-counts", type=int, default=0,
                   help="only say, per layer, how well a linear read-out finds the picture's count of every shape "
                        "in the target's state at the last prompt token: fitted on this many training questions "
                        "(of every kind), checked on a quarter as many held out")
    p.add_argument("--shape-questions", type=int, default=0,
                   help="only look at where each stage attends when it counts a shape, over this many held-out "
                        "questions (about a quarter of them ask that)")
    args = p.parse_args(argv)
    world = Path(args.world)
    if args.count_readout or args.shape_counts:
        with tempfile.TemporaryDirectory() as tmp:
            n = args.count_readout or args.shape_counts
            questions = {split: train_target.encode_split(world / "shallow-init", toy_world.write_split(
                Path(tmp) / split, "visual_qa", split, rows)) for split, rows in (("train", n), ("heldout", n // 4))}
        for stage in args.stages.split(","):
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(world / stage, dtype=torch.float32).eval()
            if args.count_readout:
                found = count_readout(*(count_states(model, questions[split]) for split in ("train", "heldout")))
            else:
                check = picture_states(model, questions["heldout"])
                found = {"questions": len(check[1]), **readout_baseline(check[1]),
                         "last prompt token": linear_readout(picture_states(model, questions["train"]), check)[0]}
            print(json.dumps({"stage": stage, **found}), flush=True)
        return 0
    if args.shape_questions:
        from vllm_flash.checkpoint import load_target_config
        from vllm_flash.config import target_facts

        with tempfile.TemporaryDirectory() as tmp:  # more held-out rows than the data folder holds
            questions = train_target.encode_split(world / "shallow-init", toy_world.write_split(
                tmp, "visual_qa", "heldout", args.shape_questions))
        # every stage has shallow-init's tokenizer; a training checkpoint (deep-3, say) holds none of its own
        tokenizer = AutoTokenizer.from_pretrained(world / "shallow-init")
        for stage in args.stages.split(","):
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                world / stage, dtype=torch.float32, attn_implementation="eager").eval()
            image_token_id = target_facts(load_target_config(world / stage))["image_token_id"]
            print(json.dumps({"stage": stage, **shape_question_attention(model, questions, image_token_id,
                                                                         tokenizer)}), flush=True)
        return 0
    tokenizer = AutoTokenizer.from_pretrained(world / "shallow-init")
    encoded = {(task, split): rows(world, task, split, args.rows)
               for task in toy_world.TASKS for split in ("train", "heldout")}
    visual_tasks = ("image_caption", "video_caption")
    probe_fit = [s for task in visual_tasks for s in rows(world, task, "train", args.rows + args.probe_rows)
                 [args.rows:]] if args.probe_rows else []  # not the rows it is checked on
    for stage in args.stages.split(","):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(world / stage, dtype=torch.float32).eval()
        for (task, split), samples in encoded.items():
            print(json.dumps({"stage": stage, "task": task, "split": split,
                              **diagnose(model, samples, tokenizer)}), flush=True)
        if probe_fit:
            checks = {f"{task} {split}": visual_groups(model, encoded[task, split])
                      for task in visual_tasks for split in ("train", "heldout")}
            print(json.dumps({"stage": stage, "vision_probe": probe_readout(visual_groups(model, probe_fit),
                                                                            checks)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
