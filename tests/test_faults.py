"""Bad requests fail alone, with a specific error, and leave the FLASH engine serving exactly as before."""
import numpy as np
import pytest
from PIL import Image
from vllm import SamplingParams

from vllm_flash.tiny_targets import chat_prompt, mixed_requests, random_image

from .vllm_helpers import greedy, token_ids, with_llm

IMAGE_PROMPT = chat_prompt("qwen2_5_vl", "describe", images=1)


def bad_requests():
    long_prompt = chat_prompt("qwen2_5_vl", "red circle " * 700)
    return {
        "zero-size image": ({"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": Image.new("RGB", (0, 0))}},
                            greedy(), r"(?i)image|size|dimension|height|width"),
        "too many images": ({"prompt": chat_prompt("qwen2_5_vl", "three", images=3),
                             "multi_modal_data": {"image": [random_image(i, 112) for i in range(3)]}},
                            greedy(), r"(?i)at most 2 image"),
        "prompt longer than max_model_len": (long_prompt, greedy(), r"maximum context length is 1024 tokens"),
    }


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(qwen_target, qwen_random_draft):
    good = mixed_requests("qwen2_5_vl")

    def use(llm):
        errors = {}
        for name, (request, params, message) in bad_requests().items():
            with pytest.raises(Exception, match=message) as err:
                llm.generate([request], params, use_tqdm=False)
            errors[name] = str(err.value)
        # a huge image is scaled down by the processor, not refused
        huge = llm.generate([{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": random_image(9, 2000)}}],
                            greedy(max_tokens=4), use_tqdm=False)
        assert len(huge[0].outputs[0].token_ids) == 4
        return token_ids(llm.generate(good, greedy(), use_tqdm=False)), errors

    plain = with_llm(qwen_target, None, lambda llm: token_ids(llm.generate(good, greedy(), use_tqdm=False)))
    after_faults, errors = with_llm(qwen_target, qwen_random_draft, use)
    assert after_faults == plain, errors


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must be at least 1"),
])
def test_bad_sampling_parameters_are_refused_by_name(kwargs, message):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match=message):
        SamplingParams(**kwargs)
