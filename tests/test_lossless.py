"""Greedy FLASH output is token-identical to plain vLLM: mixed batches (text, 1 and 2 images, video),
different lengths, early stops, K = 1, 2, 4, chunked prefill, prefix caching, max_model_len, preemption."""
import pytest

from vllm_flash.tiny_targets import chat_prompt, mixed_requests

from .vllm_helpers import greedy, spec_metrics, token_ids, with_llm

ENGINE = dict(max_model_len=288, max_num_batched_tokens=128, enable_chunked_prefill=True,
              enable_prefix_caching=True, block_size=32)


def workload(kind):
    requests = mixed_requests(kind)
    image = requests[2]["multi_modal_data"]
    repeated = {"prompt": chat_prompt(kind, "describe the picture " + "and the red circle " * 20, images=1),
                "multi_modal_data": image}
    long_text = chat_prompt(kind, " ".join(["red circle next to a blue square"] * 24))
    requests[2] = repeated  # sent again below: a prefix-cache hit on an image prompt
    requests += [repeated, long_text]  # ... and a request that runs into max_model_len
    params = [greedy(max_tokens=n) for n in (24, 3, 20, 16, 24, 20)[: len(requests) - 2]]
    params += [greedy(max_tokens=20), greedy(max_tokens=400)]
    return requests, params


def run(target, draft, k, kind, **engine):
    requests, params = workload(kind)

    def use(llm):
        first = llm.generate(requests, params)
        longest = first[-1]
        assert len(longest.prompt_token_ids) + len(longest.outputs[0].token_ids) == ENGINE["max_model_len"]
        again = llm.generate([requests[2]], params[2])  # served from the prefix cache
        assert again[0].num_cached_tokens > 0
        return token_ids(first) + token_ids(again), (spec_metrics(llm) if draft else {})

    return with_llm(target, draft, use, k=k, **{**ENGINE, **engine})


@pytest.fixture(scope="module")
def baselines(qwen_target, llava_target):
    return {kind: run(target, None, 0, kind)[0]
            for kind, target in (("qwen2_5_vl", qwen_target), ("llava", llava_target))}


@pytest.mark.parametrize("kind,k,variant", [(kind, k, "") for kind in ("qwen2_5_vl", "llava") for k in (1, 2, 4)]
                         + [("qwen2_5_vl", 4, "mixer"), ("qwen2_5_vl", 4, "layers")])
def test_greedy_flash_equals_plain_vllm(kind, k, variant, baselines, request):
    """variant: "mixer", a token mixer; "layers", a draft reading several target layers (the runner's aux
    hidden states)."""
    target = request.getfixturevalue("qwen_target" if kind == "qwen2_5_vl" else "llava_target")
    draft = request.getfixturevalue(f"qwen_random_{variant}_draft" if variant else
                                    "qwen_random_draft" if kind == "qwen2_5_vl" else "llava_random_draft")
    outputs, metrics = run(target, draft, k, kind)
    assert outputs == baselines[kind]
    # Every verify step drafted K tokens, except where a request's end (max_tokens / max_model_len) cut it.
    assert metrics["num_drafts"] > 0
    assert (k - 1) * metrics["num_drafts"] < metrics["num_draft_tokens"] <= k * metrics["num_drafts"]


def test_preemption_keeps_output_identical(qwen_target, qwen_random_draft):
    requests = [chat_prompt("qwen2_5_vl", f"describe {w} circle and square") for w in ("red", "blue", "green",
                                                                                      "black", "white", "tiny")]
    small_cache = dict(max_model_len=160, num_gpu_blocks_override=6, block_size=32, enable_prefix_caching=False,
                       max_num_seqs=6)

    def use(llm):
        outputs = token_ids(llm.generate(requests, greedy(max_tokens=60)))
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        assert preemptions > 0, "the KV cache was meant to be too small for all requests at once"
        return outputs

    plain = with_llm(qwen_target, None, use, **small_cache)
    assert with_llm(qwen_target, qwen_random_draft, use, **small_cache) == plain
