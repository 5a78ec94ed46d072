"""A small multimodal world with real structure, for training a toy target LMM and benchmarking drafts.

Three seeded, deterministic tasks over scenes of coloured shapes on a 3x3 grid:
- image captioning: which objects there are, where, and how they relate;
- visual question answering about a scene;
- video captioning: 4-8 frames in which objects move, appear and disappear.
Objects co-occur (stars are mostly yellow, large objects sit low, circles come in pairs more often), so a
good model can predict several words at once. `write_split` writes LLaVA-format JSONL with the images /
frame folders next to it, which `vllm-flash train` and `vllm-flash eval` read directly.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (150, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle", "star")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
TASKS = ("image_caption", "visual_qa", "video_caption")
# Pixels per side: 84 makes each grid cell exactly one of Qwen2.5-VL's merged 28-px visual tokens. At 112 px the
# 3x3 cells lay across a 4x4 token grid, each object spread over up to four tokens shared with its neighbours,
# and a target trained there kept misreading shapes that its vision tower encoded (benchmarks/world/
# image_size_ab.py measured the difference).
IMAGE_SIZE = 84


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str  # "small" | "large"
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def place(self) -> str:
        return "the middle" if (self.row, self.col) == (1, 1) else f"the {ROWS[self.row]} {COLS[self.col]}"


def sample_scene(rng: random.Random, n: int | None = None) -> list[Obj]:
    n = n or rng.choice([2, 3, 3, 4, 5])
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    objects = []
    for row, col in cells:
        if objects and rng.random() < 0.3:  # pairs: repeat the previous shape in another colour
            shape = objects[-1].shape
        else:
            shape = rng.choice(SHAPES)
        color = "yellow" if shape == "star" and rng.random() < 0.7 else rng.choice(list(COLORS))
        size = "large" if row == 2 and rng.random() < 0.7 else rng.choice(["small", "large"])
        objects.append(Obj(shape, color, size, row, col))
    return sorted(objects, key=lambda o: (o.row, o.col))


def background(size: int):
    """A light background lit unevenly, as photographs are: redder to the right, bluer to the bottom. It also
    tells each image patch where it is. Qwen2.5-VL's vision tower knows positions only relatively (rotary), so
    on a flat background "left" and "right" look the same to it, and a small target trained on 2 cores kept
    confusing them."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[..., 0] = 200 + 50 * ramp[None, :]
    pixels[..., 1] = 238
    pixels[..., 2] = 200 + 50 * ramp[:, None]
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def render(objects: list[Obj], size: int = IMAGE_SIZE):
    from PIL import ImageDraw

    img = background(size)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for o in objects:
        cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = cell * (0.42 if o.size == "large" else 0.24)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.regular_polygon((cx, cy, r), 5, fill=fill)
    return img


def _relation(a: Obj, b: Obj) -> str | None:
    if a.row == b.row and abs(a.col - b.col) == 1:
        return "to the left of" if a.col < b.col else "to the right of"
    if a.col == b.col and abs(a.row - b.row) == 1:
        return "above" if a.row < b.row else "below"
    return None


def caption(objects: list[Obj]) -> str:
    n = len(objects)
    parts = [f"The picture shows {NUMBERS[n]} objects on a light background."]
    for o in objects:
        parts.append(f"A {o.name} is in {o.place}.")
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            rel = _relation(a, b)
            if rel:
                parts.append(f"The {a.color} {a.shape} is {rel} the {b.color} {b.shape}.")
    colors = sorted({o.color for o in objects})
    parts.append(f"The colors are {', '.join(colors[:-1]) + ' and ' + colors[-1] if len(colors) > 1 else colors[0]}.")
    return " ".join(parts)


def question(rng: random.Random, objects: list[Obj]) -> tuple[str, str]:
    o = rng.choice(objects)
    kind = rng.choice(["count", "color", "where", "shape_count"])
    if kind == "where" and sum((x.color, x.shape) == (o.color, o.shape) for x in objects) > 1:
        # two objects fit "the yellow star": no answer would be the right one (a quarter of the "where"
        # questions, stars being mostly yellow), so ask about its colour, which its place names uniquely. The
        # draws stay the same, so every other question is what it was.
        kind = "color"
    if kind == "count":
        return "How many objects are in the picture?", (
            f"There are {NUMBERS[len(objects)]} objects in the picture: "
            + ", ".join(f"a {x.name}" for x in objects) + ".")
    if kind == "color":
        return f"What color is the {o.shape} in {o.place}?", f"The {o.shape} in {o.place} is {o.color}. It is {o.size}."
    if kind == "where":
        return f"Where is the {o.color} {o.shape}?", f"The {o.color} {o.shape} is in {o.place}. It is {o.size}."
    same = [x for x in objects if x.shape == o.shape]
    return f"How many {o.shape}s are there?", (
        f"There {'is' if len(same) == 1 else 'are'} {NUMBERS[len(same)]} {o.shape}{'' if len(same) == 1 else 's'}: "
        + ", ".join(f"a {x.color} one in {x.place}" for x in same) + ".")


def question_kind(text: str) -> str:
    """Which of `question`'s kinds a question is, by its wording."""
    if text.startswith("How many objects "):
        return "count"
    for kind, opening in (("shape_count", "How many "), ("color", "What color "), ("where", "Where is ")):
        if text.startswith(opening):
            return kind
    raise ValueError(f"not a question of the toy world: {text!r}")


# How a clip's caption words its events. "direction", the first grammar, named a move's direction before its
# destination ("The red circle moves right to the top center."): a target trained on it read the direction at
# guessing level, though it could say which object moved and where a new object appeared. "destination" names
# the place the object moves to, which it can see in the later frame ("The red circle moves to the top
# center."), and says "one object", not "one objects". The frames are the same under both.
CLIP_GRAMMARS = ("destination", "direction")


def sample_clip(rng: random.Random, grammar: str = "destination") -> tuple[list[list[Obj]], str]:
    """4-8 frames; each step one object moves one cell, appears, or disappears. Returns frames and caption."""
    if grammar not in CLIP_GRAMMARS:
        raise ValueError(f"unknown clip grammar {grammar!r}; choose from {CLIP_GRAMMARS}")
    frames = [sample_scene(rng, rng.choice([2, 3]))]
    events = []
    for t in range(1, rng.randint(4, 8)):
        scene = list(frames[-1])
        used = {(o.row, o.col) for o in scene}
        free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in used]
        action = rng.choice(["move", "move", "appear", "disappear"])
        if action == "disappear" and len(scene) > 1:
            gone = rng.choice(scene)
            scene.remove(gone)
            events.append(f"In frame {NUMBERS[t + 1] if t + 1 < len(NUMBERS) else t + 1} the {gone.color} "
                          f"{gone.shape} disappears.")
        elif action == "appear" and free:
            row, col = rng.choice(free)
            new = sample_scene(rng, 1)[0]
            new = Obj(new.shape, new.color, new.size, row, col)
            scene.append(new)
            events.append(f"Then a {new.name} appears in {new.place}.")
        else:
            o = rng.choice(scene)
            moves = [(o.row + dr, o.col + dc, name) for dr, dc, name in
                     ((0, 1, "right"), (0, -1, "left"), (1, 0, "down"), (-1, 0, "up"))
                     if 0 <= o.row + dr < 3 and 0 <= o.col + dc < 3 and (o.row + dr, o.col + dc) not in used]
            if moves:
                row, col, name = rng.choice(moves)
                moved = Obj(o.shape, o.color, o.size, row, col)
                scene[scene.index(o)] = moved
                direction = f"{name} " if grammar == "direction" else ""
                events.append(f"The {o.color} {o.shape} moves {direction}to {moved.place}.")
            else:
                events.append(f"The {o.color} {o.shape} stays in {o.place}.")
        frames.append(sorted(scene, key=lambda x: (x.row, x.col)))
    start, end = frames[0], len(frames[-1])
    objects = "objects" if end > 1 or grammar == "direction" else "object"
    text = (f"The video has {NUMBERS[len(frames)] if len(frames) < len(NUMBERS) else len(frames)} frames. "
            f"At the start there is " + ", ".join(f"a {o.name} in {o.place}" for o in start) + ". "
            + " ".join(events) + f" At the end there {'is' if end == 1 else 'are'} {NUMBERS[end]} {objects}.")
    return frames, text


def example(task: str, seed: int, clip_grammar: str = "destination") -> dict:
    """One example as plain data: {"task", "question", "answer", "scenes": [objects per image/frame]}."""
    rng = random.Random(f"{task}:{seed}")
    if task == "image_caption":
        scene = sample_scene(rng)
        return {"task": task, "question": "Describe the picture.", "answer": caption(scene), "scenes": [scene]}
    if task == "visual_qa":
        scene = sample_scene(rng)
        q, a = question(rng, scene)
        return {"task": task, "question": q, "answer": a, "scenes": [scene]}
    if task == "video_caption":
        frames, text = sample_clip(rng, clip_grammar)
        return {"task": task, "question": "Describe what happens in the video.", "answer": text, "scenes": frames}
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def shares_a_colour(scenes: list[list[Obj]]) -> bool:
    """Whether objects of two shapes share a colour anywhere in an example's scenes. A clip's event sentences
    ("The blue circle moves to ...") then tell them apart by shape alone: which of the two moved is what the
    shipped target gets wrong most often (benchmarks/world/README.md)."""
    kinds = {(o.color, o.shape) for scene in scenes for o in scene}
    return len({color for color, _ in kinds}) < len(kinds)


SPLIT_SEEDS = {"train": 0, "heldout": 1_000_000}  # disjoint seed ranges


# The sentence kinds the world's answers are made of, told apart by their wording (the first pattern that
# matches names the kind), so that a target's errors can be counted by what it got wrong: an object it saw, or a
# relation or event it had to work out.
SENTENCE_KINDS = (
    ("count", r"^(The picture shows|There (is|are)) "),
    ("object", r"^A (small|large) \w+ \w+ is in "),
    ("relation", r" is (above|below|to the left of|to the right of) the "),
    ("colors", r"^The colors are "),
    ("size", r"^It is (small|large)$"),
    ("color", r"^The \w+ in the [\w ]+ is \w+$"),
    ("place", r"^The \w+ \w+ is in "),
    ("frames", r"^The video has "),
    ("start", r"^At the start "),
    ("end", r"^At the end "),
    ("appear", r" appears in "),
    ("disappear", r" disappears$"),
    ("move", r" (moves|stays) "),
)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in text.strip().rstrip(".").split(". ") if s.strip()]


def sentence_kind(sentence: str, strict: bool = True) -> str:
    """The kind of one sentence of the world's grammar; with `strict=False` (a model's output) any other
    sentence is "unparsed"."""
    for kind, pattern in SENTENCE_KINDS:
        if re.search(pattern, sentence):
            return kind
    if strict:
        raise ValueError(f"not a sentence of the toy world's grammar: {sentence!r}")
    return "unparsed"


def wrong_sentences(output: str, reference: str) -> tuple[Counter, Counter]:
    """Per kind, the reference's sentences that the output lacks and the output's that the reference lacks
    (as multisets: order aside). A wrong relation is one of each; a made-up one is extra only."""
    said, meant = Counter(sentences(output)), Counter(sentences(reference))
    return (Counter(sentence_kind(s) for s in (meant - said).elements()),
            Counter(sentence_kind(s, strict=False) for s in (said - meant).elements()))


def shape_swaps(output: str, reference: str, scenes: list[list[Obj]]) -> Counter:
    """The output's sentences that are a missing reference sentence with one shape word changed, counted by
    whether the shape said is another object of the colour named before it in the scenes ("other object") or
    not ("no such object"): how often a wrong object is one that shares the colour of the right one."""
    said, meant = Counter(sentences(output)), Counter(sentences(reference))
    missing, extra = list((meant - said).elements()), list((said - meant).elements())
    objects = {(o.color, o.shape) for scene in scenes for o in scene}
    swaps: Counter = Counter()
    for wrong in extra:
        for right in missing:
            pairs = [(a, b) for a, b in zip(right.split(), wrong.split()) if a != b]
            if len(right.split()) != len(wrong.split()) or len(pairs) != 1:
                continue
            true, spoken = pairs[0]
            if true not in SHAPES or spoken not in SHAPES:
                continue
            colour = right.split()[right.split().index(true) - 1]
            swaps["other object" if (colour, spoken) in objects else "no such object"] += 1
            missing.remove(right)
            break
    return swaps


def write_row(job: tuple) -> str:
    """One row of `write_split`: its media written under `out`, its JSONL line returned."""
    out, task, split, i, image_size = job
    ex = example(task, SPLIT_SEEDS[split] + i)
    row = {"id": f"{task}-{split}-{i}", "conversations": [
        {"from": "human", "value": ("<video>\n" if task == "video_caption" else "<image>\n") + ex["question"]},
        {"from": "gpt", "value": ex["answer"]}]}
    media = out / f"{task}-{split}"
    if task == "video_caption":
        folder = media / f"{i:06d}"
        folder.mkdir(exist_ok=True)
        for f, scene in enumerate(ex["scenes"]):
            render(scene, image_size).save(folder / f"{f:03d}.png")
        row["video"] = str(folder.relative_to(out))
    else:
        name = media / f"{i:06d}.png"
        render(ex["scenes"][0], image_size).save(name)
        row["image"] = str(name.relative_to(out))
    return json.dumps(row)


def write_split(out_dir: str | Path, task: str, split: str, n: int, image_size: int = IMAGE_SIZE,
                workers: int = 1) -> Path:
    """LLaVA-format JSONL (+ images or frame folders) for `n` examples of one task and split, rendered by
    `workers` processes (every row depends on its seed alone, so the files are the same for any number)."""
    out = Path(out_dir)
    (out / f"{task}-{split}").mkdir(parents=True, exist_ok=True)
    jobs = [(out, task, split, i, image_size) for i in range(n)]
    if workers > 1 and n > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(write_row, jobs, chunksize=max(1, n // (8 * workers)))
    else:
        rows = [write_row(job) for job in jobs]
    path = out / f"{task}-{split}.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def image_size_of(target: str | Path) -> int:
    """The image size a toy-world target was trained at, so that it is asked about images of that size: its
    processor caps an image at image_size^2 pixels (`build_tiny_qwen2_5_vl`)."""
    import math

    processor = json.loads((Path(target) / "processor_config.json").read_text())
    return math.isqrt(processor["image_processor"]["size"]["longest_edge"])


def request(task: str, index: int, image_size: int = IMAGE_SIZE, split: str = "heldout") -> tuple[dict, str]:
    """An example of a split (held-out unless asked) as a Qwen2.5-VL vLLM request (rendered in memory) and its
    reference answer."""
    import numpy as np

    from .data import video_input
    from .tiny_targets import chat_prompt

    ex = example(task, SPLIT_SEEDS[split] + index)
    if task == "video_caption":
        frames = np.stack([np.asarray(render(scene, image_size)) for scene in ex["scenes"]])
        request = {"prompt": chat_prompt("qwen2_5_vl", ex["question"], video=True),
                   "multi_modal_data": {"video": video_input(frames)}}
    else:
        request = {"prompt": chat_prompt("qwen2_5_vl", ex["question"], images=1),
                   "multi_modal_data": {"image": render(ex["scenes"][0], image_size)}}
    return request, ex["answer"]
