"""Both acceptance paths happen and are counted right; sampling at temperature 1 keeps the target's
distribution (draft tokens greedy, or sampled with their probabilities passed to the rejection sampler)."""
import collections
import math

import pytest
from vllm import SamplingParams

from vllm_flash.tiny_targets import chat_prompt

from .fitting import training_prompts
from .vllm_helpers import greedy, spec_metrics, token_ids, with_llm


def test_fitted_draft_gets_full_and_partial_acceptance(qwen_target, qwen_fitted_draft, qwen_random_draft):
    prompts = training_prompts("qwen2_5_vl", 16)  # the prompts the draft was fitted on

    def use(llm):
        return token_ids(llm.generate(prompts, greedy(max_tokens=40))), spec_metrics(llm)

    plain, _ = with_llm(qwen_target, None, use)
    fitted, good = with_llm(qwen_target, qwen_fitted_draft, use)
    random_outputs, bad = with_llm(qwen_target, qwen_random_draft, use)
    assert fitted == plain and random_outputs == plain
    per_position = good["num_accepted_tokens_per_pos"]
    assert len(per_position) == 4
    assert per_position[3] > 0, "some verify steps must accept all 4 draft tokens"
    assert per_position[0] > per_position[3], "and some must stop part-way"
    # per-position counts are cumulative acceptances: non-increasing, summing to the accepted total
    assert all(a >= b for a, b in zip(per_position, per_position[1:]))
    assert sum(per_position) == good["num_accepted_tokens"]
    fitted_rate = good["num_accepted_tokens"] / good["num_draft_tokens"]
    random_rate = bad["num_accepted_tokens"] / bad["num_draft_tokens"]
    assert fitted_rate > 0.3 and fitted_rate > 3 * random_rate, (fitted_rate, random_rate)


def chi_square_same_distribution(a: list[int], b: list[int]) -> float:
    """Two-sample chi-square p-value (categories with few samples pooled); a small value means the two
    samples are unlikely to come from the same distribution."""
    import torch

    ca, cb = collections.Counter(a), collections.Counter(b)
    keys = [k for k in set(ca) | set(cb) if ca[k] + cb[k] >= 10]
    rest_a = len(a) - sum(ca[k] for k in keys)
    rest_b = len(b) - sum(cb[k] for k in keys)
    table = [(ca[k], cb[k]) for k in keys] + ([(rest_a, rest_b)] if rest_a + rest_b > 0 else [])
    na, nb = len(a), len(b)
    stat = sum((x * math.sqrt(nb / na) - y * math.sqrt(na / nb)) ** 2 / (x + y) for x, y in table if x + y)
    dof = max(1, len(table) - 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))  # chi2 survival


@pytest.mark.parametrize("draft_sampling", ["greedy", "probabilistic"])
def test_sampling_distribution_matches_plain_vllm(qwen_target, qwen_fitted_draft, draft_sampling):
    # The first token comes from prefill; tokens 2-4 are decided through the rejection sampler.
    prompt = chat_prompt("qwen2_5_vl", "red circle")
    n = 600
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=s, ignore_eos=True) for s in range(n)]
    plain = with_llm(qwen_target, None, lambda llm: token_ids(llm.generate([prompt] * n, params)))

    def flash(llm):
        return token_ids(llm.generate([prompt] * n, params)), spec_metrics(llm)

    spec = {"draft_sample_method": draft_sampling}
    drafted, metrics = with_llm(qwen_target, qwen_fitted_draft, flash, speculative_overrides=spec)
    assert metrics["num_accepted_tokens"] > 100  # the accept path is exercised (hundreds of times)
    assert metrics["num_accepted_tokens"] < metrics["num_draft_tokens"]  # ... and the resample path too
    for position in (1, 2, 3):
        p = chi_square_same_distribution([o[position] for o in plain], [o[position] for o in drafted])
        # Bound: with 3 positions x 2 variants, a false alarm at this level has odds below 1 in 1000.
        assert p > 2e-4, f"token {position + 1}: the FLASH sample differs from plain vLLM's (p={p:.2g})"
    # A control that must fail the same check: a different temperature changes the distribution.
    hotter = [SamplingParams(temperature=2.0, max_tokens=4, seed=s, ignore_eos=True) for s in range(n)]
    other = with_llm(qwen_target, None, lambda llm: token_ids(llm.generate([prompt] * n, hotter)))
    assert min(chi_square_same_distribution([o[i] for o in plain], [o[i] for o in other]) for i in (1, 2, 3)) < 1e-3
