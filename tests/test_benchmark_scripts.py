"""The benchmark helper scripts run end to end (small) and write their numbers: the GPU micro-benchmark at CPU
size, and the image-size A/B."""
import importlib
import importlib.util
import json
from pathlib import Path


def test_gpu_microbenchmark_runs_small_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "draft_vs_target.py"
    spec = importlib.util.spec_from_file_location("draft_vs_target", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    result = module.main(["--small", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"] == result["rows"] and [r["batch_size"] for r in written["rows"]] == [1, 8]
    assert all(r["target_forward_ms"] > 0 and r["draft_pass_ms"] > 0 for r in written["rows"])


def test_gpu_microbenchmark_runs_without_transformers(tmp_path):
    """The GPU machines here carry PyTorch alone: the script must run where transformers cannot be imported."""
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "draft_vs_target.py"
    out = tmp_path / "r.json"
    code = ("import runpy, sys; sys.modules['transformers'] = None; "  # None: `import transformers` fails
            f"sys.argv = ['x', '--small', '--out', {str(out)!r}]; runpy.run_path({str(path)!r}, run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert [r["batch_size"] for r in json.loads(out.read_text())["rows"]] == [1, 8]
    assert out.with_suffix(".md").read_text().count("\n| ") == 3  # the header, then one line per batch size


def test_image_size_ab_trains_each_arm_on_its_own_image_size(tmp_path, monkeypatch):
    """The A/B script trains and scores one arm per image size, each on images of that size: 16 merged visual
    tokens at 112 px, 9 at 84 px (one per grid cell)."""
    from PIL import Image

    # imported by name, so that the arms' worker processes can import it too
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks" / "world"))
    module = importlib.import_module("image_size_ab")
    out = tmp_path / "ab"
    assert module.main(["--out", str(out), "--rows", "4", "--steps", "2", "--check-rows", "2"]) == 0
    results = json.loads((out / "result.json").read_text())
    assert [(r["image_size"], r["visual_tokens"]) for r in results] == [(112, 16), (84, 9)]
    for r in results:
        images = sorted((out / f"{r['image_size']}px" / "data").rglob("*.png"))
        assert images and all(Image.open(f).size == (r["image_size"],) * 2 for f in images)
        for split in ("train", "heldout"):
            assert 0 < r[split]["loss"] and int(r[split]["missed_by_kind"]["shape"].split("/")[1]) > 0
        assert 0 <= r["heldout_served"]["exact_match"] <= 1 and 0 <= r["heldout_served"]["word_accuracy"] <= 1


def _compressor_pooling_and_draft(latents: int):
    """benchmarks/world/compressor_pooling.py as a module, and a tiny seeded draft with `latents` latents."""
    import torch

    from vllm_flash.config import FlashConfig
    from vllm_flash.modeling import FlashDraft

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "world" / "compressor_pooling.py"
    spec = importlib.util.spec_from_file_location("compressor_pooling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module, FlashDraft(FlashConfig(hidden_size=32, vocab_size=50, num_attention_heads=2,
                                          num_key_value_heads=1, num_latents=latents, compressor_key_norm=True))


def test_compressor_pooling_reports_mean_pooling_and_picking_apart():
    """Zero queries pool every frame to its mean (entropy 1 of uniform's, largest weight 1/L); a query pointed
    hard at one token picks it out (entropy near 0, largest weight near 1)."""
    import torch

    from vllm_flash.train import Sample

    module, draft = _compressor_pooling_and_draft(latents=1)
    features = torch.randn(20, 32)
    samples = [Sample(torch.zeros(20, dtype=torch.long), features, frames=[(2, 8), (12, 4), (19, 1)]),
               Sample(torch.zeros(20, dtype=torch.long), features)]  # no frames: skipped
    with torch.no_grad():
        draft.compressor.queries.zero_()
    stats = module.pooling_stats(draft, samples)
    assert stats["frames"] == 2  # the one-token frame is skipped
    assert abs(stats["normalised_entropy"] - 1) < 1e-5 and abs(stats["largest_weight"] - (1 / 8 + 1 / 4) / 2) < 1e-5
    with torch.no_grad():  # point the query at the first token of each frame
        draft.compressor.queries.copy_(50 * (features[2] / features[2].norm() + features[12] / features[12].norm()))
    stats = module.pooling_stats(draft, samples)
    assert stats["normalised_entropy"] < 0.05 and stats["largest_weight"] > 0.98


def test_compressor_diagnosis_counts_the_objects_the_latents_pick_and_scores_slots_as_training_does():
    """Per object count, the distinct tokens the latents pick and the share of the objects' tokens among them; and
    each slot's teacher-forced accuracy, the one training reports (`flash_loss`)."""
    import torch

    from vllm_flash.modeling import flash_loss
    from vllm_flash.train import Sample, collate

    module, draft = _compressor_pooling_and_draft(latents=2)
    frame = torch.randn(9, 32)
    with torch.no_grad():  # both latents aimed hard at token 4
        draft.compressor.queries.copy_(50 * frame[4] / frame[4].norm())
    stats = module.object_coverage(draft, [(frame, [4, 7]), (frame, [4]), (frame, [1])])
    assert stats == {2: {"images": 1, "distinct_picks": 1.0, "object_coverage": 0.5},
                     1: {"images": 2, "distinct_picks": 1.0, "object_coverage": 0.5}}

    draft.attach_target_head(torch.randn(50, 32), torch.randn(50, 32))
    samples = [Sample(torch.randint(0, 50, (n,)), torch.randn(n, 32), frames=[(1, 3)], target_from=5)
               for n in (12, 15, 9)]
    accuracy = module.slot_accuracy(draft, samples, batch_size=2)
    batch = collate(samples)
    with torch.no_grad():
        trained = flash_loss(draft, draft(batch["next_ids"], batch["inputs"], batch["frames"]), batch["features"],
                             batch["target_mask"], batch["input_mask"], 1.0)
    counts = trained.slot_count
    assert len(accuracy) == 4 and all(0 <= a <= 1 for a in accuracy)
    assert accuracy == [round(a, 4) for a in trained.slot_accuracy] and all(c > 0 for c in counts)


def test_heldout_tau_scores_each_draft_on_the_same_heldout_rows_against_plain_vllm(tmp_path):
    """The held-out rows are written once (a second run reads them), every draft is scored on the same rows with
    its outputs compared to plain vLLM's (the EAGLE-3 draft through vLLM's eagle3), one question kind at a time
    (the task's tau is the parts' summed), and the table gives flash's tau over flash_nocompress's and eagle3's."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "world" / "heldout_tau.py"
    spec = importlib.util.spec_from_file_location("heldout_tau", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows_dir, results = tmp_path / "rows", tmp_path / "results"
    argv = ["--drafts", "flash,flash_nocompress,eagle3", "--tasks", "visual_qa", "--rows", "3", "--max-tokens", "24",
            "--rows-dir", str(rows_dir), "--results", str(results), "--by-question-kind", "--output", "by_kind"]
    first = module.main(argv)
    rows = rows_dir / "visual_qa-heldout-3.jsonl"
    assert len(rows.read_text().splitlines()) == 3 and len(list((rows_dir / "visual_qa-heldout").glob("*.png"))) == 3
    by_draft = first["tasks"]["visual_qa"]
    assert set(by_draft) == {"flash", "flash_nocompress", "eagle3"}
    for r in by_draft.values():
        assert r["identical_to_none"] and 1 <= r["tau"] <= 5 and len(r["acceptance_per_position"]) == 4
    kinds = first["question_kinds"]  # the first three held-out questions: two shape counts, one "where is"
    assert {kind: part["rows"] for kind, part in kinds.items()} == {"shape_count": 2, "where": 1}
    for name, r in by_draft.items():
        steps = sum(part[name]["verify_steps"] for part in kinds.values())
        summed = 1 + sum((part[name]["tau"] - 1) * part[name]["verify_steps"] for part in kinds.values()) / steps
        assert abs(r["tau"] - summed) < 1e-3 and all(part[name]["identical_to_none"] for part in kinds.values())
    written = json.loads((results / "by_kind.json").read_text())
    assert written["tasks"] == first["tasks"] and written["rows"] == 3
    table = (results / "by_kind.md").read_text()
    for other in ("flash_nocompress", "eagle3"):
        ratio = by_draft["flash"]["tau"] / by_draft[other]["tau"]
        assert f"flash / {other} tau: visual_qa {ratio:.3f}" in table
    assert f"| where | 1 | {kinds['where']['flash']['tau']:.3f} |" in table
    stamp = rows.stat().st_mtime_ns
    module.heldout_rows(rows_dir, "visual_qa", 3, 84)
    assert rows.stat().st_mtime_ns == stamp  # not written again
