"""The reference FLASH draft: mask, compressor, shapes, loss, checkpoints, config validation."""
import itertools

import pytest
import torch

from vllm_flash.checkpoint import CheckpointError, load_draft, save_draft
from vllm_flash.config import FlashConfig, FlashConfigError, validate_against_target
from vllm_flash.modeling import (FlashDraft, LatentCompressor, Rotary, VisualFrames, flash_loss, latent_layout,
                                 sar_mask)

HIDDEN, VOCAB = 64, 97


def make_draft(k=4, latents=4, seed=0, **kw) -> FlashDraft:
    torch.manual_seed(seed)
    config = FlashConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, num_speculative_tokens=k, num_latents=latents,
                         target_architecture="Toy", **kw)
    draft = FlashDraft(config)
    draft.attach_target_head(torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5)
    return draft


@pytest.mark.parametrize("t,k", [(1, 1), (3, 2), (5, 4), (7, 3)])
def test_sar_mask_matches_brute_force(t, k):
    mask = sar_mask(t, k)
    for (tq, iq), (tk, ik) in itertools.product(itertools.product(range(t), range(k)), repeat=2):
        allowed = (ik == 0 and tk < tq) or (tk == tq and ik <= iq)
        assert bool(mask[tq * k + iq, tk * k + ik]) == allowed, (tq, iq, tk, ik)


def test_sar_block_of_last_position_equals_causal_attention_over_prefix_plus_slots():
    # What vLLM computes at inference ([real positions..., K-1 slots], causal) is what training computes.
    t, k = 6, 4
    mask = sar_mask(t, k)
    last_block = mask[(t - 1) * k:, :]
    keys = [(s, 0) for s in range(t)] + [(t - 1, i) for i in range(1, k)]
    cols = [s * k + i for s, i in keys]
    causal = torch.ones(k, len(cols), dtype=torch.bool).tril(diagonal=t - 1)
    assert torch.equal(last_block[:, cols], causal)
    assert last_block.sum() == causal.sum()  # nothing outside those keys


def test_rotary_reads_from_its_table_what_the_formula_computes():
    """The table holds exactly the values computing cos and sin per call gives (so no trained draft changes),
    for batched positions in any order; a position past the table is refused, not wrapped around."""
    torch.manual_seed(0)
    rotary = Rotary(head_dim=16, theta=10000.0, max_positions=512)
    x = torch.randn(2, 7, 3, 16, dtype=torch.bfloat16)
    positions = torch.randint(0, 512, (2, 7))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    angle = torch.cat([positions.float()[..., None] * inv_freq] * 2, dim=-1)[..., None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    expected = (x.float() * angle.cos() + torch.cat([-x2, x1], dim=-1) * angle.sin()).to(x.dtype)
    q, k = rotary(positions, x, x[..., :1, :])  # one lookup for queries and keys with fewer heads
    assert torch.equal(q, expected) and torch.equal(k, expected[..., :1, :])
    assert torch.equal(rotary(positions[0], x[0])[0], expected[0])  # no batch axis
    with pytest.raises(IndexError):
        rotary(torch.full((2, 7), 512), x)


def test_compressor_invariant_to_token_permutation_and_frames_independent():
    torch.manual_seed(0)
    comp = LatentCompressor(3, HIDDEN)
    frames = torch.randn(2, 10, HIDDEN)
    valid = torch.ones(2, 10, dtype=torch.bool)
    out = comp(frames, valid)
    perm = torch.randperm(10)
    permuted = comp(frames[:, perm], valid)
    torch.testing.assert_close(out, permuted, rtol=1e-5, atol=1e-6)
    changed = frames.clone()
    changed[1] += torch.randn_like(changed[1])
    out2 = comp(changed, valid)
    torch.testing.assert_close(out2[0], out[0])  # frame 0 does not see frame 1
    assert not torch.allclose(out2[1], out[1])


def test_compressor_ignores_padding():
    torch.manual_seed(0)
    comp = LatentCompressor(3, HIDDEN)
    frames = torch.randn(1, 10, HIDDEN)
    valid = torch.zeros(1, 10, dtype=torch.bool)
    valid[0, :6] = True
    garbage = frames.clone()
    garbage[0, 6:] = 1e3 * torch.randn(4, HIDDEN)
    torch.testing.assert_close(comp(frames, valid), comp(garbage, valid))
    torch.testing.assert_close(comp(frames, valid), comp(frames[:, :6], valid[:, :6]))


def test_fresh_compressor_can_pick_out_single_tokens():
    """A fresh compressor's pooling is already far from its frame's mean on unit-scale features, so training can
    sharpen it into picking tokens out. Queries of norm 1 scored every token nearly alike (entropy 0.997 of
    uniform's here) and stayed so through training (README, "Train your own draft")."""
    torch.manual_seed(0)
    comp = LatentCompressor(3, HIDDEN)
    frames = torch.randn(100, 10, HIDDEN)
    valid = torch.ones(100, 10, dtype=torch.bool)
    valid[:50, 7:] = False
    weights = comp.weights(frames, valid)
    torch.testing.assert_close(weights.sum(-1), torch.ones(100, 3))
    assert (weights[:50, :, 7:] == 0).all()
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1) / valid.sum(-1, keepdim=True).log()
    assert entropy.mean() < 0.6 and weights.max(-1).values.mean() > 0.5
    torch.testing.assert_close(comp(frames, valid), weights @ frames)
    # the keys are normalised: the pooling does not depend on the features' scale, only the values do
    torch.testing.assert_close(comp.weights(frames * 25, valid), weights)


def test_compressor_without_key_norm_pools_as_drafts_trained_before_it():
    """A draft config without `compressor_key_norm` (every draft trained before it) scores the raw features,
    as it was trained to; new drafts normalise the keys."""
    torch.manual_seed(0)
    old = make_draft(latents=3)
    assert not old.config.compressor_key_norm and not old.compressor.key_norm
    frames, valid = torch.randn(2, 9, HIDDEN) * 4, torch.ones(2, 9, dtype=torch.bool)
    scores = torch.einsum("cd,gld->gcl", old.compressor.queries, frames) / HIDDEN**0.5
    torch.testing.assert_close(old.compressor(frames, valid), torch.softmax(scores, -1) @ frames)
    assert make_draft(latents=3, compressor_key_norm=True).compressor.key_norm


def test_compressor_exclusion_makes_latents_pick_different_tokens():
    """Latents that all prefer one token pool it alike on their own; with exclusion each scores down what the
    latents before it took, so they pick distinct tokens (still summing to 1 over the valid ones, padding 0).
    A config without the field (every draft trained before it) has none."""
    torch.manual_seed(0)
    frames, valid = torch.randn(4, 9, HIDDEN), torch.ones(4, 9, dtype=torch.bool)
    valid[0, 5:] = False
    alone, excluding = LatentCompressor(3, HIDDEN), LatentCompressor(3, HIDDEN, exclusion=20.0)
    with torch.no_grad():
        for comp in (alone, excluding):
            comp.queries.copy_(frames[:, 2].mean(0).expand(3, -1) * 3)  # every latent aimed at each frame's token 2
    assert all(len(set(picks.tolist())) == 1 for picks in alone.weights(frames, valid).argmax(-1))
    weights = excluding.weights(frames, valid)
    assert all(len(set(picks.tolist())) == 3 for picks in weights.argmax(-1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 3))
    assert (weights[0, :, 5:] == 0).all()
    torch.testing.assert_close(excluding(frames, valid), weights.to(frames.dtype) @ frames)
    assert make_draft(latents=3).compressor.exclusion == 0.0
    assert make_draft(latents=3, compressor_exclusion=20.0).compressor.exclusion == 20.0


def test_compressor_saliency_picks_the_tokens_that_stand_out_from_their_frame():
    """With saliency every latent's scores favour the tokens far from their frame's mean: in frames of identical
    background tokens and three objects, three exclusive latents pick exactly the objects, whatever their
    queries prefer, where the same queries without it pick background cells too. A config without the field
    (every draft trained before it) has no saliency weight, so its checkpoint still loads."""
    torch.manual_seed(0)
    frames = torch.randn(1, HIDDEN).expand(8, 9, HIDDEN).clone()  # one background token everywhere
    objects = torch.stack([torch.randperm(9)[:3] for _ in range(8)])
    for g, cells in enumerate(objects):
        frames[g, cells] += 2 * torch.randn(3, HIDDEN)
    valid = torch.ones(8, 9, dtype=torch.bool)
    plain, salient = LatentCompressor(3, HIDDEN, exclusion=50.0), LatentCompressor(3, HIDDEN, exclusion=50.0,
                                                                                    saliency=True)
    with torch.no_grad():
        salient.queries.copy_(plain.queries)
        salient.saliency_scale.fill_(20.0)
    picks = [set(p.tolist()) for p in salient.weights(frames, valid).argmax(-1)]
    assert picks == [set(cells.tolist()) for cells in objects]
    assert any(set(p.tolist()) != set(c.tolist()) for p, c in zip(plain.weights(frames, valid).argmax(-1), objects))
    assert "compressor.saliency_scale" not in make_draft(latents=3).state_dict()
    assert "compressor.saliency_scale" in make_draft(latents=3, compressor_saliency=True).state_dict()


def test_latent_layout_runs_cover_all_latents_in_order():
    lengths = torch.tensor([16, 10, 3])
    layout = latent_layout(lengths, 4, 16)
    assert layout[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert layout[1, :10].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert layout[2, :3].tolist() == [0, 1, 2]


def sample_batch(kind: str, b=2, t=24, seed=0):
    """(next_ids, features, frames) for text-only, 1-image, 2-image and video batches."""
    g = torch.Generator().manual_seed(seed)
    next_ids = torch.randint(VOCAB, (b, t), generator=g)
    features = torch.randn(b, t, HIDDEN, generator=g)
    runs = {"text": [], "image": [(3, 8)], "two_images": [(2, 5), (10, 7)], "video": [(4, 4), (8, 4), (12, 4)]}[kind]
    starts = [s + row * t for row in range(b) for s, _ in runs]
    lengths = [n for _ in range(b) for _, n in runs]
    frames = VisualFrames(torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long))
    return next_ids, features, frames


@pytest.mark.parametrize("kind", ["text", "image", "two_images", "video"])
def test_forward_shapes(kind):
    draft = make_draft()
    next_ids, features, frames = sample_batch(kind)
    out = draft(next_ids, features, frames)
    assert out.shape == (2, 24, 4, HIDDEN)
    assert torch.isfinite(out).all()
    assert draft.propose(next_ids[0], features[0], VisualFrames(frames.starts[: len(frames) // 2],
                                                                frames.lengths[: len(frames) // 2])).shape == (4,)


def test_visual_tokens_use_compressed_features_and_frame_position():
    draft = make_draft()
    next_ids, features, frames = sample_batch("image", b=1)
    h = draft.fusion(draft.embed(next_ids[0]), features[0])
    hidden, positions = draft.input_states(draft.embed(next_ids[0]), features[0], torch.arange(24), frames)
    assert torch.equal(hidden[:3], h[:3]) and torch.equal(hidden[11:], h[11:])  # text untouched
    assert positions[3:11].tolist() == [3] * 8 and positions[11:].tolist() == list(range(11, 24))
    # 8 tokens, 4 latents: runs of two identical inputs
    assert torch.equal(hidden[3], hidden[4]) and not torch.equal(hidden[4], hidden[5])
    # the compressed values do not depend on the text around the image
    features2 = features.clone()
    features2[0, :3] += 1.0
    hidden2, _ = draft.input_states(draft.embed(next_ids[0]), features2[0], torch.arange(24), frames)
    torch.testing.assert_close(hidden2[3:11], hidden[3:11])


def test_last_position_block_depends_only_on_prefix():
    # Future positions must not leak into a position's drafts (the mask is causal over positions).
    draft = make_draft()
    next_ids, features, _ = sample_batch("text", b=1)
    full = draft(next_ids, features)
    prefix = draft(next_ids[:, :10], features[:, :10])
    torch.testing.assert_close(full[:, :10], prefix, rtol=1e-4, atol=1e-5)


def mixer_draft(k=4) -> FlashDraft:
    """A draft whose token mixer does something (a fresh one starts at zero, changing nothing)."""
    draft = make_draft(k=k, slot_token_mixer=True)
    with torch.no_grad():
        draft.token_mixer.out.weight.normal_(0, 0.3)
    return draft


def test_token_mixer_at_inference_reads_the_drafted_tokens_as_training_reads_the_true_ones():
    """Drafting slot by slot (each slot corrected by the token drafted before it) gives the logits that the
    teacher-forced training pass gives when the sequence goes on with exactly those tokens; the mixer changes
    the drafts, and a fresh one changes nothing."""
    draft = mixer_draft()
    next_ids, features, frames = sample_batch("image", b=1)
    t, k = next_ids.shape[1], 4
    logits = draft.draft_logits(next_ids[0], features[0], frames)
    drafted = logits.argmax(-1)
    # the sequence continued with the drafted tokens; the features after it cannot reach position t-1's block
    ids = torch.cat([next_ids, drafted[None, :k - 1]], dim=1)
    more = torch.cat([features, torch.randn(1, k - 1, HIDDEN)], dim=1)
    teacher_forced = draft.logits(draft(ids, more, frames)[0, t - 1])
    torch.testing.assert_close(logits, teacher_forced, rtol=1e-4, atol=1e-4)
    plain = draft.logits(draft.slot_features(next_ids, features, frames)[0, -1])
    torch.testing.assert_close(logits[0], plain[0])  # slot 0 has no token before it
    assert not torch.allclose(logits[1:], plain[1:], atol=1e-3)
    without, fresh = make_draft(), make_draft(slot_token_mixer=True)
    assert fresh.load_state_dict(without.state_dict(), strict=False).missing_keys  # all but the mixer's
    fresh.attach_target_head(without.embed_weight, without.lm_head_weight)
    torch.testing.assert_close(fresh.draft_logits(next_ids[0], features[0], frames),
                               without.draft_logits(next_ids[0], features[0], frames))


def test_a_k1_draft_gets_no_token_mixer():
    assert make_draft(k=1, slot_token_mixer=True).token_mixer is None  # no slot after the first to correct
    assert not make_draft(k=1, slot_token_mixer=True).config.slot_token_mixer
    assert make_draft(k=2, slot_token_mixer=True).token_mixer is not None


def test_loss_falls_when_overfitting_a_tiny_batch():
    draft = make_draft()
    # A peaked LM head: soft cross-entropy is bounded below by the target distribution's entropy.
    draft.attach_target_head(draft.embed_weight, draft.lm_head_weight * 30)
    next_ids, features, frames = sample_batch("image", b=2, t=16)
    # Targets are a function of the inputs so that they can be learned.
    torch.manual_seed(1)
    proj = torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5
    target = torch.tanh(features @ proj)
    text = torch.ones(2, 16, dtype=torch.bool)
    text.view(-1)[frames.starts[0]:frames.starts[0] + frames.lengths[0]] = False
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        result = flash_loss(draft, draft(next_ids, target, frames), target, torch.ones_like(text), text, 0.1)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        losses.append(result.loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert all(c > 0 for c in result.slot_count)


def test_target_layers_are_normalised_each_and_training_noise_is_added_after_combining_them():
    """A layer whose states are 100 times another's (residual streams grow with depth) changes nothing: each layer
    is normalised before the projection, and training's input noise, in units of the std, is added to the
    combined feature. Noise scaled by the raw states' std would swamp the smaller layer."""
    draft = make_draft(target_layer_ids=[1, 3], target_num_hidden_layers=4)
    next_ids, features, frames = sample_batch("image", b=1)
    other = torch.randn_like(features)
    noise = (torch.rand(*features.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.2
    balanced = draft(next_ids, torch.cat([features, other], dim=-1), frames, noise=noise)
    lopsided = draft(next_ids, torch.cat([features, 100 * other], dim=-1), frames, noise=noise)
    torch.testing.assert_close(lopsided, balanced, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(balanced, draft(next_ids, torch.cat([features, other], dim=-1), frames), atol=1e-3)


@pytest.mark.parametrize("layers", [None, [1, 3]])
def test_save_load_round_trip_is_bit_identical(tmp_path, layers):
    """With `layers` the draft reads two target layers' states, concatenated, and combines them first."""
    draft = make_draft(slot_residual_gate=True, target_layer_ids=layers, target_num_hidden_layers=4)
    next_ids, features, frames = sample_batch("video", b=1)
    if layers:
        features = torch.cat([features, -features], dim=-1)
        assert draft.feature_combiner.proj.weight.shape == (HIDDEN, 2 * HIDDEN)
    save_draft(draft, tmp_path / "d")
    loaded = load_draft(tmp_path / "d")
    loaded.attach_target_head(draft.embed_weight, draft.lm_head_weight)
    assert torch.equal(draft(next_ids, features, frames), loaded(next_ids, features, frames))


def test_load_rejects_missing_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_draft(make_draft(), tmp_path / "d")
    state = load_file(tmp_path / "d" / "model.safetensors")
    del state["norm.weight"]
    state["fusion.gate.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "d" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_draft(tmp_path / "d")
    assert "missing tensor norm.weight" in str(err.value)
    assert "fusion.gate.weight has shape (3, 3), expected (64, 128)" in str(err.value)


def test_load_refuses_pickle_only_and_nan_weights(tmp_path):
    save_draft(make_draft(), tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").rename(tmp_path / "d" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle-based weights.*safetensors only"):
        load_draft(tmp_path / "d")
    draft = make_draft()
    with torch.no_grad():
        draft.norm.weight[0] = float("nan")
    save_draft(draft, tmp_path / "n")
    with pytest.raises(CheckpointError, match="norm.weight contains NaN"):
        load_draft(tmp_path / "n")


def test_config_validation_errors_name_field_and_values(qwen_target):
    from transformers import AutoConfig

    target = AutoConfig.from_pretrained(qwen_target)
    good = FlashConfig.for_target(target, num_latents=4)
    validate_against_target(good, target, num_speculative_tokens=4)
    assert good.compressor_key_norm  # a new draft's compressor normalises its keys
    cases = {
        "hidden_size": ("hidden_size=64", "hidden_size: draft has 64, target has 128"),
        "vocab_size": ("vocab_size=10", "vocab_size: draft has 10, target has"),
        "image_token_id": ("image_token_id=1", "image_token_id: draft has 1, target has"),
        "video_token_id": ("video_token_id=2", "video_token_id: draft has 2, target has"),
        "target_uses_mrope": ("target_uses_mrope=False", "uses_mrope: draft has False, target has True"),
        "target_architecture": ("target_architecture='Llava'", "architecture: draft has 'Llava', target has"),
    }
    for field, (assignment, message) in cases.items():
        name, value = assignment.split("=", 1)
        bad = FlashConfig.for_target(target, num_latents=4, **{name: eval(value)})
        with pytest.raises(FlashConfigError) as err:
            validate_against_target(bad, target)
        assert message in str(err.value), (field, str(err.value))
    with pytest.raises(FlashConfigError, match="num_speculative_tokens: requested 6, but the draft has 4"):
        validate_against_target(good, target, num_speculative_tokens=6)
    layered = FlashConfig.for_target(target, num_latents=4, target_layer_ids=[1, 2])
    validate_against_target(layered, target)
    assert layered.eagle_aux_hidden_state_layer_ids == [1, 2]  # the key vLLM's runner reads the layers from
    deeper = FlashConfig.for_target(target, num_latents=4, target_layer_ids=[1, 2], target_num_hidden_layers=3)
    with pytest.raises(FlashConfigError, match="reads target layers \\[1, 2\\] of a 3-layer target, the target has 2"):
        validate_against_target(deeper, target)


def test_config_internal_errors():
    with pytest.raises(FlashConfigError, match="fusion='mlp'"):
        FlashConfig(fusion="mlp")
    with pytest.raises(FlashConfigError, match="num_attention_heads=3 is not a multiple of num_key_value_heads=2"):
        FlashConfig(num_attention_heads=3, num_key_value_heads=2, head_dim=32)
    with pytest.raises(FlashConfigError, match="num_latents=-1"):
        FlashConfig(num_latents=-1)
    for layers in ([0, 2], [2, 5], [2, 2]):
        with pytest.raises(FlashConfigError, match=rf"target_layer_ids=\{layers}: each must be a distinct target "
                                                   r"layer, 1..4 \(the residual stream after that many"):
            FlashConfig(target_num_hidden_layers=4, target_layer_ids=layers)
