"""A small LLaVA-format data set on disk, with one bad row of each kind."""
from __future__ import annotations

import json
import random
from pathlib import Path

from vllm_flash.tiny_targets import CORPUS_WORDS, random_image

BAD_ROWS = {"missing image": 1, "corrupt image": 1, "malformed row": 3, "too long": 1}


def write_toy_dataset(root: Path, n_good: int = 12, seed: int = 0, image_size: int = 112,
                      with_bad: bool = True, with_video: bool = True) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = lambda k: " ".join(rng.choice(CORPUS_WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n_good):
        kind = ["text", "image", "two_images", "video"][i % (4 if with_video else 3)]
        row = {"id": f"good{i}", "conversations": [{"from": "human", "value": words(6)},
                                                   {"from": "gpt", "value": words(12)}]}
        if kind in ("image", "two_images"):
            names = []
            for j in range(1 if kind == "image" else 2):
                name = f"img{i}_{j}.png"
                random_image(seed * 1000 + i * 10 + j, image_size).save(root / name)
                names.append(name)
            row["image"] = names[0] if len(names) == 1 else names
            row["conversations"][0]["value"] = "<image>\n" * len(names) + words(6)
        elif kind == "video":
            folder = root / f"clip{i}"
            folder.mkdir(exist_ok=True)
            for f in range(4):
                random_image(seed * 1000 + i * 10 + f, image_size).save(folder / f"{f:03d}.png")
            row["video"] = folder.name
            row["conversations"][0]["value"] = "<video>\n" + words(6)
        rows.append(json.dumps(row))
    if with_bad:
        (root / "corrupt.png").write_bytes(b"this is not an image")
        rows += [
            json.dumps({"id": "bad-missing", "image": "nowhere.png",
                        "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "a"}]}),
            json.dumps({"id": "bad-corrupt", "image": "corrupt.png",
                        "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "a"}]}),
            '{"id": "bad-json", "conversations": [',
            json.dumps({"id": "bad-noconv", "image": "img1_0.png"}),
            json.dumps({"id": "bad-markers", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                {"from": "gpt", "value": "a"}]}),
            json.dumps({"id": "bad-long", "conversations": [{"from": "human", "value": words(3000)},
                                                             {"from": "gpt", "value": "a"}]}),
        ]
    path = root / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path
