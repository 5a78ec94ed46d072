"""Training a FLASH draft: bad data accounting, features, resume, and the full train -> eval path in vLLM."""
import json
import math
import os

import pytest
import torch

from vllm_flash.checkpoint import init_draft_for_target, load_draft, load_target_config, save_draft
from vllm_flash.data import FeatureShards
from vllm_flash.modeling import FlashDraft
from vllm_flash.config import FlashConfig
from vllm_flash.trainer import extract_features
from vllm_flash.train import Sample, TrainConfig, fit

from .toy_data import BAD_ROWS, write_toy_dataset


def test_regenerated_rows_are_read_as_they_go_and_each_keeps_its_own_answer(qwen_target, tmp_path, monkeypatch):
    """--regenerate answers the rows a chunk at a time in a pass of its own, then reads them again for their
    features: with bad rows among them and chunks of 5, every sample ends with the target's own answer to its
    row, as vLLM gives it for the whole list at once."""
    from transformers import AutoProcessor

    from vllm_flash import trainer
    from vllm_flash.config import target_facts
    from vllm_flash.data import BadDataReport, encode_or_report, read_conversations, vllm_request

    from .vllm_helpers import greedy, token_ids, with_llm

    data = write_toy_dataset(tmp_path / "data")
    monkeypatch.setattr(trainer, "REGENERATE_CHUNK", 5)
    count, report = extract_features(qwen_target, data, tmp_path / "features", max_len=512, progress=False,
                                     regenerate=True, regenerate_tokens=8)
    assert count == 12 and dict(report.counts) == BAD_ROWS, report.summary()
    processor = AutoProcessor.from_pretrained(str(qwen_target))
    facts = target_facts(load_target_config(qwen_target))
    conversations = list(read_conversations(data, BadDataReport()))
    # the target's answers, all at once, straight from vLLM
    expected = with_llm(qwen_target, None, lambda llm: token_ids(llm.generate(
        [vllm_request(conv, processor) for conv in conversations], greedy(max_tokens=8))), max_model_len=4096)
    expected = [answer for conv, answer in zip(conversations, expected)  # not the over-long row
                if encode_or_report(conv, processor, facts, 512, BadDataReport())]
    shards = FeatureShards(tmp_path / "features")
    answers = [shards[i].token_ids[shards[i].target_from:].tolist() for i in range(len(shards))]
    assert answers == expected
    assert len({tuple(a) for a in answers}) > 3  # the rows' answers differ: a shifted pairing would show


def test_bad_rows_are_counted_by_reason_and_good_rows_extracted(qwen_target, tmp_path):
    data = write_toy_dataset(tmp_path / "data")
    count, report = extract_features(qwen_target, data, tmp_path / "features", max_len=512, progress=False)
    assert count == 12
    assert dict(report.counts) == BAD_ROWS, report.summary()
    shards = FeatureShards(tmp_path / "features")
    assert len(shards) == 12
    kinds = {len(shards[i].frames) for i in range(len(shards))}
    assert kinds == {0, 1, 2}  # text; image; two images and video (2 temporal frames)
    sample = shards[1]
    assert sample.features.shape == (len(sample.token_ids), 128)
    start, length = sample.frames[0]
    assert length == 16 and int(sample.token_ids[start]) == load_target_config(qwen_target).image_token_id
    assert 0 < sample.target_from < len(sample.token_ids)


def synthetic_samples(n=10, t=20, d=64, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(vocab, (t,), generator=g), torch.randn(t, d, generator=g), [(3, 4)], 2)
            for _ in range(n)]


def small_draft():
    torch.manual_seed(0)
    config = FlashConfig(hidden_size=64, vocab_size=97, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, num_speculative_tokens=3, num_latents=2)
    draft = FlashDraft(config)
    g = torch.Generator().manual_seed(1)
    draft.attach_target_head(torch.randn(97, 64, generator=g), torch.randn(97, 64, generator=g))
    return draft


class Crash(Exception):
    pass


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    samples = synthetic_samples()
    cfg = TrainConfig(steps=20, batch_size=4, lr=3e-3, warmup=3, seed=7)
    whole = small_draft()
    losses = fit(whole, samples, cfg)

    crashed = small_draft()

    def crash(step, loss, acc):
        if step == 13:
            raise Crash  # dies after step 13's update, 3 steps after the last save (every 5)

    with pytest.raises(Crash):
        fit(crashed, samples, cfg, on_step=crash, checkpoint_dir=tmp_path / "ckpt", save_every=5,
            meta={"target": "t", "draft_config": {}})
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 10
    resumed = small_draft()
    resumed_losses = fit(resumed, samples, cfg, checkpoint_dir=tmp_path / "ckpt", save_every=5, resume=True,
                         meta={"target": "t", "draft_config": {}})
    assert resumed_losses == pytest.approx(losses, rel=1e-5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="--resume: the checkpoint .* was made for target='t'"):
        fit(small_draft(), samples, cfg, checkpoint_dir=tmp_path / "ckpt", resume=True,
            meta={"target": "other", "draft_config": {}})


def test_unwritable_output_fails_before_any_work(tmp_path, qwen_target):
    from vllm_flash.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write to"):
        main(["train", "--target", str(qwen_target), "--data", "missing.jsonl", "--out", str(blocker / "out")])


def test_preflight_leaves_another_process_probe_alone(tmp_path):
    """DDP ranks run the preflight on one output folder at once: a rank must not write or remove the file
    another rank is probing with (a shared probe name once made a rank's unlink find it gone)."""
    from vllm_flash.trainer import preflight

    others = [tmp_path / ".write-test", tmp_path / f".write-test-{os.getpid() + 1}"]
    for other in others:
        other.write_text("another rank's")
    preflight(tmp_path)
    assert [other.read_text() for other in others] == ["another rank's"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(other.name for other in others)


@pytest.mark.parametrize("media,layers", [("image", None), ("video", None), ("video", [1, 2])])
def test_hf_features_agree_with_the_features_vllm_gives_the_draft(media, layers, qwen_target, monkeypatch, tmp_path,
                                                                  request):
    """A training row goes through the training path (read, encode, HF forward) and, as the request distillation
    sends, through vLLM: the target must see the same tokens and positions both ways. (A video once reached HF
    without its frame rate, so training saw every frame at time 0 and vLLM served them a second apart.) With
    `layers`, the states after those target layers, which training reads by hooks and vLLM's runner hands over
    as aux hidden states."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_flash.config import target_facts
    from vllm_flash.data import BadDataReport, encode, hf_features, read_conversations, vllm_request
    from vllm_flash.tiny_targets import random_image

    from .test_vllm_equivalence import Recorder
    from .vllm_helpers import greedy, with_llm

    row = {"id": "r", "conversations": [{"from": "human", "value": f"<{media}>\ndescribe what you see"},
                                        {"from": "gpt", "value": "red circle"}]}
    if media == "image":
        random_image(5, 112).save(tmp_path / "a.png")
        row["image"] = "a.png"
    else:
        (tmp_path / "clip").mkdir()
        for f in range(5):  # odd: the processor pads the clip with its last frame
            random_image(10 + f, 112).save(tmp_path / "clip" / f"{f:03d}.png")
        row["video"] = "clip"
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    [conv] = read_conversations(tmp_path / "rows.jsonl", BadDataReport())
    processor = AutoProcessor.from_pretrained(str(qwen_target))
    encoded = encode(conv, processor, target_facts(load_target_config(qwen_target)), max_len=512)

    recorder = Recorder(monkeypatch)
    draft = request.getfixturevalue("qwen_random_layers_draft" if layers else "qwen_random_draft")
    out = with_llm(qwen_target, draft, lambda llm: llm.generate(
        [vllm_request(conv, processor)], greedy(max_tokens=2))[0], enable_prefix_caching=False)
    prompt_len = len(out.prompt_token_ids)
    assert encoded.token_ids[:prompt_len].tolist() == list(out.prompt_token_ids)
    assert encoded.target_from == prompt_len
    model = AutoModelForImageTextToText.from_pretrained(str(qwen_target), dtype=torch.float32).eval()
    final, layer_states = hf_features(model, encoded, layers)
    features = (final if layers is None else layer_states)[:prompt_len]
    assert features.shape[-1] == final.shape[-1] * len(layers or [None])
    torch.testing.assert_close(features, recorder.steps[0]["hidden"].float(), rtol=1e-3, atol=1e-3)


def test_training_raises_tau_in_vllm_and_the_export_is_lossless(qwen_target, tmp_path):
    from vllm_flash.cli import main
    from vllm_flash.evaluate import compare, draft_config, requests_from_data

    data = write_toy_dataset(tmp_path / "data", n_good=16, with_bad=False, with_video=False)
    out = tmp_path / "draft"
    assert main(["train", "--target", str(qwen_target), "--data", str(data), "--out", str(out), "--regenerate",
                 "--regenerate-tokens", "32", "--latents", "4", "--steps", "300", "--lr", "3e-3",
                 "--warmup", "10", "--noise", "0", "--save-every", "100"]) == 0
    trained = load_draft(out)
    assert trained.config.training["samples"] == 16 and trained.config.training["regenerate"]
    assert trained.token_mixer is not None and trained.token_mixer.out.weight.abs().sum() > 0  # on, and trained
    torch.manual_seed(0)
    save_draft(init_draft_for_target(qwen_target, num_latents=4), tmp_path / "untrained")
    requests, limits, _ = requests_from_data(str(qwen_target), str(data))
    engine = {"limit_mm_per_prompt": limits}
    r = compare(str(qwen_target), {"before": draft_config(tmp_path / "untrained", 4), "after": draft_config(out, 4)},
                requests, 32, engine)
    before, after = r["before"], r["after"]
    assert after["identical_to_none"] and before["identical_to_none"]
    assert after["tau"] >= before["tau"] + 0.8, (before["tau"], after["tau"])
    assert math.isfinite(after["speedup_vs_none"])
    log = (out / "train.log").read_text().splitlines()
    assert len(log) == 300 and "slot_accuracy" in json.loads(log[-1])


def test_torchrun_ddp_training_runs_on_two_cpu_workers(qwen_target, tmp_path):
    import subprocess
    import sys

    data = write_toy_dataset(tmp_path / "data", n_good=6, with_bad=False, with_video=False)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "vllm_flash.cli", "train", "--target", str(qwen_target), "--data", str(data), "--out", str(out),
           "--steps", "6", "--batch-size", "2", "--latents", "4", "--lr", "1e-3", "--warmup", "1",
           "--save-every", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len((out / "train.log").read_text().splitlines()) == 6
    assert len((out / "train.rank1.log").read_text().splitlines()) == 6
    draft = load_draft(out)
    assert draft.config.training["steps"] == 6


def test_full_disk_fails_before_any_work(tmp_path, qwen_target, monkeypatch):
    import collections
    import shutil

    from vllm_flash.cli import main

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(SystemExit, match="only 1 MiB free under"):
        main(["train", "--target", str(qwen_target), "--data", "missing.jsonl", "--out", str(tmp_path / "o")])


def test_video_file_rows_decode_like_frame_folders(tmp_path):
    import cv2
    import numpy as np

    from vllm_flash.data import BadDataReport, read_conversations

    frames = (np.random.RandomState(0).rand(4, 56, 56, 3) * 255).astype("uint8")
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 1.0, (56, 56))
    for frame in frames:
        writer.write(frame[:, :, ::-1])
    writer.release()
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    rows = [{"id": "v", "video": "clip.avi", "conversations": [{"from": "human", "value": "<video>\nwhat"},
                                                               {"from": "gpt", "value": "a"}]},
            {"id": "b", "video": "broken.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat"},
                                                                 {"from": "gpt", "value": "a"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = BadDataReport()
    convs = list(read_conversations(tmp_path / "d.jsonl", report))
    assert [c.row_id for c in convs] == ["v"] and convs[0].videos[0].shape == (4, 56, 56, 3)
    assert dict(report.counts) == {"corrupt video": 1}


def test_finished_features_are_reused_and_only_for_their_target(qwen_target, tmp_path):
    import shutil

    from vllm_flash.cli import main

    data = write_toy_dataset(tmp_path / "data", n_good=4, with_bad=False, with_video=False)
    features = tmp_path / "features"
    extract_features(qwen_target, data, features, max_len=512, progress=False)
    # the data file is gone: a second draft trains from the same features without reading it
    args = ["--data", str(tmp_path / "gone.jsonl"), "--features", str(features), "--latents", "0", "--steps", "2",
            "--warmup", "1"]
    assert main(["train", "--target", str(qwen_target), "--out", str(tmp_path / "d"), *args]) == 0
    assert load_draft(tmp_path / "d").config.training["samples"] == 4
    other = shutil.copytree(qwen_target, tmp_path / "other_target")
    with pytest.raises(SystemExit, match="were extracted from"):
        main(["train", "--target", str(other), "--out", str(tmp_path / "d2"), *args])
    # features of the final states alone are refused to a draft that reads target layers, by name
    with pytest.raises(SystemExit, match=r"hold target layers none .* asks for \[1, 2\]"):
        main(["train", "--target", str(qwen_target), "--out", str(tmp_path / "d4"), *args, "--target-layers", "1,2"])
    # a draft reading target layers trains on features that hold them (`Sample.layer_states`) and exports them
    layered = tmp_path / "layered_features"
    extract_features(qwen_target, data, layered, max_len=512, progress=False, target_layer_ids=[1, 2])
    sample = FeatureShards(layered)[0]
    assert sample.layer_states.shape == (len(sample.token_ids), 2 * sample.features.shape[-1])
    layered_args = [a if a != str(features) else str(layered) for a in args]
    assert main(["train", "--target", str(qwen_target), "--out", str(tmp_path / "d5"), *layered_args,
                 "--target-layers", "1,2"]) == 0
    assert load_draft(tmp_path / "d5").config.target_layer_ids == [1, 2]
    # features from before the served video positions (no format field) are refused, not trained on
    index = json.loads((features / "index.json").read_text())
    del index["format"]
    (features / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="format 1, this vllm-flash writes format 2"):
        main(["train", "--target", str(qwen_target), "--out", str(tmp_path / "d3"), *args])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_training_positions_are_laid_out_as_vllm_lays_them_out(family):
    """`served_mrope_positions` against vLLM's own `get_mrope_input_positions` for a row of text, an image, a
    video and a second image. Qwen2.5-VL steps a video's time by tokens_per_second x second_per_grid_t;
    Qwen2-VL has neither (its processor gives no frame timing, vLLM defaults both to 1)."""
    from types import SimpleNamespace as NS

    from vllm.model_executor.models import qwen2_5_vl, qwen2_vl

    from vllm_flash.data import served_mrope_positions

    # (kind, text length) or (kind, grid t, h, w) in patches; 2x2 patches merge into one token
    blocks = [("text", 3), ("image", 1, 4, 6), ("text", 2), ("video", 3, 4, 4), ("text", 4), ("image", 1, 2, 2),
              ("text", 1)]
    types, features, grids = [], [], {"image": [], "video": []}
    for block in blocks:
        if block[0] == "text":
            types += [0] * block[1]
            continue
        kind, t, h, w = block
        grid = torch.tensor([t, h, w])
        data = {f"{kind}_grid_thw": NS(data=grid)}
        if kind == "video" and family == "qwen2_5_vl":
            data["second_per_grid_ts"] = NS(data=torch.tensor(2.0))  # 2 frames per pair at 1 fps
        features.append(NS(modality=kind, mm_position=NS(offset=len(types)), data=data))
        grids[kind].append(grid)
        types += [1 if kind == "image" else 2] * (t * h * w // 4)
    vision = NS(spatial_merge_size=2, **({"tokens_per_second": 4} if family == "qwen2_5_vl" else {}))
    model_cls = (qwen2_5_vl.Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl"
                 else qwen2_vl.Qwen2VLForConditionalGeneration)
    fake = NS(config=NS(vision_config=vision))
    fake.iter_mm_grid_thw = lambda feats: model_cls.iter_mm_grid_thw(fake, feats)
    expected, _ = model_cls.get_mrope_input_positions(fake, [0] * len(types), features)

    inputs = {"mm_token_type_ids": torch.tensor([types]), "image_grid_thw": torch.stack(grids["image"]),
              "video_grid_thw": torch.stack(grids["video"])}
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = [2.0]
    facts = {"spatial_merge_size": 2, "tokens_per_second": getattr(vision, "tokens_per_second", None)}
    got = served_mrope_positions(inputs, facts)
    assert torch.equal(got, expected.long())
    video_time = expected[0, [i for i, k in enumerate(types) if k == 2]].unique().tolist()
    step = 8 if family == "qwen2_5_vl" else 1
    assert video_time == [video_time[0] + step * i for i in range(3)]  # the layout is not trivially flat
