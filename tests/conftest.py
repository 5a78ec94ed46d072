import os

# vLLM on CPU, in-process, offline (see shared VLLM.md); set before anything imports vLLM.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
