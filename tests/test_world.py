"""The toy multimodal world: deterministic, structured, readable by the training pipeline."""
import hashlib
import json
from collections import Counter

import pytest

from vllm_flash.data import BadDataReport, read_conversations
from vllm_flash.world import (COLORS, NUMBERS, SHAPES, TASKS, Obj, example, question_kind, render, sample_scene,
                              sentence_kind, sentences, shape_swaps, shares_a_colour, write_split, wrong_sentences)


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_long_enough(task):
    words = []
    for seed in range(40):
        a, b = example(task, seed), example(task, seed)
        assert a == b
        words.append(len(a["answer"].split()))
    assert example(task, 0) != example(task, 1)
    if task != "visual_qa":  # captions: 30-120 words, as the benchmark needs
        assert min(words) >= 15 and max(words) <= 120 and sum(words) / len(words) >= 30, words


def test_rendered_pixels_match_the_scene():
    import random

    scene = sample_scene(random.Random(3), 4)
    img = render(scene, 120)
    for o in scene:
        centre = (int((o.col + 0.5) * 40), int((o.row + 0.5) * 40) + (4 if o.shape == "triangle" else 0))
        assert img.getpixel(centre) == COLORS[o.color], o
    # the background tells a patch where it is (the vision tower's positions are only relative)
    empty = render([], 120)
    corner, right, bottom = (empty.getpixel(p) for p in ((5, 5), (114, 5), (5, 114)))
    assert right[0] - corner[0] > 30 and bottom[2] - corner[2] > 30  # redder rightwards, bluer downwards
    assert min(empty.getpixel((60, 60))) > 190  # and still a light background, as the captions say


def test_video_frames_change_and_splits_are_disjoint(tmp_path):
    clip = example("video_caption", 5)
    assert 4 <= len(clip["scenes"]) <= 8 and clip["scenes"][0] != clip["scenes"][-1]
    train = write_split(tmp_path, "image_caption", "train", 5)
    held = write_split(tmp_path, "image_caption", "heldout", 5)
    digest = lambda p: {hashlib.sha1(json.loads(l)["conversations"][1]["value"].encode()).hexdigest()  # noqa: E731
                        for l in p.read_text().splitlines()}
    assert not digest(train) & digest(held)


@pytest.mark.parametrize("task", TASKS)
def test_written_split_reads_through_the_training_pipeline(task, tmp_path):
    path = write_split(tmp_path, task, "train", 4)
    report = BadDataReport()
    conversations = list(read_conversations(path, report))
    assert len(conversations) == 4 and not report.counts
    if task == "video_caption":
        assert all(c.videos and 4 <= len(c.videos[0]) <= 8 for c in conversations)
    else:
        assert all(len(c.images) == 1 for c in conversations)


def test_clip_grammars_word_the_same_frames_and_name_each_move():
    """Both clip grammars describe the same frames; each move names the cell the object entered, and the first
    grammar also its direction, as the cells differ."""
    directions = {(0, 1): "right", (0, -1): "left", (1, 0): "down", (-1, 0): "up"}
    moves = 0
    for seed in range(40):
        now, first = (example("video_caption", seed, grammar) for grammar in ("destination", "direction"))
        assert now["scenes"] == first["scenes"]
        said_now = [s for s in now["answer"].split(". ") if " moves " in s]
        said_first = [s for s in first["answer"].split(". ") if " moves " in s]
        for k in range(1, len(now["scenes"])):
            before, after = ({(o.shape, o.color, o.size, o.row, o.col) for o in f} for f in now["scenes"][k - 1:k + 1])
            if len(before) == len(after) and before != after:
                (left,), (entered,) = before - after, after - before
                place = next(o.place for o in now["scenes"][k] if (o.row, o.col) == entered[3:])
                step = directions[(entered[3] - left[3], entered[4] - left[4])]
                assert said_now.pop(0) == f"The {left[1]} {left[0]} moves to {place}".rstrip(".")
                assert said_first.pop(0) == f"The {left[1]} {left[0]} moves {step} to {place}".rstrip(".")
                moves += 1
        end = len(now["scenes"][-1])
        assert now["answer"].endswith("there is one object." if end == 1 else f"there are {NUMBERS[end]} objects.")
    assert moves > 20
    with pytest.raises(ValueError, match="clip grammar"):
        example("video_caption", 0, "backwards")


def test_every_question_names_one_object_or_asks_about_all():
    """A question that fits two objects ("Where is the yellow star?" with two yellow stars) has no right answer,
    so a target could be wrong on it whatever it said: the world asks no such question."""
    kinds = Counter()
    for seed in range(600):
        ex = example("visual_qa", seed)
        scene, q = ex["scenes"][0], ex["question"]
        kinds[question_kind(q)] += 1
        if q.startswith("Where is the "):
            color, shape = q[len("Where is the "):-1].split()
            assert sum((o.color, o.shape) == (color, shape) for o in scene) == 1, (seed, q)
        if q.startswith("What color is the "):
            shape, place = q[len("What color is the "):-1].split(" in ", 1)
            assert sum((o.shape, o.place) == (shape, place) for o in scene) == 1, (seed, q)
    # the held-out check counts right answers per kind of question; the ambiguous "where" ones became "color"
    assert set(kinds) == {"count", "color", "where", "shape_count"} and kinds["color"] > kinds["where"] > 100, kinds
    with pytest.raises(ValueError, match="question"):
        question_kind("Describe the picture.")


def test_every_sentence_has_a_kind_and_a_wrong_one_is_counted_by_it():
    """Held-out errors are counted per sentence kind (an object seen, a relation worked out, an event): every
    sentence the world writes must have its kind, and a changed sentence counts as one missed and one extra
    of that kind."""
    seen = {task: set() for task in TASKS}
    for task in TASKS:
        for seed in range(300):
            for grammar in ("destination", "direction"):
                seen[task] |= {sentence_kind(s) for s in sentences(example(task, seed, grammar)["answer"])}
    assert seen == {"image_caption": {"count", "object", "relation", "colors"},
                    "visual_qa": {"count", "color", "place", "size"},
                    "video_caption": {"frames", "start", "appear", "disappear", "move", "end"}}
    reference = next(a for a in (example("image_caption", s)["answer"] for s in range(50)) if " is above the " in a)
    wrong_relation = reference.replace(" is above the ", " is below the ", 1)
    assert wrong_sentences(wrong_relation, reference) == ({"relation": 1}, {"relation": 1})
    assert wrong_sentences(reference, reference) == ({}, {})
    first_object = next(s for s in sentences(reference) if sentence_kind(s) == "object")
    assert wrong_sentences(reference.replace(first_object + ". ", ""), reference) == ({"object": 1}, {})
    assert wrong_sentences(reference + " The cat sat on the mat.", reference) == ({}, {"unparsed": 1})
    with pytest.raises(ValueError, match="grammar"):
        sentence_kind("The cat sat on the mat")


def test_a_target_is_asked_about_images_of_the_size_it_was_trained_at(tmp_path):
    """The bench and the demo render held-out images at the size the target's processor was built for."""
    from vllm_flash import world
    from vllm_flash.bench import REPO_ASSETS, build_requests
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    assert world.image_size_of(REPO_ASSETS / "target") == world.IMAGE_SIZE == 84
    # a target built for another size (the first shipped target was trained at 112 px) gets that size
    built = build_tiny_qwen2_5_vl(tmp_path / "t", num_layers=1, hidden=64, image_size=112)
    assert world.image_size_of(built) == 112
    requests, _ = build_requests(("image_caption", "video_caption"), 1, built)
    assert requests["image_caption"][0]["multi_modal_data"]["image"].size == (112, 112)
    assert requests["video_caption"][0]["multi_modal_data"]["video"][0].shape[1:3] == (112, 112)


@pytest.mark.parametrize("task", TASKS)
def test_a_request_asks_about_the_split_it_names(task):
    """`request` renders the example of the split it is given (training rows tell an under-fitted target from an
    over-fitted one), held-out unless told."""
    import numpy as np

    from vllm_flash import world

    for split in ("train", "heldout"):
        ex = example(task, world.SPLIT_SEEDS[split] + 3)
        prompt, answer = world.request(task, 3, 84, split)
        assert answer == ex["answer"] and ex["question"] in prompt["prompt"]
        if task == "video_caption":
            first_frame = prompt["multi_modal_data"]["video"][0][0]  # (frames, metadata)
        else:
            first_frame = np.asarray(prompt["multi_modal_data"]["image"])
        assert (first_frame == np.asarray(render(ex["scenes"][0], 84))).all()
    assert world.request(task, 3)[1] == example(task, world.SPLIT_SEEDS["heldout"] + 3)["answer"]


def test_a_split_written_by_several_processes_is_the_one_written_by_one(tmp_path):
    one = write_split(tmp_path / "one", "video_caption", "train", 6)
    two = write_split(tmp_path / "two", "video_caption", "train", 6, workers=2)
    assert one.read_text() == two.read_text()
    frames = lambda root: {p.relative_to(root): p.read_bytes()  # noqa: E731
                           for p in sorted(root.rglob("*.png"))}
    assert frames(tmp_path / "one") == frames(tmp_path / "two") and len(frames(tmp_path / "one")) >= 24


def test_a_colour_is_shared_by_objects_of_two_shapes_in_any_scene():
    blue_circle, blue_star = Obj("circle", "blue", "small", 0, 0), Obj("star", "blue", "large", 1, 1)
    red_circle = Obj("circle", "red", "small", 2, 2)
    assert shares_a_colour([[blue_circle], [blue_star]])  # frames apart still count: a clip names both
    assert not shares_a_colour([[blue_circle, red_circle], [Obj("circle", "blue", "large", 1, 1)]])  # one shape
    assert not shares_a_colour([[blue_circle, red_circle]])
    shared = sum(shares_a_colour(example("video_caption", seed)["scenes"]) for seed in range(200))
    assert 40 < shared < 160  # common enough to weigh in a clip's accuracy (267 of 600 held out)


def test_a_sentence_naming_the_wrong_shape_is_counted_by_whether_that_shape_shares_the_colour():
    """The held-out check counts the target's wrong-shape sentences by whether the shape it says is another
    object of the same colour (the same-colour confusion) or no object at all."""
    for seed in range(500):
        row = example("video_caption", seed)
        objects = [o for scene in row["scenes"] for o in scene]
        move = next((s for s in sentences(row["answer"]) if sentence_kind(s) == "move"), None)
        if move is None:
            continue
        colour, shape = move.split()[1:3]  # "The blue circle moves to the top right"
        others = {o.shape for o in objects if o.color == colour and o.shape != shape}
        if others:
            break
    else:
        raise AssertionError("no clip moves one of two same-coloured objects")
    other = sorted(others)[0]
    absent = next(x for x in SHAPES if x != shape and (colour, x) not in {(o.color, o.shape) for o in objects})
    swapped = row["answer"].replace(move, move.replace(f"{colour} {shape}", f"{colour} {other}", 1))
    assert shape_swaps(swapped, row["answer"], row["scenes"]) == {"other object": 1}
    made_up = row["answer"].replace(move, move.replace(f"{colour} {shape}", f"{colour} {absent}", 1))
    assert shape_swaps(made_up, row["answer"], row["scenes"]) == {"no such object": 1}
    assert shape_swaps(row["answer"], row["answer"], row["scenes"]) == {}
    moved_elsewhere = row["answer"].replace(move, move.rsplit(" ", 1)[0] + " nowhere", 1)
    assert shape_swaps(moved_elsewhere, row["answer"], row["scenes"]) == {}  # not a shape word
