"""The toy world's shipped models and the benchmark built on them.

- the target-training recipe's deepening step leaves the model's function unchanged, and cutting a deepened
  model to its trained layers gives the shallow model back;
- its vision probe's labels line up with how the processor pairs video frames;
- its padded training batches give every row the M-RoPE positions vLLM serves;
- its training rounds carry the vision probe over from one round to the next, and each trains on the first
  rows of each task that it names, at its own batch size if it has one; the drafts learn from an equal share of
  each task; its data is the same written or encoded by one process or several;
- a GPU round trains as many steps as fit its deadline and reports them; its weights come back in parts and
  make a servable target again; a recount round picks rows no round has seen and comes back deepened;
- its accuracy check scores the split it is asked about (training rows tell under- from over-fitting);
- diagnose_target.py scores a batch as training does, finds each move's axis and frame pair, and where the
  target looks when it counts a shape, and how well its state holds the count and each shape's count; the
  shape-attention training aid scores and trains that look, and the scene-count aid that count;
- `vllm-flash bench` runs every method on the shipped target + drafts (eagle3 included, read natively by vLLM),
  writes latest.json / latest.md / PNG plots, and every method's greedy output equals plain decoding;
- the README's main job, `vllm-flash demo`, captions held-out media losslessly and judges each caption.
"""
import contextlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_flash.bench import METHODS, REPO_ASSETS

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_deepening_keeps_the_shallow_models_function_and_cutting_undoes_it(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    recipe = recipe_mod.Recipe(hidden=64, shallow_layers=2, layers=6)
    shallow = build_tiny_qwen2_5_vl(tmp_path / "shallow", num_layers=2, hidden=64, lm_head_scale=1.0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(shallow, dtype=torch.float32).eval()
    with torch.no_grad():  # trained-looking weights: no layer is an identity by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(shallow)
    recipe_mod.deepen(shallow, tmp_path / "deep", recipe)
    deep = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "deep", dtype=torch.float32).eval()
    assert deep.config.text_config.num_hidden_layers == 6
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, deep(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # ...and the new layers are not dead weight: their zeroed branches get gradients
    deep.train()
    deep(input_ids=ids, labels=ids).loss.backward()
    assert deep.model.language_model.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0
    # cutting the deep model to its trained layers gives the shallow one back, weight for weight, whatever the
    # added layers have learnt since
    with torch.no_grad():
        for layer in (1, 4):
            deep.model.language_model.layers[layer].mlp.down_proj.weight.add_(1.0)
    deep.save_pretrained(tmp_path / "deep")
    cut = recipe_mod.cut_to_trained(tmp_path / "deep", recipe)
    assert cut.config.text_config.num_hidden_layers == 2 == len(cut.config.text_config.layer_types)
    before, after = model.state_dict(), cut.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_vision_probe_labels_follow_the_processors_frame_pairs():
    from vllm_flash import world

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    seed = next(i for i in range(100) if len(world.example("video_caption", i)["scenes"]) % 2)  # an odd clip
    frames = world.example("video_caption", seed)["scenes"]
    labels = recipe_mod.scene_labels(f"video_caption-train-{seed}")
    assert labels.shape == ((len(frames) + 1) // 2, 2, 9, 3)  # the processor pads with the last frame
    assert torch.equal(labels[-1, 0], labels[-1, 1]) and not torch.equal(labels[0, 0], labels[-1, 0])
    for o in frames[0]:
        assert labels[0, 0, o.row * 3 + o.col, 1] == list(world.COLORS).index(o.color) + 1
    image = recipe_mod.scene_labels("image_caption-heldout-3")
    assert image.shape == (1, 2, 9, 3) and torch.equal(image[0, 0], image[0, 1])  # an image: a pair of copies
    probe = recipe_mod.VisionProbe(16, 8)
    loss = probe.loss(torch.randn(2 * 16, 8), torch.cat([labels[:1], image]))
    assert loss.isfinite() and loss > 0


def test_shipped_assets_are_small_bf16_safetensors():
    files = [f for f in REPO_ASSETS.rglob("*") if f.is_file()]
    assert (REPO_ASSETS / "target" / "model.safetensors").exists(), "the toy world's target must ship"
    assert sum(f.stat().st_size for f in files) < 60 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".py")]
    from safetensors import safe_open

    for f in (REPO_ASSETS).rglob("*.safetensors"):
        with safe_open(f, "pt") as st:
            dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}
        assert dtypes <= {"BF16", "I64", "I32", "BOOL"}, (f, dtypes)
    for method in METHODS[2:]:
        assert (REPO_ASSETS / "drafts" / method / "config.json").exists(), method


def test_target_recipe_runs_every_stage_and_resumes_at_the_first_unfinished_one(tmp_path, monkeypatch, capsys):
    """`train_target.py --quick` trains, deepens, fine-tunes (each round that names a training aid with that aid, and
    one that names an lr multiplier for the added layers with it; an unknown option, or two of a kind, is refused before
    any training), cuts the last deep round to its trained layers and trains those on its frozen vision tower (the first
    recount round on every shape question and an eighth as many others, the second on its own rows and those), deepens
    that again and fine-tunes it (redeep rounds without recount rounds are refused), and exports a bf16 target that vLLM
    serves and scores. Run again, it trains and encodes nothing; with the deep stages removed, it trains only those."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    out = tmp_path / "world"
    with pytest.raises(SystemExit):  # not a whole number of merged visual tokens
        recipe_mod.main(["--quick", "--out", str(out), "--image-size", "100"])
    assert not out.exists()
    shallow = build_tiny_qwen2_5_vl(tmp_path / "tiny", num_layers=4, hidden=64, lm_head_scale=1.0)
    tiny = Qwen2_5_VLForConditionalGeneration.from_pretrained(shallow, dtype=torch.float32)
    quick = recipe_mod.Recipe(shape_attention_heads=((1, 0),), scene_counts_layer=2)
    built = {name: recipe_mod.build_aid(name, tiny, quick, shallow) for name in recipe_mod.AIDS}
    assert {name: type(aid).__name__ for name, aid in built.items()} == {
        recipe_mod.SHAPE_ATTENTION: "ShapeAttention", recipe_mod.SCENE_COUNTS: "SceneCounts",
        recipe_mod.COUNT_WORDS: "CountWords"}
    assert recipe_mod.build_aid(None, tiny, quick, shallow) is None
    assert recipe_mod.round_options((), 1) == (None, 1.0, None)
    assert recipe_mod.round_options((recipe_mod.COUNT_WORDS, 64, 5.0), 1) == (64, 5.0, recipe_mod.COUNT_WORDS)
    scales = []  # the added layers' lr multiplier of every round, in order
    real_groups = recipe_mod.parameter_groups
    monkeypatch.setattr(recipe_mod, "parameter_groups",
                        lambda model, recipe, extra, scale: scales.append(scale) or real_groups(model, recipe, extra,
                                                                                                scale))
    aided = []  # (aid, the depth of the model) for each round that trains with an aid
    for name in ("ShapeAttention", "SceneCounts"):
        monkeypatch.setattr(recipe_mod, name, lambda model, *a, real=getattr(recipe_mod, name), name=name: aided.append(
            (name, len(model.model.language_model.layers))) or real(model, *a))
    recount_rows = []  # the row ids each recount round trains on
    real_train = recipe_mod.train
    monkeypatch.setattr(recipe_mod, "train", lambda model, samples, *a, **k: (recount_rows.append(
        [s.row_id for s in samples]) if a[4].startswith("recount") else None) or real_train(model, samples, *a, **k))
    assert recipe_mod.main(["--quick", "--out", str(out)]) == 0
    assert aided == [("SceneCounts", 8), ("ShapeAttention", 8)]  # the quick recipe's two rounds name one each
    # two shallow rounds, the deep ones (the second names 4.0), two recount rounds and a redeep one
    assert scales == [1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0]
    for options in ((2, "shape_atention"), (recipe_mod.SCENE_COUNTS, recipe_mod.SHAPE_ATTENTION), (2, 4),
                    (2.0, 3.0), (-1.0,)):
        typo = recipe_mod.Recipe(deep_rounds=((1, 1e-3, {}, 2), (1, 1e-3, {}, *options)))
        with pytest.raises(ValueError, match="deep round 2 names"):
            recipe_mod.train_stages(out, typo, out / "data", out / "shallow-init", {}, tmp_path / "r.json",
                                    tmp_path / "l")
    for kind, typo in (("recount", recipe_mod.Recipe(recount_rounds=((1, 1e-3, {}, "count_hevy"),))),
                       ("recount", recipe_mod.Recipe(recount_rounds=((1, 1e-3, {}, recipe_mod.KEEP_COUNT_HEAVY),))),
                       ("redeep", recipe_mod.Recipe(recount_rounds=((1, 1e-3, {}),),
                                                    redeep_rounds=((1, 1e-3, {}, 2, 3),))),
                       ("name recount rounds too", recipe_mod.Recipe(recount_rounds=(),
                                                                     redeep_rounds=((1, 1e-3, {}),)))):
        with pytest.raises(ValueError, match=kind if " " in kind else f"{kind} round 1 names"):
            recipe_mod.train_stages(out, typo, out / "data", out / "shallow-init", {}, tmp_path / "r.json",
                                    tmp_path / "l")
    log = out / "train_target.log"

    def stages() -> list:
        return [json.loads(line)["stage"] for line in log.read_text().splitlines()]

    first_run = stages()
    assert sorted(set(first_run), key=first_run.index) == [
        "shallow-1", "shallow-2", "deep", "deep-2", "recount-1", "recount-2", "redeep"]
    # the recount rounds train the last deep round's trained layers (the quick recipe's 0 and 4 of 8) on its
    # vision tower, untouched; their first round on every shape question among its rows and an eighth as many others
    # (saved under the checkpoint's names: "model.layers.", "visual.")
    deep_2, recounted = (load_file(out / stage / "model.safetensors") for stage in ("deep-2", "recount-2"))
    text = {k for k in recounted if k.startswith("model.layers.")}
    assert text and text == {k.replace("layers.4.", "layers.1.") for k in deep_2
                             if k.startswith(("model.layers.0.", "model.layers.4."))}
    tower = [k for k in deep_2 if k.startswith("visual.")]
    assert tower and all(torch.equal(recounted[k], deep_2[k]) for k in tower)
    assert not torch.equal(recounted["model.layers.1.mlp.down_proj.weight"],
                           deep_2["model.layers.4.mlp.down_proj.weight"])
    asked = [i for i in range(24) if world.question_kind(
        world.example("visual_qa", world.SPLIT_SEEDS["train"] + i)["question"]) == "shape_count"]
    assert 0 < len(asked) < 21
    assert recount_rows[0] == [f"visual_qa-train-{i}" for i in asked + [i for i in range(24) if i not in asked][:3]]
    # the second keeps the first's rows beside its own image captions and clips
    assert recount_rows[1] == [f"{task}-train-{i}" for task in ("image_caption", "video_caption")
                               for i in range(8)] + recount_rows[0]
    # the redeep rounds start from the recount rounds' model, deepened: its layers at 0 and 4 of 8
    redeep_init = load_file(out / "redeep-init" / "model.safetensors")
    assert all(torch.equal(redeep_init[k.replace("layers.1.", "layers.4.")], recounted[k]) for k in text)
    accuracy = json.loads((out / "target_report.json").read_text())["heldout_exact_match"]
    assert set(accuracy) == set(world.TASKS)
    assert all(0 <= a[k] <= 1 for a in accuracy.values() for k in ("exact_match", "word_accuracy"))
    # every held-out caption has one "The picture shows ..." sentence and one per object (2 rows in --quick)
    image_missed = accuracy["image_caption"]["missed_sentences"]
    assert image_missed["count"].endswith("/2") and int(image_missed["object"].split("/")[1]) >= 4
    assert set(accuracy["image_caption"]["extra_sentences"]) <= {kind for kind, _ in world.SENTENCE_KINDS} | {"unparsed"}
    asked = accuracy["visual_qa"]["exact_by_question"]  # the 2 held-out questions, right ones by kind
    assert sum(int(v.split("/")[1]) for v in asked.values()) == 2
    assert all(world.question_kind(world.example("visual_qa", world.SPLIT_SEEDS["heldout"] + i)["question"]) in asked
               for i in range(2))
    with safe_open(out / "target" / "model.safetensors", "pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}
    assert json.loads((out / "target" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 8

    monkeypatch.setattr(recipe_mod, "heldout_accuracy", lambda target, n, size: {"scored": str(target)})
    encodings = []
    real_encode = recipe_mod.encode_split
    monkeypatch.setattr(recipe_mod, "encode_split", lambda *a: encodings.append(a) or real_encode(*a))
    assert recipe_mod.main(["--quick", "--out", str(out)]) == 0
    assert stages() == first_run and not encodings
    after_deep = ("deep", "deep-2", "recount-1", "recount-2", "redeep-init", "redeep", "target")
    for stage in after_deep:
        shutil.rmtree(out / stage)
    assert recipe_mod.main(["--quick", "--out", str(out)]) == 0
    deep_logged = [s for s in first_run if not s.startswith("shallow")]
    assert stages()[len(first_run):] == deep_logged and len(encodings) == 1
    assert json.loads((out / "target_report.json").read_text())["heldout_exact_match"] == {
        "scored": str(out / "target")}
    # a later stage trains from the checkpoint before it alone (the shallow stages gone, no vision probe left)
    for stage in ("shallow", "shallow-2", "deep-init", *after_deep[1:]):
        shutil.rmtree(out / stage)
    (out / "deep" / recipe_mod.PROBE_FILE).unlink()
    before = len(stages())
    assert recipe_mod.main(["--quick", "--out", str(out)]) == 0
    assert set(stages()[before:]) == {"deep-2", "recount-1", "recount-2", "redeep"} and len(encodings) == 2
    assert (out / "target" / "model.safetensors").exists() and not (out / "deep-2" / recipe_mod.PROBE_FILE).exists()
    # on a machine without vLLM (a lent GPU's) it trains, then says where to score the target instead of failing
    monkeypatch.setattr(recipe_mod, "heldout_accuracy", lambda *a: pytest.fail("scored without vLLM"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    capsys.readouterr()
    assert recipe_mod.main(["--quick", "--out", str(out)]) == 0
    assert "vLLM is not installed here" in capsys.readouterr().out


def test_accuracy_scores_the_split_it_is_asked_about(monkeypatch):
    """`heldout_accuracy(split="train")` asks about training rows and counts their kinds of question: a served
    model that gives every training row's reference is exactly right there, and not on held-out rows."""
    from collections import Counter
    from types import SimpleNamespace

    import vllm

    from vllm_flash import world

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    asked_of = {"Describe the picture.": "image_caption", "Describe what happens in the video.": "video_caption"}

    class TrainingAnswers:  # stands in for vLLM's LLM: answers the i-th request with training row i's reference
        def __init__(self, **_):
            pass

        def generate(self, requests, params, use_tqdm):
            task = next((t for q, t in asked_of.items() if q in requests[0]["prompt"]), "visual_qa")
            return [SimpleNamespace(outputs=[SimpleNamespace(
                text=world.example(task, world.SPLIT_SEEDS["train"] + i)["answer"])]) for i in range(len(requests))]

    monkeypatch.setattr(vllm, "LLM", TrainingAnswers)
    rows = 6
    on_train = recipe_mod.heldout_accuracy(Path("unused"), rows, 84, split="train")
    assert all(on_train[task]["exact_match"] == 1.0 for task in world.TASKS)
    kinds = Counter(world.question_kind(world.example("visual_qa", world.SPLIT_SEEDS["train"] + i)["question"])
                    for i in range(rows))
    assert on_train["visual_qa"]["exact_by_question"] == {k: f"{n}/{n}" for k, n in sorted(kinds.items())}
    for task in world.TASKS:  # every row right, counted once: in the colour-shared group or the other
        shared = sum(world.shares_a_colour(world.example(task, world.SPLIT_SEEDS["train"] + i)["scenes"])
                     for i in range(rows))
        assert on_train[task]["exact_when_a_colour_is_shared"] == f"{shared}/{shared}"
        assert on_train[task]["exact_otherwise"] == f"{rows - shared}/{rows - shared}"
    assert all(on_train[task]["shape_swaps"] == {} for task in world.TASKS)  # no sentence names a wrong shape
    held_out = recipe_mod.heldout_accuracy(Path("unused"), rows, 84)
    assert all(held_out[task]["exact_match"] < 1.0 for task in world.TASKS)


def test_eval_measures_flash_eagle3_and_ngram_side_by_side_against_plain_vllm(tmp_path):
    """`vllm-flash eval`, the command a user measures their own drafts with, run as a user runs it: each draft's
    method is read from its folder, ngram runs beside them, every output is compared with plain vLLM's."""
    from vllm_flash import world

    rows = world.write_split(tmp_path, "visual_qa", "heldout", 2, world.image_size_of(REPO_ASSETS / "target"))
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "vllm_flash.cli", "eval", "--target", str(REPO_ASSETS / "target"), "--data", str(rows),
           "--image-root", str(tmp_path), "--draft", str(REPO_ASSETS / "drafts" / "flash"),
           "--draft", str(REPO_ASSETS / "drafts" / "eagle3"), "--ngram", "--max-tokens", "24", "--repeats", "1",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 2 and result["output_tokens"] > 10 and result["none"]["output_tokens_per_s"] > 0
    for name, method in (("flash", "flash"), ("eagle3", "eagle3"), ("ngram", "ngram")):
        r = result[name]
        assert r["method"] == method and r["k"] == 4 and r["identical_to_none"]
        assert 1 <= r["tau"] <= 5 and len(r["acceptance_per_position"]) == 4 and r["speedup_vs_none"] > 0
        assert f"| {name} | 4 | {r['tau']:.2f} |" in done.stdout
    assert result["flash"]["tau"] > result["ngram"]["tau"]  # a trained draft beats prompt lookup on this world


def test_eval_names_what_is_wrong_with_its_drafts_and_fails_when_outputs_differ(tmp_path, monkeypatch, capsys):
    from vllm_flash import evaluate
    from vllm_flash.cli import main

    flash, k1, eagle3 = (str(REPO_ASSETS / "drafts" / name) for name in ("flash", "flash_k1", "eagle3"))
    data = ["--target", str(REPO_ASSETS / "target"), "--data", str(tmp_path / "rows.jsonl")]
    with pytest.raises(SystemExit, match="nothing to measure"):
        main(["eval", *data])
    with pytest.raises(SystemExit, match=f"no draft at {tmp_path}"):
        main(["eval", *data, "--draft", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SystemExit, match="neither a FLASH draft.*'llama'"):
        main(["eval", *data, "--draft", str(tmp_path)])
    # K: what each FLASH draft was built for unless asked; two drafts of one method are told apart by folder
    runs = evaluate.eval_runs([flash, k1, eagle3], ngram=True, k=None)
    assert {name: (r["method"], r["num_speculative_tokens"]) for name, r in runs.items()} == {
        "flash:flash": ("flash", 4), "flash:flash_k1": ("flash", 1), "eagle3": ("eagle3", 4), "ngram": ("ngram", 4)}
    assert {r["num_speculative_tokens"] for r in evaluate.eval_runs([flash, eagle3], False, 3).values()} == {3}
    with pytest.raises(SystemExit, match="drafts at most K = 1 tokens, not 4"):
        evaluate.eval_runs([k1], False, 4)
    with pytest.raises(SystemExit, match="at least 1"):
        evaluate.eval_runs([flash], False, 0)

    (tmp_path / "rows.jsonl").write_text('{"id": "x", "conversations": []}\n')
    with pytest.raises(SystemExit, match="no usable rows"):
        main(["eval", *data, "--draft", flash])

    def differing(target, runs, requests, max_tokens, engine=None, repeats=1):
        measured = {"method": "flash", "k": 4, "tau": 3.0, "acceptance_per_position": [0.5] * 4,
                    "output_tokens_per_s": 1.0, "speedup_vs_none": 1.0, "identical_to_none": False, "metrics": {}}
        return {"requests": 1, "max_tokens": max_tokens, "output_tokens": 1, "none": {"output_tokens_per_s": 1.0},
                "flash": measured}

    monkeypatch.setattr(evaluate, "compare", differing)
    monkeypatch.setattr(evaluate, "requests_from_data", lambda *a: ([{"prompt": "x"}], {"image": 1}, {}))
    assert main(["eval", *data, "--draft", flash]) == 1
    assert "differ from plain vLLM's" in capsys.readouterr().out


# Runs before the bench test: once vLLM's ngram proposer has imported numba in this process, vLLM 0.32 cannot
# start another engine here (see vllm_flash/bench.py, which builds the ngram engine last for that reason).
def test_demo_captions_heldout_media_losslessly(capsys):
    from vllm_flash.cli import main

    assert main(["demo", "--images", "1", "--max-tokens", "160"]) == 0
    out = capsys.readouterr().out
    assert out.count("identical to plain vLLM: True") == 2
    assert out.count("correct description: ") == 2  # judged against the world's truth (see README: not always)
    assert "speed-up" in out and "tau" in out


def test_bench_runs_every_method_losslessly_and_writes_results(tmp_path):
    from vllm_flash.cli import main

    assert main(["bench", "--tasks", "image_caption,video_caption", "--batch-sizes", "1,2", "--repeats", "1",
                 "--max-tokens", "12", "--batch1-requests", "3", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["batch1_requests"] == 3
    assert {"machine", "vllm_version", "rows"} <= set(result)
    assert set(result["target_exact_match"]) == {"image_caption", "video_caption"}
    greedy = [r for r in result["rows"] if r["temperature"] == 0.0]
    sampled = [r for r in result["rows"] if r["temperature"] == 1.0]
    assert {(r["task"], r["method"], r["batch_size"]) for r in greedy} == {
        (t, m, b) for t in ("image_caption", "video_caption") for m in METHODS for b in (1, 2)}
    assert {r["method"] for r in sampled} == set(METHODS[1:])
    for r in result["rows"]:
        assert {"task", "method", "batch_size", "temperature", "tau", "acceptance_per_position",
                "output_tokens_per_s", "speedup_vs_none", "c"} <= set(r)
    assert all(r["identical_to_none"] for r in greedy), [r for r in greedy if not r["identical_to_none"]]
    for r in greedy:
        if r["method"] == "none":
            assert r["speedup_vs_none"] == 1.0 and r["tau"] is None
        elif r["tau"] is not None or r["method"] != "ngram":  # ngram may find nothing to propose
            assert r["tau"] >= 1.0 and len(r["acceptance_per_position"]) == r["k"]
        if r["method"] != "none":
            assert r["output_tokens_per_s"] > 0
            if r["batch_size"] == 1 and r["tau"] is not None:
                assert r["c"] > 0 and r["bound"] > 0
    flash = [r for r in greedy if r["method"] == "flash"]
    assert min(r["tau"] for r in flash) > 1.2, flash  # a trained draft on its own world (untrained: ~1.0)
    for r in greedy:  # where each step's time went: the target's forward, the drafter's, the rest
        t = r["step_ms"]
        assert t["steps"] >= 1 and t["target_forward"] > 0 and t["other"] > 0, r
        assert (t["propose"] == 0) == (r["method"] == "none"), r
        if r["method"] == "none":
            assert r["tokens_per_step"] <= r["batch_size"], r  # one token per request and step
    none_steps = {(r["task"], r["batch_size"]): r["tokens_per_step"] for r in greedy if r["method"] == "none"}
    assert all(r["tokens_per_step"] > none_steps[(r["task"], r["batch_size"])] for r in flash), flash
    table = (tmp_path / "latest.md").read_text()
    # results + header, targets + header, step times + header
    assert table.count("\n| ") == (len(result["rows"]) + 1) + (6 + 1) + (len(greedy) + 1)
    assert "| flash speed-up over none, batch 1 | >= 2.5 |" in table
    for png in ("speedup.png", "acceptance.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_table_judges_each_goal_from_the_rows():
    from vllm_flash.bench import targets_table

    def row(method, batch, **values):
        return {"task": "image_caption", "method": method, "batch_size": batch, "temperature": 0.0, **values}

    rows = [row("flash", 1, speedup_vs_none=2.6, output_tokens_per_s=60.0, tau=3.0, bound=3.0),
            row("eagle3", 1, output_tokens_per_s=50.0, tau=2.5),
            row("flash_nocompress", 1, tau=3.1),
            row("flash", 16, speedup_vs_none=1.05),
            {**row("flash", 1, tau=9.0), "temperature": 1.0}]  # sampled rows are not judged
    lines = targets_table({"rows": rows}).splitlines()
    assert lines[2] == "| flash speed-up over none, batch 1 | >= 2.5 | 2.60 met |"
    assert lines[3] == "| flash over eagle3 speed, batch 1 | >= 1.25 | 1.20 missed |"
    assert lines[4] == "| flash tau / eagle3 tau, batch 1 | >= 1.15 | 1.20 met |"
    assert lines[5] == "| flash throughput over none, batch 16 | >= 1.1 | 1.05 missed |"
    assert lines[6] == "| flash speed-up / bound, batch 1 | >= 0.8 | 0.87 met |"
    assert lines[7] == "| flash tau / flash_nocompress tau, batch 1 | >= 0.98 | 0.97 missed |"


def test_target_training_batches_use_the_positions_vllm_serves(tmp_path):
    """A padded training batch (an image row beside a longer video row) must give the video row the features
    `hf_features` gives it alone, which test_train checks against vLLM. Without `collate`'s positions, HF would
    number the text after the video its own way."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.data import hf_features

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    target = REPO_ASSETS / "target"
    rows = [recipe_mod.encode_split(target, world.write_split(tmp_path, task, "train", 1))[0]
            for task in ("image_caption", "video_caption")]
    image, video = rows
    assert len(image.token_ids) < len(video.token_ids)  # the image row is padded
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(target), dtype=torch.float32).eval()
    batch = recipe_mod.collate(rows)
    batch.pop("labels")
    # pixels are held in bf16 (as the served target reads them; fp32 ran out of memory) and trained on in fp32
    assert image.inputs["pixel_values"].dtype == video.inputs["pixel_values_videos"].dtype == torch.bfloat16
    assert batch["pixel_values"].dtype == batch["pixel_values_videos"].dtype == torch.float32
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
    torch.testing.assert_close(hidden[1], hf_features(model, video)[0], rtol=1e-4, atol=1e-4)
    n = len(image.token_ids)
    torch.testing.assert_close(hidden[0, :n], hf_features(model, image)[0], rtol=1e-4, atol=1e-4)


def test_target_training_rounds_carry_the_vision_probe_over(tmp_path):
    """Each round saves the model and its vision probe; the next round starts from both (a fresh random probe
    would push random gradients into the trained vision tower). At lr 0 the probe must come out unchanged.
    (Training without a probe, from a checkpoint that has none, is covered by the recipe's resume test.)"""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    init = build_tiny_qwen2_5_vl(tmp_path / "init", num_layers=1, hidden=64, lm_head_scale=1.0, vocab_size=512,
                                 corpus=recipe_mod.world_corpus(200))
    rows = [row for task in ("image_caption", "video_caption")
            for row in recipe_mod.encode_split(init, world.write_split(tmp_path, task, "train", 1))]
    recipe = recipe_mod.Recipe(hidden=64, batch_size=2, warmup=1)
    log = tmp_path / "log.jsonl"
    previous = init
    for stage, lr in (("first", 1e-3), ("second", 0.0)):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(previous, dtype=torch.float32)
        recipe_mod.train(model, rows, 2, lr, recipe, log, stage, previous, tmp_path / stage,
                         fresh_probe=stage == "first")
        previous = tmp_path / stage
    first, second = (load_file(tmp_path / s / recipe_mod.PROBE_FILE) for s in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x["stage"] for x in logged] == ["first", "first", "second", "second"]
    assert all(x["probe"] > 0 for x in logged)  # the probe really trained on both the image and the video


def test_a_stopped_round_resumes_from_its_saved_progress_to_the_same_weights(tmp_path, monkeypatch):
    """A round saves its progress (model, probe, AdamW moments) every `save_every` steps. Stopped part way,
    the same call resumes from the last save, replaying the batch order, and ends at the weights and probe an
    unbroken round reaches; the finished round leaves no progress file behind."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    init = build_tiny_qwen2_5_vl(tmp_path / "init", num_layers=1, hidden=64, lm_head_scale=1.0, vocab_size=512,
                                 corpus=recipe_mod.world_corpus(200), image_size=world.IMAGE_SIZE)
    rows = [row for task in ("image_caption", "video_caption")
            for row in recipe_mod.encode_split(init, world.write_split(tmp_path, task, "train", 2))]
    recipe = recipe_mod.Recipe(hidden=64, batch_size=1, warmup=1, save_every=2)
    real_collate = recipe_mod.collate
    calls = []

    def collate(samples, fail_at=None):
        calls.append(samples[0].row_id)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # as if the machine stopped
        return real_collate(samples)

    def run(name: str, fail_at=None) -> dict:
        monkeypatch.setattr(recipe_mod, "collate", lambda samples: collate(samples, fail_at))
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        recipe_mod.train(model, rows, 5, 1e-3, recipe, tmp_path / "log.jsonl", name, init, tmp_path / name,
                         fresh_probe=True)
        return {**load_file(tmp_path / name / "model.safetensors"),
                **load_file(tmp_path / name / recipe_mod.PROBE_FILE)}

    unbroken = run("unbroken")
    order = list(calls)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run("stopped", fail_at=4)  # in step 4, after the save at step 2
    assert recipe_mod.progress_path(tmp_path / "stopped").exists()
    assert not (tmp_path / "stopped" / "config.json").exists()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="steps 5, now 6.*delete it"):  # the recipe changed since the save
        recipe_mod.train(model, rows, 6, 1e-3, recipe, tmp_path / "log.jsonl", "stopped", init,
                         tmp_path / "stopped", fresh_probe=True)
    calls.clear()
    resumed = run("stopped")
    assert calls == order[2:]  # steps 3-5 only, on the batches the unbroken round took there
    assert not recipe_mod.progress_path(tmp_path / "stopped").exists()
    assert unbroken.keys() == resumed.keys()
    for name in unbroken:
        torch.testing.assert_close(resumed[name], unbroken[name], rtol=0, atol=1e-6)
    sizes = []  # a round with its own batch size (a GPU round's) batches that many rows
    monkeypatch.setattr(recipe_mod, "collate", lambda samples: sizes.append(len(samples)) or real_collate(samples))
    recipe_mod.train(model, rows, 2, 1e-3, recipe, tmp_path / "log.jsonl", "pairs", init, tmp_path / "pairs",
                     batch_size=2)
    assert sizes == [2, 2]


def test_an_added_layers_lr_multiplier_moves_the_layers_deepening_added_that_much_faster(tmp_path, monkeypatch):
    """With `added_lr_scale`, the layers that deepening added (not the trained ones it spread out) train at that
    multiple of the round's lr, and everything else exactly as without it: Adam's first step moves each weight by
    about its lr. A saved round is not resumed at another multiplier; the shallow model takes none."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    init = build_tiny_qwen2_5_vl(tmp_path / "init", num_layers=4, hidden=64, lm_head_scale=1.0, vocab_size=512,
                                 corpus=recipe_mod.world_corpus(200), image_size=world.IMAGE_SIZE)
    rows = recipe_mod.encode_split(init, world.write_split(tmp_path, "image_caption", "train", 1))
    recipe = recipe_mod.Recipe(hidden=64, batch_size=1, warmup=1, layers=4, shallow_layers=2)
    assert recipe_mod.added_layers(recipe) == {1, 3}
    before = load_file(init / "model.safetensors")

    def one_step(name: str, scale: float, rows=rows, recipe=recipe) -> dict:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        recipe_mod.train(model, rows, 1, 1e-3, recipe, tmp_path / "log.jsonl", name, init, tmp_path / name,
                         added_lr_scale=scale)
        after = load_file(tmp_path / name / "model.safetensors")
        return {k: (after[k] - before[k]).abs().max().item() for k in before}

    plain, scaled = one_step("plain", 1.0), one_step("scaled", 10.0)
    text_layer = re.compile(r"model\.layers\.(\d+)\.")  # as saved: the text layers' names without "language_model"
    layer = lambda key: int(text_layer.match(key)[1]) if text_layer.match(key) else None  # noqa: E731
    added = [k for k in before if layer(k) in (1, 3) and k.endswith("proj.weight")]
    assert len(added) == 14
    for key in before:
        if key in added:
            assert 0.9e-3 < plain[key] < 1.1e-3 and 9e-3 < scaled[key] < 11e-3, (key, plain[key], scaled[key])
        elif layer(key) not in (1, 3):
            assert scaled[key] == plain[key], key
    with pytest.raises(ValueError, match="needs the deepened model"):
        one_step("shallow", 10.0, recipe=recipe_mod.Recipe(hidden=64, batch_size=1, warmup=1, layers=8))
    saving = recipe_mod.Recipe(hidden=64, batch_size=1, warmup=1, layers=4, shallow_layers=2, save_every=1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    two = rows * 2
    real_collate, calls = recipe_mod.collate, []
    monkeypatch.setattr(recipe_mod, "collate",  # stopped in its second step, after the first was saved
                        lambda samples: calls.append(1) or (real_collate(samples) if len(calls) < 2 else 1 / 0))
    with pytest.raises(ZeroDivisionError):
        recipe_mod.train(model, two, 2, 1e-3, saving, tmp_path / "log.jsonl", "x", init, tmp_path / "x",
                         added_lr_scale=10.0)
    monkeypatch.setattr(recipe_mod, "collate", real_collate)
    with pytest.raises(RuntimeError, match="added_lr_scale 10.0, now 1.0"):
        recipe_mod.train(model, two, 2, 1e-3, saving, tmp_path / "log.jsonl", "x", init, tmp_path / "x")


def test_a_gpu_round_trains_as_many_steps_as_fit_its_deadline_and_reports_them(tmp_path, monkeypatch, capsys):
    """A variant times its steps, trains as many as fit before the deadline, and reports that round (steps, lr,
    rows, batch size), with weights that make a target again, trained away from the start; --time-batches times
    a step on fresh batches and on one ready on the device."""
    import time

    from safetensors.torch import load_file

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    gpu_round = _load(ROOT / "benchmarks" / "world" / "gpu_round.py")
    recipe_mod = sys.modules["train_target"]
    start = build_tiny_qwen2_5_vl(tmp_path / "start", num_layers=1, hidden=64, lm_head_scale=1.0, vocab_size=512,
                                  corpus=recipe_mod.world_corpus(200), image_size=world.IMAGE_SIZE)
    rows = {"image_caption": 2, "visual_qa": 0, "video_caption": 2}
    samples = [row for task in ("image_caption", "video_caption")
               for row in recipe_mod.encode_split(start, world.write_split(tmp_path / "data", task, "train", 2))]
    timed, timed_at = [], []
    real_step_seconds = gpu_round.step_seconds
    # as if a step took 10 s: as many fit as leave EXPORT_S for the export, counted from when the timing ended
    monkeypatch.setattr(gpu_round, "step_seconds",
                        lambda *a: timed.append(real_step_seconds(*a)) or timed_at.append(time.time()) or 10.0)
    deadline = time.time() + gpu_round.EXPORT_S + 75
    gpu_round.run_variant("v", 1e-3, 2, samples, start, tmp_path / "work", tmp_path / "out", deadline, "cpu", rows)
    assert len(timed) == 1 and timed[0] > 0
    fit = int((deadline - timed_at[0] - gpu_round.EXPORT_S) / 10)
    assert fit >= 2
    facts = json.loads((tmp_path / "out" / "v" / "facts.json").read_text())
    assert facts["round"] == [fit, 1e-3, rows, 2] and facts["step_s"] == 10.0
    logged = [json.loads(line) for line in (tmp_path / "work" / "v.log").read_text().splitlines()]
    assert logged[-1]["step"] == fit - 1 and logged[-1]["of"] == fit
    gpu_round.assemble(tmp_path / "out" / "v", tmp_path / "target", start)
    before, after = load_file(start / "model.safetensors"), load_file(tmp_path / "target" / "model.safetensors")
    assert any(not torch.equal(after[k], before[k].to(after[k].dtype)) for k in before)

    # the command, run as on the GPU machine, in a fresh process (forked from the suite's, after its vLLM
    # engines, both variants exited with an error and no traceback): the rows written and encoded once, then one
    # process per variant, each with its own round (an lr multiplier for the layers deepening added needs a
    # start as deep as the recipe's)
    deep = build_tiny_qwen2_5_vl(tmp_path / "deep", num_layers=recipe_mod.Recipe().layers, hidden=64,
                                 lm_head_scale=1.0, vocab_size=512, corpus=recipe_mod.world_corpus(200),
                                 image_size=world.IMAGE_SIZE)

    def command(start_dir: Path, results: Path, *variants: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "world" / "gpu_round.py"), "--start",
                               str(start_dir), "--work", str(tmp_path / "w"), "--results", str(results), "--rows",
                               "2", "--workers", "1", "--device", "cpu", "--deadline",
                               str(time.time() + gpu_round.EXPORT_S + 15), *(a for v in variants
                                                                             for a in ("--variant", v))],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    ran = command(deep, tmp_path / "r", "1e-3:2", "2e-3:1:3")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    rounds = {v: json.loads((tmp_path / "r" / v / "facts.json").read_text())["round"]
              for v in ("lr1e-3_b2", "lr2e-3_b1_x3")}
    assert {v: r[1:] for v, r in rounds.items()} == {"lr1e-3_b2": [1e-3, {t: 2 for t in world.TASKS}, 2],
                                                     "lr2e-3_b1_x3": [2e-3, {t: 2 for t in world.TASKS}, 1, 3.0]}
    refused = command(start, tmp_path / "r1", "2e-3:1:3")  # too shallow for a multiplier
    assert refused.returncode == 1 and "needs the deepened model" in refused.stderr

    # --time-batches: per batch size, a step on fresh batches (12 collated) and on one batch ready on the device
    monkeypatch.setattr(gpu_round, "step_seconds", real_step_seconds)
    collated = []
    real_collate = recipe_mod.collate
    monkeypatch.setattr(recipe_mod, "collate", lambda rows: collated.append(len(rows)) or real_collate(rows))
    capsys.readouterr()
    gpu_round.time_batches(samples, start, [1, 2], "cpu")
    timed_lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [t["batch_size"] for t in timed_lines] == [1, 2]
    assert all(t["step_s"] > 0 and t["step_s_batch_ready"] > 0 for t in timed_lines)
    assert collated == [1] * 13 + [2] * 13  # the ready batch once, then 12 fresh ones; none while it is reused


def test_rows_encoded_by_several_processes_or_spilled_to_disk_are_those_encoded_by_one(tmp_path, monkeypatch):
    """Rows encoded by two processes, in chunks, or with their pixels spilled to disk and mapped back, are the
    rows one process encodes in memory; a second spill into the same folder deletes the first's files, and the
    rows mapped from them keep their pixels. One process spills a file per chunk, never one for every row: a
    single copy-on-write map larger than the machine's memory is refused (ENOMEM)."""
    from vllm_flash import data, world

    monkeypatch.setattr(data, "MAX_CHUNK_ROWS", 4)  # 9 rows: chunks of 4, 4 and 1

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    target = ROOT / "assets" / "world" / "target"
    lines = [line for task in world.TASKS for line in
             world.write_split(tmp_path, task, "train", 3).read_text().splitlines()]
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    one = recipe_mod.encode_split(target, tmp_path / "all.jsonl")  # rows read by the encoding process
    read_first = data.encode_all(target, list(data.read_conversations(tmp_path / "all.jsonl", data.BadDataReport())),
                                 max_len=1024, pixel_dtype=torch.bfloat16)
    two = recipe_mod.encode_split(target, tmp_path / "all.jsonl", 2)
    spill = tmp_path / "spill"
    spilled = {workers: recipe_mod.encode_split(target, tmp_path / "all.jsonl", workers, spill) for workers in (2, 1)}
    pixel_bytes = sum(t.numel() * t.element_size() for r in one for k, t in r.inputs.items() if k in data.PIXEL_KEYS)
    files = sorted(spill.rglob("*.bin"))  # the second spill's, one process's
    assert len(files) == 3 and pixel_bytes <= sum(f.stat().st_size for f in files) < pixel_bytes + 8 * len(one)
    assert len(list(spill.iterdir())) == 1  # the first spill's folder is gone
    for rows in (read_first, two, *spilled.values()):
        assert [r.row_id for r in rows] == [r.row_id for r in one] == [json.loads(line)["id"] for line in lines]
        for a, b in zip(one, rows):
            assert a.target_from == b.target_from and torch.equal(a.token_ids, b.token_ids)
            assert a.inputs.keys() == b.inputs.keys()
            for k in a.inputs:
                if isinstance(a.inputs[k], torch.Tensor):
                    assert a.inputs[k].dtype == b.inputs[k].dtype and torch.equal(a.inputs[k], b.inputs[k]), k
    # every row's pixels are a view of its chunk's file, mapped, not a copy in memory
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for r in spilled[1]
                for k, t in r.inputs.items() if k in data.PIXEL_KEYS}
    assert sorted(size for _, size in storages) == sorted(f.stat().st_size for f in files)


def test_a_bad_row_met_by_an_encoding_process_is_named(tmp_path):
    """Rows are read by the processes that encode them; a bad one comes back as the `BadRow` it raised there."""
    from vllm_flash import world
    from vllm_flash.data import BadRow

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    lines = world.write_split(tmp_path, "image_caption", "train", 3).read_text().splitlines()
    row = json.loads(lines[1])
    row["image"] = "gone.png"
    lines[1] = json.dumps(row)
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRow, match="missing image") as raised:
        recipe_mod.encode_split(ROOT / "assets" / "world" / "target", tmp_path / "all.jsonl", 2)
    assert raised.value.reason == "missing image" and "gone.png" in raised.value.detail


def test_a_gpu_rounds_weights_come_back_in_parts_and_make_the_target_again(tmp_path):
    """gpu_round.py sends a variant's bf16 weights back in parts under the GPU machine's 16 MiB a file, and
    builds a servable target from them with the starting target's config and processor; weights of another
    model are refused."""
    from safetensors.torch import load_file, save_file

    gpu_round = _load(ROOT / "benchmarks" / "world" / "gpu_round.py")
    start = ROOT / "assets" / "world" / "target"
    trained = tmp_path / "trained"
    trained.mkdir()
    shipped = load_file(start / "model.safetensors")
    save_file({k: v.float() + 1 for k, v in shipped.items()}, trained / "model.safetensors")  # fp32, as trained
    gpu_round.save_parts(trained, tmp_path / "parts")
    parts = sorted((tmp_path / "parts").glob("part-*.safetensors"))
    assert len(parts) == 2 and all(p.stat().st_size < 16 * 2**20 for p in parts)
    gpu_round.assemble(tmp_path / "parts", tmp_path / "target", start)
    rebuilt = load_file(tmp_path / "target" / "model.safetensors")
    assert rebuilt.keys() == shipped.keys()
    assert all(torch.equal(rebuilt[k], (shipped[k].float() + 1).to(torch.bfloat16)) for k in shipped)
    assert {f.name for f in (tmp_path / "target").iterdir()} == {f.name for f in start.iterdir()}
    name = next(iter(shipped))
    save_file({name: shipped[name]}, tmp_path / "parts" / "part-2.safetensors")
    save_file({"extra.weight": torch.zeros(1)}, tmp_path / "parts" / "part-3.safetensors")
    with pytest.raises(ValueError, match="other weights.*extra.weight"):
        gpu_round.assemble(tmp_path / "parts", tmp_path / "target-2", start)


def test_a_gpu_recount_round_trains_the_trained_layers_on_new_rows_and_comes_back_deepened(tmp_path):
    """`gpu_round.py --recount` picks rows no round of the recipe has seen (every image or clip where a colour is
    shared, every fourth of the others, every question), trains the shipped target's trained layers alone on
    its frozen tower, and its parts come back as the deepened target: the untrained round is the shipped one."""
    from safetensors.torch import load_file, save_file

    from vllm_flash import world

    gpu_round = _load(ROOT / "benchmarks" / "world" / "gpu_round.py")
    recipe_mod = sys.modules["train_target"]
    recipe = recipe_mod.Recipe()
    first = recipe_mod.train_rows(recipe)
    chosen = gpu_round.new_rows({"video_caption": 40, "image_caption": 40, "visual_qa": 8}, 4)
    for task in world.TASKS:
        scanned = range(first[task], first[task] + {"visual_qa": 8}.get(task, 40))
        shared = {i for i in scanned if world.shares_a_colour(
            world.example(task, world.SPLIT_SEEDS["train"] + i)["scenes"])}
        expected = list(scanned) if task == "visual_qa" else [i for i in scanned if i in shared or i % 4 == 0]
        assert [i for t, i in chosen if t == task] == expected
        if task != "visual_qa":
            assert 0 < len(shared) < len(expected) < 40  # both kinds of rows, some left out

    start = ROOT / "assets" / "world" / "target"
    model = gpu_round.starting_model(start, recount=True)
    assert model.config.text_config.num_hidden_layers == recipe.shallow_layers
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    model.save_pretrained(tmp_path / "trained")
    gpu_round.save_parts(tmp_path / "trained", tmp_path / "parts")
    shutil.copy(tmp_path / "trained" / "config.json", tmp_path / "parts" / "config.json")
    gpu_round.assemble(tmp_path / "parts", tmp_path / "target", start)
    shipped, rebuilt = load_file(start / "model.safetensors"), load_file(tmp_path / "target" / "model.safetensors")
    assert rebuilt.keys() == shipped.keys()
    added = recipe_mod.added_layers(recipe)
    for name, tensor in shipped.items():
        layer = name[len(recipe_mod.TEXT_LAYERS):].split(".")[0] if name.startswith(recipe_mod.TEXT_LAYERS) else None
        if layer is None or int(layer) not in added:
            assert torch.equal(rebuilt[name], tensor), name
        elif name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            assert not rebuilt[name].any(), name  # an added layer's branches start at zero: identities


def test_target_training_rounds_train_on_the_first_rows_they_name(tmp_path):
    """A round that asks for more rows of a task gets the data rewritten with them; the rows it shares with a
    smaller round are the same examples, and each round trains only on its own first rows. Data written for
    another mix of the same size is rewritten too."""
    from types import SimpleNamespace

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    few = {"image_caption": 1, "visual_qa": 0, "video_caption": 1}
    more = {**few, "video_caption": 2}
    data = recipe_mod.write_rows(tmp_path, few, heldout=1)
    before = {json.loads(line)["id"]: line for line in (data / "train.jsonl").read_text().splitlines()}
    assert sorted(before) == ["image_caption-train-0", "video_caption-train-0"]
    large = recipe_mod.Recipe(heldout=1, shallow_rounds=((1, 1e-3, few), (1, 1e-3, more)), deep_rounds=(),
                              recount_rounds=())
    assert recipe_mod.train_rows(large) == more
    # a deep fine-tune's rows are written too
    deep = recipe_mod.Recipe(shallow_rounds=((1, 1e-3, few),), deep_rounds=((1, 1e-3, more),), recount_rounds=())
    assert recipe_mod.train_rows(deep) == more
    batched = recipe_mod.Recipe(shallow_rounds=((1, 1e-3, few),), deep_rounds=((1, 1e-3, more, 64),),
                                recount_rounds=())
    assert recipe_mod.train_rows(batched) == more  # a round's own batch size is not its rows
    # and a recount round's
    recounted = recipe_mod.Recipe(shallow_rounds=((1, 1e-3, few),), deep_rounds=(), recount_rounds=((1, 1e-3, more),))
    assert recipe_mod.train_rows(recounted) == more
    recipe_mod.write_data(tmp_path, large)
    after = {json.loads(line)["id"]: line for line in (data / "train.jsonl").read_text().splitlines()}
    assert sorted(after) == ["image_caption-train-0", "video_caption-train-0", "video_caption-train-1"]
    assert all(after[k] == before[k] for k in before)
    samples = [SimpleNamespace(row_id=k) for k in after] + [SimpleNamespace(row_id="visual_qa-train-0")]
    assert [s.row_id for s in recipe_mod.first_rows(samples, few)] == sorted(before)
    # the order (which fixes a round's batches) does not depend on the file's: a larger file reshuffles it
    for order in (samples[::-1], samples[1:] + samples[:1]):
        assert [s.row_id for s in recipe_mod.first_rows(order, more)] == [
            "image_caption-train-0", "video_caption-train-0", "video_caption-train-1"]
    other_mix = {**few, "image_caption": 2}  # as many rows in all, but not the same ones
    recipe_mod.write_rows(tmp_path, other_mix, heldout=1)
    assert recipe_mod.written_rows(data / "train.jsonl") == other_mix


def test_drafts_learn_from_an_equal_share_of_each_task(tmp_path):
    """The drafts' distilled rows are the first rows of each task, as many of each, even though the target
    trained on more clips than images."""
    drafts_mod = _load(ROOT / "benchmarks" / "world" / "train_drafts.py")
    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    rows = {"image_caption": 2, "visual_qa": 2, "video_caption": 4}
    data = recipe_mod.write_rows(tmp_path, rows, heldout=1)
    chosen = [json.loads(line)["id"] for line in drafts_mod.distill_rows(data, 6)]
    assert sorted(chosen) == sorted(f"{task}-train-{i}" for task in rows for i in range(2))


def test_drafts_trained_with_other_settings_are_refused_not_mixed(tmp_path):
    """The drafts' settings are recorded once; the same settings pass (a stopped run resumes), and other ones
    are refused, naming what changed, before any draft is kept or data reused."""
    drafts_mod = _load(ROOT / "benchmarks" / "world" / "train_drafts.py")
    settings = {"rows": 1500, "epochs": 2, "batch_size": 16, "lr": 1e-3}
    drafts_mod.check_settings(tmp_path, settings)
    drafts_mod.check_settings(tmp_path, dict(settings))
    with pytest.raises(SystemExit, match="rows 1500 -> 3000"):
        drafts_mod.check_settings(tmp_path, {**settings, "rows": 3000})
    assert json.loads((tmp_path / "drafts_settings.json").read_text()) == settings


def test_target_data_is_rewritten_for_a_new_grammar_or_image_size(tmp_path):
    """Rows written before the world's clip grammar changed are written again, and so are images written at
    another image size; the rows themselves stay the same."""
    from vllm_flash import world

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    rows = {"image_caption": 2, "visual_qa": 2, "video_caption": 3}
    train = recipe_mod.write_rows(tmp_path, rows, heldout=1) / "train.jsonl"
    now_rows = [json.loads(line) for line in train.read_text().splitlines()]
    for row in now_rows:
        task, _, index = recipe_mod.parse_row_id(row["id"])
        assert row["conversations"][-1]["value"] == world.example(task, index)["answer"]
    first_rows = json.loads(json.dumps(now_rows))
    for row in first_rows:
        task, _, index = recipe_mod.parse_row_id(row["id"])
        row["conversations"][-1]["value"] = world.example(task, index, "direction")["answer"]
    first = train.with_name("first.jsonl")
    first.write_text("".join(json.dumps(row) + "\n" for row in first_rows))
    assert recipe_mod.written_rows(train) == rows
    first.replace(train)  # as if written before the grammar changed
    assert recipe_mod.written_rows(train)["video_caption"] < 3
    recipe_mod.write_rows(tmp_path, rows, heldout=1)
    assert [json.loads(line) for line in train.read_text().splitlines()] == now_rows
    # the images are written again at another image size, the rows unchanged
    assert recipe_mod.written_image_size(tmp_path / "data") == 84
    recipe_mod.write_rows(tmp_path, rows, heldout=1, image_size=112)
    assert recipe_mod.written_image_size(tmp_path / "data") == 112
    assert [json.loads(line) for line in train.read_text().splitlines()] == now_rows


def test_target_diagnosis_scores_what_training_scores(tmp_path):
    """diagnose_target's loss over one batch is the training loss of that batch, its accuracy and missed
    words count the same label tokens, and it counts the clip's moves (the world's word-level tokenizer, as the
    target's, so that "moves" and the places are words)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    diagnose_mod = _load(ROOT / "benchmarks" / "world" / "diagnose_target.py")
    init = build_tiny_qwen2_5_vl(tmp_path / "init", num_layers=1, hidden=64, lm_head_scale=1.0, vocab_size=512,
                                 corpus=recipe_mod.world_corpus(200))
    rows = [row for task in ("image_caption", "video_caption")
            for row in recipe_mod.encode_split(init, world.write_split(tmp_path, task, "train", 1))]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32).eval()
    got = diagnose_mod.diagnose(model, rows, AutoTokenizer.from_pretrained(init))
    with torch.no_grad():
        expected = model(**recipe_mod.collate(rows)).loss.item()
    assert abs(got["loss"] - expected) < 1e-3
    labels = sum(len(r.token_ids) - r.target_from for r in rows)
    missed_in_top = sum(int(x.split("/")[0]) for _, x in got["most_missed"])
    assert 0 < missed_in_top <= labels - round(got["token_accuracy"] * labels)  # an untrained model misses words
    # the clip (training row 0) moves three objects, as its events 3, 4 and 5: two inside a frame pair
    seen = {where: int(x.split("/")[1]) for where, x in got["move_destination_missed"].items()}
    assert seen == {"inside a frame pair": 2, "across frame pairs": 1}
    answers = " ".join(world.example(task, 0)["answer"] for task in ("image_caption", "video_caption"))
    shapes = sum(answers.replace(".", " ").replace(",", " ").split().count(shape) for shape in world.SHAPES)
    assert int(got["missed_by_kind"]["shape"].split("/")[1]) == shapes > 0

    # the vision read-out: one group of visual tokens per image or frame pair, labelled with its cells; a probe
    # fitted on them reads them back, and reads the same features under another row's labels worse
    features, labels = diagnose_mod.visual_groups(model, rows)
    clip_pairs = -(-len(world.example("video_caption", 0)["scenes"]) // 2)
    tokens = (world.IMAGE_SIZE // 28) ** 2
    assert features.shape == (1 + clip_pairs, tokens, 64) and labels.shape == (1 + clip_pairs, 2, 9, 3)
    assert torch.equal(labels[0], recipe_mod.scene_labels(rows[0].row_id)[0])
    read = diagnose_mod.probe_readout((features, labels), {"fitted": (features, labels),
                                                            "relabelled": (features, labels.roll(1, 0))})
    assert read["fitted"]["objects_read_right"] == 1.0 and read["fitted"]["objects"] == int((labels[..., 0] > 0).sum())
    assert read["relabelled"]["objects_read_right"] < 1.0


def test_shape_question_attention_looks_at_each_counted_shape_question(tmp_path):
    """diagnose_target --shape-questions scores every "How many <shape>s" question (and no other), says per
    layer which head looks most at the asked shape's cells and from where, and sets that beside the share those
    cells are of the picture's objects."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    diagnose_mod = _load(ROOT / "benchmarks" / "world" / "diagnose_target.py")
    init = build_tiny_qwen2_5_vl(tmp_path / "init", num_layers=2, hidden=64, lm_head_scale=1.0, vocab_size=512,
                                 corpus=recipe_mod.world_corpus(200))
    rows = recipe_mod.encode_split(init, world.write_split(tmp_path, "visual_qa", "heldout", 16))
    examples = [world.example("visual_qa", world.SPLIT_SEEDS["heldout"] + i) for i in range(16)]
    asked = [ex for ex in examples if world.question_kind(ex["question"]) == "shape_count"]
    assert asked
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    got = diagnose_mod.shape_question_attention(model, rows, model.config.image_token_id,
                                                AutoTokenizer.from_pretrained(init))
    assert sum(got["questions"].values()) == len(asked) and set(got["layers"]) == {0, 1}
    shares = [sum(o.shape == ex["question"].split()[2][:-1] for o in ex["scenes"][0]) / len(ex["scenes"][0])
              for ex in asked]
    for layer in got["layers"].values():
        assert 0 <= layer["head"] < model.config.text_config.num_attention_heads
        assert 0 <= layer["tokens_before_count"] <= 20
        weighted = sum(layer[k][1] * got["questions"][k] for k in ("right", "wrong") if k in layer)
        assert abs(weighted / len(asked) - sum(shares) / len(shares)) < 1e-3
        assert all(0 <= layer[k][0] <= 1 for k in ("right", "wrong") if k in layer)


def _tiny_world_target(tmp_path, num_layers: int, hidden: int, **load):
    """train_target.py as a module; a tiny Qwen2.5-VL on the world's vocabulary at 84 px (its folder), loaded
    for evaluation (`load`: from_pretrained's options), with its tokenizer; and 24 held-out questions, encoded."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    init = build_tiny_qwen2_5_vl(tmp_path / "init", num_layers=num_layers, hidden=hidden, lm_head_scale=1.0,
                                 vocab_size=512, corpus=recipe_mod.world_corpus(200), image_size=84)
    rows = recipe_mod.encode_split(init, world.write_split(tmp_path, "visual_qa", "heldout", 24))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32, **load).eval()
    return recipe_mod, init, model, AutoTokenizer.from_pretrained(init), rows


def test_count_readout_reads_the_states_that_decide_each_shape_questions_count(tmp_path):
    """diagnose_target --count-readout takes, for every shape question and no other, the states at the two
    positions that decide its count ("There|are|two") with the asked shape's count; --shape-counts takes every
    question's state at its last prompt token with its picture's count of each shape; a read-out finds counts
    the states hold, and not ones they do not."""
    from vllm_flash import world

    _, _, model, tokenizer, rows = _tiny_world_target(tmp_path, num_layers=1, hidden=64)
    diagnose_mod = _load(ROOT / "benchmarks" / "world" / "diagnose_target.py")
    states, counts = diagnose_mod.count_states(model, rows)
    examples = [world.example("visual_qa", world.SPLIT_SEEDS["heldout"] + i) for i in range(24)]
    asked = [(row, ex) for row, ex in zip(rows, examples) if world.question_kind(ex["question"]) == "shape_count"]
    assert states.shape == (len(asked), 2, 2, 64)
    assert counts.tolist() == [ex["answer"].split()[2] and world.NUMBERS.index(ex["answer"].split()[2])
                               for _, ex in asked]
    embed = model.get_input_embeddings()
    for (row, _), state, count in zip(asked, states, counts):
        decides = row.token_ids[row.target_from:row.target_from + 3]  # "There are two"
        assert [tokenizer.decode(t).strip() for t in decides[1:]] == [
            "is" if count == 1 else "are", world.NUMBERS[count]]
        assert torch.allclose(state[:, 0], embed(decides[:2]))  # the embeddings come first

    generator = torch.Generator().manual_seed(0)
    planted = torch.randint(1, 5, (200,), generator=generator)
    features = torch.randn(200, 2, 3, 16, generator=generator)
    features[..., :5] += 8 * torch.nn.functional.one_hot(planted, 5).float()[:, None, None]
    fit, check = (features[:150], planted[:150]), (features[150:], planted[150:])
    read = diagnose_mod.count_readout(fit, check)
    assert read["questions"] == 50 and sum(read["counts"]) == 50
    assert all(min(layer) >= 0.95 for name in diagnose_mod.POSITIONS for layer in read[name].values())
    guessed = diagnose_mod.count_readout(fit, (check[0], check[1].roll(1)))
    assert all(layer[0] < 0.6 for name in diagnose_mod.POSITIONS for layer in guessed[name].values())

    # --shape-counts: every question's state at its last prompt token, with each shape's count in its picture
    states, counts = diagnose_mod.picture_states(model, rows)
    assert states.shape == (24, 1, 2, 64)
    assert counts.tolist() == [[sum(o.shape == shape for o in ex["scenes"][0]) for shape in world.SHAPES]
                               for ex in examples]
    for row, state in zip(rows, states):  # the token before the answer's first, "The" or "There"
        assert tokenizer.decode(row.token_ids[row.target_from]).strip() in ("The", "There")
        assert torch.allclose(state[0, 0], embed(row.token_ids[row.target_from - 1]))
    planted = torch.randint(0, 4, (200, 4), generator=generator)  # four shapes' counts, each in its own features
    features = torch.randn(200, 1, 2, 32, generator=generator)
    features[..., :16] += 8 * torch.nn.functional.one_hot(planted, 4).float().flatten(1)[:, None, None]
    read = diagnose_mod.linear_readout((features[:150], planted[:150]), (features[150:], planted[150:]))
    assert len(read) == 1 and all(min(layer) >= 0.95 for layer in read[0].values())
    guessed = diagnose_mod.linear_readout((features[:150], planted[:150]), (features[150:], planted[150:].roll(1, 0)))
    assert all(layer[0] < 0.6 for layer in guessed[0].values())


def test_shape_attention_aid_is_the_asked_cells_share_of_attention_and_trains_it(tmp_path):
    """The shape-attention training aid's loss is -log of the asked shape's share of the attention on the
    picture's objects, in each chosen head, from the question's shape word to the position that predicts the
    count, as the model's own (eager) attention gives it; it has nothing to say about other rows; and training
    with it raises that share."""
    from vllm_flash import world

    recipe_mod, init, model, tokenizer, rows = _tiny_world_target(tmp_path, num_layers=2, hidden=128,
                                                                  attn_implementation="eager")
    heads = ((0, 2), (1, 1))  # 4 query heads over 2 key/value heads: the aid must pick each head's own keys
    aid = recipe_mod.ShapeAttention(model, model.config.image_token_id, tokenizer, heads=heads, weight=10.0)
    examples = [world.example("visual_qa", world.SPLIT_SEEDS["heldout"] + i) for i in range(24)]
    asked = [i for i, ex in enumerate(examples) if world.question_kind(ex["question"]) == "shape_count"]
    questions, others = [rows[i] for i in asked], [r for i, r in enumerate(rows) if i not in asked]
    assert len(questions) >= 3 and others

    def expected_loss(model) -> float:
        with torch.no_grad():
            out = model(**recipe_mod.collate(questions), output_attentions=True)
        losses = []
        for b, i in enumerate(asked):
            shape, scene = examples[i]["question"].split()[2][:-1], examples[i]["scenes"][0]
            cells = (rows[i].token_ids == model.config.image_token_id).nonzero().flatten()
            on_objects = cells[[o.row * 3 + o.col for o in scene]]
            on_shape = cells[[o.row * 3 + o.col for o in scene if o.shape == shape]]
            word = rows[i].token_ids.tolist().index(tokenizer.encode(f" {shape}s", add_special_tokens=False)[0])
            count = rows[i].target_from + 1  # "There are|two"
            assert tokenizer.decode(rows[i].token_ids[count + 1]).strip() in world.NUMBERS
            for layer, head in heads:
                attention = out.attentions[layer][b, head, word:count + 1]
                losses.append(-(attention[:, on_shape].sum(-1) / attention[:, on_objects].sum(-1)).log().mean())
        return torch.stack(losses).mean().item()

    before = expected_loss(model)
    assert aid.loss(questions).item() == pytest.approx(10 * before, rel=1e-4)
    with torch.no_grad():
        model(**recipe_mod.collate(others))
    assert aid.loss(others) is None

    recipe = recipe_mod.Recipe(hidden=128, batch_size=4, warmup=1)
    log = tmp_path / "log.jsonl"
    recipe_mod.train(model, questions, 20, 3e-3, recipe, log, "aided", init, tmp_path / "aided", aid=aid)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert all("aid" in x for x in logged) and any(x["aid"] > 0 for x in logged)  # every batch asks a shape
    after = expected_loss(model.eval())
    assert after < 0.5 * before, (before, after)


def test_scene_counts_aid_reads_every_shapes_count_where_a_count_is_decided_and_trains_it(tmp_path):
    """The scene-count training aid reads the chosen layer's output at the last prompt token and the two after it
    ("There|are|two"), in every picture row and no clip, and its loss is the cross-entropy of each shape's count in
    the picture; training with it lowers that loss, and a stopped round resumes with the read-out it had."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    recipe_mod = _load(ROOT / "benchmarks" / "world" / "train_target.py")
    init = build_tiny_qwen2_5_vl(tmp_path / "init", num_layers=2, hidden=128, lm_head_scale=1.0, vocab_size=512,
                                 corpus=recipe_mod.world_corpus(200), image_size=84)
    pictures = [r for task in ("visual_qa", "image_caption")
                for r in recipe_mod.encode_split(init, world.write_split(tmp_path / task, task, "heldout", 12))]
    clips = recipe_mod.encode_split(init, world.write_split(tmp_path / "clips", "video_caption", "heldout", 2))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32).eval()
    aid = recipe_mod.SceneCounts(model, layer=0, weight=3.0)

    def expected_loss(batch: list) -> float:
        with torch.no_grad():
            hidden = model(**recipe_mod.collate(batch), output_hidden_states=True).hidden_states[1]  # layer 0's
            losses = []
            for b, row in enumerate(batch):
                task, _, index = recipe_mod.parse_row_id(row.row_id)
                scene = world.example(task, world.SPLIT_SEEDS["heldout"] + index)["scenes"][0]
                counts = torch.tensor([sum(o.shape == shape for o in scene) for shape in world.SHAPES])
                for position in range(row.target_from - 1, row.target_from + 2):
                    logits = aid.read(hidden[b, position]).view(len(world.SHAPES), -1)
                    losses.append(torch.nn.functional.cross_entropy(logits, counts, reduction="none"))
        return torch.cat(losses).mean().item()

    batch = pictures[::3] + clips
    with torch.no_grad():
        model(**recipe_mod.collate(batch))
    assert aid.loss(batch).item() == pytest.approx(3.0 * expected_loss(pictures[::3]), rel=1e-5)
    with torch.no_grad():
        model(**recipe_mod.collate(clips))
    assert aid.loss(clips) is None
    before = expected_loss(pictures)

    recipe = recipe_mod.Recipe(hidden=128, batch_size=4, warmup=1, save_every=3)
    log = tmp_path / "log.jsonl"
    recipe_mod.train(model, pictures, 120, 3e-3, recipe, log, "aided", init, tmp_path / "aided", aid=aid)
    assert all("aid" in json.loads(line) for line in log.read_text().splitlines())
    after = expected_loss(pictures)
    # below the best guess that ignores the picture: each shape's counts as often as these pictures hold them
    counts = torch.stack([recipe_mod.shape_counts(row.row_id) for row in pictures])
    guess = sum(torch.distributions.Categorical(probs=torch.bincount(c, minlength=10) / len(c)).entropy()
                for c in counts.T).item() / len(world.SHAPES)
    assert after < 0.8 * guess < before, (before, guess, after)

    # a round stopped after its first save (3 steps) resumes with the read-out it had then, not a fresh one
    def aid_that(calls: list, stop_at: int | None):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        aid = recipe_mod.SceneCounts(model, layer=0)
        real = aid.loss

        def loss(chosen):
            calls.append(aid.read.weight.detach().clone())
            if len(calls) == stop_at:
                raise RuntimeError("stopped")
            return real(chosen)
        aid.loss = loss
        return model, aid

    first, resumed = [], []
    for calls, stop_at in ((first, 5), (resumed, None)):
        model, aid = aid_that(calls, stop_at)
        with pytest.raises(RuntimeError, match="stopped") if stop_at else contextlib.nullcontext():
            recipe_mod.train(model, pictures, 6, 1e-3, recipe, log, "stopped", init, tmp_path / "stopped",
                             aid=aid)
    assert len(resumed) == 3  # steps 3, 4 and 5
    torch.testing.assert_close(resumed[0], first[3])  # the read-out after 3 steps
    assert not torch.equal(first[3], first[0])


def test_count_words_aid_weights_the_words_that_decide_a_shape_questions_count(tmp_path):
    """The count-word training aid is `weight` times the mean cross-entropy of the words that decide each shape
    question's count ("There are two"), as the model predicts them, and nothing for other questions."""
    from vllm_flash import world

    recipe_mod, _, model, tokenizer, rows = _tiny_world_target(tmp_path, num_layers=1, hidden=64)
    aid = recipe_mod.CountWords(model, weight=3.0)
    with torch.no_grad():
        logits = model(**recipe_mod.collate(rows)).logits
        expected = []
        for i, row in enumerate(rows):
            ex = world.example("visual_qa", world.SPLIT_SEEDS["heldout"] + i)
            if world.question_kind(ex["question"]) != "shape_count":
                continue
            verb, count = ex["answer"].split()[1:3]
            for position in (row.target_from, row.target_from + 1):
                word = row.token_ids[position + 1]
                assert tokenizer.decode(word).strip() == (verb if position == row.target_from else count)
                expected.append(torch.nn.functional.cross_entropy(logits[i, position], word))
        assert len(expected) >= 6
        assert aid.loss(rows).item() == pytest.approx(3.0 * torch.stack(expected).mean().item(), rel=1e-5)
        others = [r for r in rows if not recipe_mod.shape_question(r.row_id)]
        model(**recipe_mod.collate(others))
        assert aid.loss(others) is None


def test_target_diagnosis_finds_each_moves_destination_and_frame_pair():
    """diagnose_target's move-destination count, checked against the generator's own frames: every move of
    every clip, inside a frame pair when it ends on an odd frame, missed when a word naming the cell it entered
    is."""
    import re

    from vllm_flash import world

    diagnose_mod = _load(ROOT / "benchmarks" / "world" / "diagnose_target.py")
    moves_seen = 0
    for seed in range(30):
        ex = world.example("video_caption", seed)
        expected = []
        for k in range(1, len(ex["scenes"])):
            before, after = ({(o.shape, o.color, o.size, o.row, o.col) for o in frame}
                             for frame in ex["scenes"][k - 1:k + 1])
            if len(before) == len(after) and before != after:  # a move (appear / disappear change the count)
                (_,), (entered,) = before - after, after - before
                expected.append(("inside a frame pair" if k % 2 else "across frame pairs",
                                 world.Obj(*entered).place.split()))
        words = re.findall(r"\w+|[.,]", ex["answer"])
        hits = [i % 3 != 0 for i in range(len(words))]  # a word's hit must reach its destination's, unchanged
        got = list(diagnose_mod.move_destinations(words, hits))
        starts = [i + 2 for i in range(len(words)) if words[i] == "moves"]  # "the" of "moves to the top center"
        assert [words[i:i + len(place)] for i, (_, place) in zip(starts, expected)] == [p for _, p in expected]
        assert got == [(where, all(hits[i + 1:i + len(place)])) for i, (where, place) in zip(starts, expected)]
        moves_seen += len(expected)
    assert moves_seen > 20



def test_retext_study_trains_fresh_text_layers_on_the_frozen_tower_and_scores_counts_teacher_forced(tmp_path):
    """retext_study.py keeps the start's vision tower (untouched), embeddings and LM head, trains fresh text
    layers on count-heavy questions and then on every task, and exports a target; its count score reads the
    words at the two positions that decide a count: a model that predicts every next token gets them all, and
    one that says "three" for every "two" loses just the questions whose count is two."""
    import types

    from safetensors.torch import load_file

    from vllm_flash import world
    from vllm_flash.tiny_targets import build_tiny_qwen2_5_vl

    study = _load(ROOT / "benchmarks" / "world" / "retext_study.py")
    recipe_mod = sys.modules["train_target"]
    home = tmp_path / "world"
    init = build_tiny_qwen2_5_vl(home / "shallow-init", num_layers=2, hidden=64, lm_head_scale=1.0,
                                 vocab_size=512, corpus=recipe_mod.world_corpus(200), image_size=world.IMAGE_SIZE)
    (home / "data").mkdir()
    (home / "data" / "train.jsonl").write_text("".join(
        world.write_split(home / "data", task, "train", 3).read_text() for task in world.TASKS))
    out = tmp_path / "study"
    with pytest.raises(SystemExit):  # rows for two of the three tasks: refused before any work
        study.main(["--world", str(home), "--out", str(out), "--mix-steps", "2", "--mix-rows", "2,2"])
    assert not out.exists()
    assert study.main(["--world", str(home), "--start", str(init), "--out", str(out), "--layers", "1",
                       "--questions", "24", "--count-steps", "2", "--mix-steps", "2", "--mix-rows", "2,3,2",
                       "--batch-size", "2", "--score-rows", "0"]) == 0
    assert (home / "data" / "train-first-2-3-2.jsonl").read_text().count("\n") == 7  # all 3 questions
    before, after = load_file(init / "model.safetensors"), load_file(out / "mix" / "model.safetensors")
    assert {k for k in after if k.startswith("model.layers.")} == {k for k in before if k.startswith("model.layers.0.")}
    assert all(torch.equal(after[k], before[k]) for k in before if "visual" in k)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("model.layers.0."))
    assert (out / "target" / "model.safetensors").exists()
    report = json.loads((out / "report.json").read_text())
    examples = [world.example("visual_qa", world.SPLIT_SEEDS["heldout"] + i) for i in range(40)]
    asked = [ex for ex in examples if world.question_kind(ex["question"]) == "shape_count"]
    assert report["after_mix"]["questions"] == report["before"]["questions"] == len(asked) > 0
    assert report["count_rows"] == sum(
        world.question_kind(world.example("visual_qa", world.SPLIT_SEEDS["train"] + i)["question"]) == "shape_count"
        for i in range(24)) + 3

    check = recipe_mod.encode_split(init, study.count_heavy_questions(tmp_path / "check", "heldout", 40, 0))
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(init)
    two, three = (tokenizer.encode(f" {w}", add_special_tokens=False)[0] for w in ("two", "three"))

    class Oracle(torch.nn.Module):
        def __init__(self, spoil: bool) -> None:
            super().__init__()
            self.spoil = spoil

        def forward(self, input_ids, **_):
            following = torch.roll(input_ids, -1, dims=1)
            if self.spoil:
                following = torch.where(following == two, three, following)
            return types.SimpleNamespace(logits=torch.nn.functional.one_hot(following, 600).float())

    twos = sum(ex["answer"].split()[2] == "two" for ex in asked)
    assert 0 < twos < len(asked)
    right = study.teacher_forced_counts(Oracle(False), check)
    spoiled = study.teacher_forced_counts(Oracle(True), check)
    assert right["count"] == right["is_are"] == spoiled["is_are"] == len(asked)
    assert spoiled["count"] == len(asked) - twos
    assert spoiled["count_two_or_more"] == right["count_two_or_more"] - twos
