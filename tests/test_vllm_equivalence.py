"""The FLASH draft inside vLLM (paged KV, incremental steps) computes what the PyTorch reference computes
on the same target features: text-only, image, two-image and video requests, Qwen2.5-VL and LLaVA."""
import pytest
import torch

from vllm_flash.checkpoint import init_draft_for_target, load_draft, load_target_head, load_target_config, save_draft
from vllm_flash.config import target_facts
from vllm_flash.modeling import VisualFrames, frames_from_token_ids
from vllm_flash.proposer import FlashProposer
from vllm_flash.tiny_targets import mixed_requests

from .vllm_helpers import greedy, with_llm


class Recorder:
    """Captures, per draft pass, what the drafter received and the logits it sampled from."""

    def __init__(self, monkeypatch):
        self.steps = []
        original_set_inputs = FlashProposer.set_inputs_first_pass
        original_sample = FlashProposer._sample_draft_tokens
        recorder = self

        def set_inputs(self, target_token_ids, next_token_ids, target_positions, target_hidden_states,
                       token_indices_to_sample, cad, num_rejected_tokens_gpu):
            recorder.steps.append({
                "token_ids": target_token_ids.clone(), "next": next_token_ids.clone(),
                "hidden": target_hidden_states.clone(), "seq_len": int(cad.seq_lens[0]),
                "rejected": 0 if num_rejected_tokens_gpu is None else int(num_rejected_tokens_gpu[0]),
            })
            return original_set_inputs(self, target_token_ids, next_token_ids, target_positions,
                                       target_hidden_states, token_indices_to_sample, cad, num_rejected_tokens_gpu)

        def sample(self, hidden_states, sampling_metadata):
            # every call of compute_logits in this pass: one for all K slots, or one per slot (token mixer)
            calls, compute_logits = [], self.model.compute_logits

            def recording(h):
                logits = compute_logits(h)
                calls.append(logits.clone())
                return logits

            self.model.compute_logits = recording
            try:
                return original_sample(self, hidden_states, sampling_metadata)
            finally:
                del self.model.compute_logits
                recorder.steps[-1]["logits"] = torch.cat(calls)  # one request a pass: slot order

        monkeypatch.setattr(FlashProposer, "set_inputs_first_pass", set_inputs)
        monkeypatch.setattr(FlashProposer, "_sample_draft_tokens", sample)

    def sequences(self):
        """For each pass: (next_ids, features) of positions 0..anchor, rebuilt from all passes so far."""
        features, next_ids = {}, {}
        for step in self.steps:
            n = step["token_ids"].shape[0]
            first = step["seq_len"] - n
            valid = n - step["rejected"]  # accepted target tokens; the last one is the anchor
            for j in range(valid):
                features[first + j] = step["hidden"][j]
                next_ids[first + j] = int(step["token_ids"][j + 1]) if j + 1 < valid else int(step["next"][0])
            anchor = first + valid - 1
            assert sorted(features)[: anchor + 1] == list(range(anchor + 1))
            yield (torch.tensor([next_ids[p] for p in range(anchor + 1)]),
                   torch.stack([features[p] for p in range(anchor + 1)]), step["logits"])


SHIPPED_COMPRESSOR = {"compressor_saliency": True, "compressor_exclusion": 5.0}  # the toy world's flash


@pytest.mark.parametrize("kind,mixer,layers,compressor", [
    ("qwen2_5_vl", False, None, {}), ("llava", False, None, {}), ("qwen2_5_vl", True, None, {}),
    ("llava", False, [1, 2], {}), ("qwen2_5_vl", True, [1, 2], SHIPPED_COMPRESSOR)])
def test_vllm_draft_logits_equal_reference(kind, mixer, layers, compressor, request, tmp_path, monkeypatch):
    """With a token mixer, vLLM drafts slot by slot from the tokens it drafted, as the reference does. A draft
    reading several target layers is handed their states by vLLM's runner and combines them as the reference
    combines the same states. The compressor options pool each frame in vLLM's flat token axis as the reference
    pools it."""
    target = request.getfixturevalue("qwen_target" if kind == "qwen2_5_vl" else "llava_target")
    torch.manual_seed(0)
    draft = init_draft_for_target(target, num_speculative_tokens=4, num_latents=4, slot_token_mixer=mixer,
                                  target_layer_ids=layers, **compressor)
    if mixer:
        with torch.no_grad():
            draft.token_mixer.out.weight.normal_(0, 0.3)  # a fresh one changes nothing
    save_draft(draft, tmp_path / "draft")
    reference = load_draft(tmp_path / "draft")
    reference.attach_target_head(*load_target_head(target))
    facts = target_facts(load_target_config(target))
    recorder = Recorder(monkeypatch)
    requests = mixed_requests(kind)

    def generate_each(llm):
        outputs = []
        for req in requests:
            recorder.steps.clear()
            outputs.append((llm.generate([req], greedy(max_tokens=12))[0], list(recorder.steps)))
        return outputs

    for i, (req, (out, steps)) in enumerate(zip(requests, with_llm(target, tmp_path / "draft", generate_each,
                                                                   enable_prefix_caching=False))):
        recorder.steps = steps
        prompt = out.prompt_token_ids
        videos = [2] if kind == "qwen2_5_vl" and "video" in str(req) else []  # 4 frames / temporal patch 2
        starts, lengths = frames_from_token_ids(prompt, facts["image_token_id"], facts["video_token_id"], videos)
        checked = 0
        for next_ids, features, logits in recorder.sequences():
            frames = VisualFrames(torch.tensor(starts), torch.tensor(lengths)) if starts else None
            expected = reference.draft_logits(next_ids, features, frames, k=4)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"request {i}, pass {checked}: {m}")
            checked += 1
        assert checked >= 2, "expected a prefill pass and at least one decode pass"
