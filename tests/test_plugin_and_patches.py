"""The plugin entry point, the version check, and the patch registry."""
import importlib.metadata
import subprocess
import sys

import pytest

import vllm_flash.patches as patches
from vllm_flash import plugin


def test_entry_point_is_discoverable():
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert found.get("vllm_flash") == "vllm_flash.plugin:register"


def test_plugin_loads_inside_a_fresh_vllm_process():
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "from vllm.config.speculative import SpeculativeConfig;"
        "from vllm.engine.arg_utils import get_kwargs;"
        "assert 'flash' in get_kwargs(SpeculativeConfig)['method']['choices'];"
        "from transformers import AutoConfig; from vllm_flash.config import FlashConfig;"
        "assert AutoConfig.for_model('flash_draft').__class__ is FlashConfig;"
        "from vllm import ModelRegistry; assert 'FlashDraftModel' in ModelRegistry.get_supported_archs();"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_unsupported_vllm_version_is_refused_with_the_versions_named(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.1")
    with pytest.raises(patches.UnsupportedVllmVersion, match=r"supports vLLM 0\.32\.0, but vLLM 0\.31\.1"):
        patches.check_vllm_version()
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(patches.UnsupportedVllmVersion):
        plugin.register()
    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    assert patches.check_vllm_version() == "0.32.0"


def test_every_patch_applies_once_keeps_its_original_and_reverts():
    patches.apply_all()
    assert {p.attribute for p in patches.REGISTRY} >= {"__annotations__", "__post_init__", "use_eagle", "__new__",
                                                        "expand_batch_to_tokens"}
    for patch in patches.REGISTRY:
        assert patch.applied, patch
        owner = patch.resolve()
        replaced = getattr(owner, patch.attribute)
        patch.apply()  # a second application is a no-op
        assert getattr(owner, patch.attribute) is replaced
    patch = next(p for p in patches.REGISTRY if p.attribute == "use_eagle")
    original = patch.original
    patch.revert()
    try:
        assert patch.resolve().use_eagle is original
    finally:
        patch.apply()
    assert patch.resolve().use_eagle is not original


def test_cpu_expand_patch_matches_the_reference_expansion():
    import torch
    import vllm.v1.sample.rejection_sampler as rs

    patches.apply_all()
    x = torch.tensor([1.0, -1.0, 0.7])
    out = rs.expand_batch_to_tokens(x, torch.tensor([2, 5, 6]), 6, replace_from=-1, replace_to=1)
    assert out.tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 0.7])


def test_patches_cli_lists_every_change():
    from vllm_flash.cli import main

    assert main(["patches"]) == 0


def test_init_cli_on_both_tiny_targets(any_target, tmp_path):
    from vllm_flash.checkpoint import load_draft, load_target_config
    from vllm_flash.cli import main
    from vllm_flash.config import validate_against_target

    assert main(["init", "--target", str(any_target), "--out", str(tmp_path / "d"), "--k", "3",
                 "--latents", "5"]) == 0
    draft = load_draft(tmp_path / "d")
    assert draft.config.num_speculative_tokens == 3 and draft.config.num_latents == 5
    validate_against_target(draft.config, load_target_config(any_target), num_speculative_tokens=3)
    # the target's embedding and LM head are shared, not copied into the draft
    vocab = draft.config.vocab_size
    assert all(vocab not in t.shape for t in draft.state_dict().values())


def test_cli_shortcut_flags_build_a_flash_config(qwen_target, qwen_random_draft):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(qwen_target), "--spec-method", "flash", "--spec-model",
                              str(qwen_random_draft), "--spec-tokens", "3", "--dtype", "float32",
                              "--enforce-eager", "--max-model-len", "512"])
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    spec = config.speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.parallel_drafting) == ("flash", 3, True)
    assert spec.use_eagle() and spec.draft_model_config.hf_config.model_type == "flash_draft"
    assert config.scheduler_config.disable_chunked_mm_input  # an image is never split across chunks
