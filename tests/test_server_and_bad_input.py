"""`vllm serve` with FLASH over HTTP on 127.0.0.1, and bad drafts / bad requests."""
import base64
import json

import pytest
import requests
import torch

from vllm_flash.checkpoint import init_draft_for_target, save_draft
from vllm_flash.loadgen import Server, png_data_url

from .vllm_helpers import make_llm


@pytest.fixture(scope="module")
def server(qwen_target, qwen_random_draft, tmp_path_factory):
    spec = json.dumps({"method": "flash", "model": str(qwen_random_draft), "num_speculative_tokens": 3})
    with Server(str(qwen_target), ["--speculative-config", spec],
                tmp_path_factory.mktemp("server") / "serve.log") as running:
        yield running.base


def image_message(data_url: str, text: str = "describe the picture") -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": text}]}]


def chat(base, messages, max_tokens=16):
    return requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"],
        "messages": messages, "max_tokens": max_tokens, "temperature": 0})


def test_server_answers_image_chat_and_exports_spec_metrics(server):
    reply = chat(server, image_message(png_data_url(1)))
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 16
    metrics = requests.get(f"{server}/metrics", timeout=10).text
    drafts = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_drafts")]
    assert drafts and float(drafts[0].split()[-1]) > 0, drafts
    assert "vllm:spec_decode_num_accepted_tokens_per_pos" in metrics


def test_corrupt_image_fails_alone_and_server_keeps_serving(server):
    bad = chat(server, image_message("data:image/png;base64," + base64.b64encode(b"not a png at all").decode()))
    assert bad.status_code == 400, bad.text
    good = chat(server, [{"role": "user", "content": "red circle"}])
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None


# ---------------------------------------------------------------------------------------------------------
# Drafts that do not fit: vLLM refuses to start, naming the problem.
# ---------------------------------------------------------------------------------------------------------
def bad_draft(target, out, **overrides):
    torch.manual_seed(0)
    return save_draft(init_draft_for_target(target, num_latents=4, **overrides), out)


@pytest.mark.parametrize("overrides,k,message", [
    ({"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}, 4,
     "hidden_size: draft has 64, target has 128"),
    ({"vocab_size": 300}, 4, "vocab_size: draft has 300, target has"),
    ({"image_token_id": 3}, 4, "image_token_id: draft has 3, target has"),
    ({}, 6, "num_speculative_tokens: requested 6, but the draft has 4"),
])
def test_mismatched_draft_refuses_to_start(qwen_target, tmp_path, overrides, k, message):
    draft = bad_draft(qwen_target, tmp_path / "d", **overrides)
    with pytest.raises(Exception, match=message):
        make_llm(qwen_target, draft, k=k)


def test_draft_directory_problems_refuse_to_start(qwen_target, tmp_path):
    draft = bad_draft(qwen_target, tmp_path / "d")
    cases = {
        "missing weights": (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
        "pickle only": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                        "pickle-based weights.*safetensors only"),
        "missing config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
        "not a directory": (lambda d: None, "does not exist"),
    }
    for name, (damage, message) in cases.items():
        case_dir = tmp_path / name.replace(" ", "_")
        if name != "not a directory":
            bad_draft(qwen_target, case_dir)
            damage(case_dir)
        with pytest.raises(Exception, match=message):
            make_llm(qwen_target, case_dir, k=4)


def test_draft_with_bad_tensors_refuses_to_start(qwen_target, tmp_path):
    from safetensors.torch import load_file, save_file

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    for name, damage, message in [
        ("nan", lambda s: s["norm.weight"].fill_(float("nan")), "norm.weight contains NaN"),
        ("shape", lambda s: s.__setitem__("layer.q_proj.weight", torch.zeros(3, 3)),
         r"layer.q_proj.weight has shape \(3, 3\)"),
    ]:
        draft = bad_draft(qwen_target, tmp_path / name)
        state = load_file(draft / "model.safetensors")
        damage(state)
        save_file(state, draft / "model.safetensors")
        with pytest.raises(Exception, match=message):
            make_llm(qwen_target, draft, k=4)
        cleanup_dist_env_and_memory()
