import os

# vLLM on CPU, in-process, offline (see shared VLLM.md); set before anything imports vLLM.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Several engines share this process; vLLM re-seeds its prefix-cache hash per engine unless this is set,
# which leaves a later engine's request hashes out of step with its cache (no hits).
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402

from vllm_flash.tiny_targets import build_tiny_target  # noqa: E402


@pytest.fixture(scope="session")
def qwen_target(tmp_path_factory):
    return build_tiny_target("qwen2_5_vl", tmp_path_factory.mktemp("targets") / "qwen2_5_vl")


@pytest.fixture(scope="session")
def llava_target(tmp_path_factory):
    return build_tiny_target("llava", tmp_path_factory.mktemp("targets") / "llava")


@pytest.fixture(scope="session", params=["qwen2_5_vl", "llava"])
def any_target(request):
    return request.getfixturevalue("qwen_target" if request.param == "qwen2_5_vl" else "llava_target")


def _write_random_draft(target, out, k=4, latents=4, seed=0, mixer=False, layers=None):
    import torch

    from vllm_flash.checkpoint import init_draft_for_target, save_draft

    torch.manual_seed(seed)
    draft = init_draft_for_target(target, num_speculative_tokens=k, num_latents=latents, slot_token_mixer=mixer,
                                  target_layer_ids=layers)
    if mixer:
        with torch.no_grad():
            draft.token_mixer.out.weight.normal_(0, 0.3)  # a fresh mixer changes nothing
    return save_draft(draft, out)


@pytest.fixture(scope="session")
def qwen_random_draft(qwen_target, tmp_path_factory):
    return _write_random_draft(qwen_target, tmp_path_factory.mktemp("drafts") / "qwen_random")


@pytest.fixture(scope="session")
def qwen_random_mixer_draft(qwen_target, tmp_path_factory):
    return _write_random_draft(qwen_target, tmp_path_factory.mktemp("drafts") / "qwen_random_mixer", mixer=True)


@pytest.fixture(scope="session")
def qwen_random_layers_draft(qwen_target, tmp_path_factory):
    """Reads the states after both of the tiny target's layers (EAGLE-3-style features), not its final ones."""
    return _write_random_draft(qwen_target, tmp_path_factory.mktemp("drafts") / "qwen_random_layers", layers=[1, 2])


@pytest.fixture(scope="session")
def llava_random_draft(llava_target, tmp_path_factory):
    return _write_random_draft(llava_target, tmp_path_factory.mktemp("drafts") / "llava_random")


@pytest.fixture(scope="session")
def qwen_fitted_draft(qwen_target, tmp_path_factory):
    """A draft fitted to the tiny Qwen2.5-VL's own greedy continuations, so that it is often right."""
    from tests.fitting import fit_draft_on_own_outputs

    return fit_draft_on_own_outputs(qwen_target, tmp_path_factory.mktemp("drafts") / "qwen_fitted")
