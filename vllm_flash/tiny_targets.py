"""Tiny random target LMMs, built offline (no hub): a Qwen2.5-VL and a LLaVA-1.5-style model, each with its
own small BPE tokenizer, processor and chat template, saved in the layout vLLM loads.

Tests, the demo and the benchmarks all build their targets here. Sizes respect vLLM's CPU attention
(head_dim >= 32).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .data import video_input

CORPUS_WORDS = (
    "a the of and in on with is are there red green blue yellow purple orange black white small large big "
    "tiny circle square triangle star cube ball box left right top bottom middle next to above below near "
    "image video frame shows moves appears disappears scene object objects describe what happens picture "
    "one two three four five six seven eight nine ten color shape size position it they this that"
).split()

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _train_tokenizer(special: list[str], vocab_size: int, eos: str, bos: str | None, pad: str, unk: str | None,
                     corpus: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    gen = torch.Generator().manual_seed(0)
    sentences = corpus or [
        " ".join(CORPUS_WORDS[i] for i in torch.randint(len(CORPUS_WORDS), (12,), generator=gen).tolist())
        for _ in range(400)
    ]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences + ["USER: ASSISTANT: user assistant system\n"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=pad,
                                   unk_token=unk, additional_special_tokens=[s for s in special
                                                                             if s not in (eos, bos, pad, unk)])


def build_tiny_qwen2_5_vl(out_dir: str | Path, *, num_layers: int = 2, hidden: int = 128, seed: int = 0,
                          vocab_size: int = 1024, image_size: int = 112, lm_head_scale: float = 12.0,
                          corpus: list[str] | None = None, vision: dict | None = None) -> Path:
    """A random Qwen2.5-VL: M-RoPE text model, 2x2-merged vision tokens. A `image_size`-pixel square image
    becomes (image_size/28)^2 visual tokens; each 2-frame temporal group of a video one frame of as many.
    `corpus` trains the tokenizer on your own texts; `vision` overrides the vision tower's config."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(QWEN_SPECIAL, vocab_size, eos="<|im_end|>", bos=None, pad="<|endoftext|>",
                                 unk=None, corpus=corpus)
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in QWEN_SPECIAL}
    heads = hidden // 32
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config={**dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                              fullatt_block_indexes=[1]), **(vision or {})},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, architectures=["Qwen2_5_VLForConditionalGeneration"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    _sharpen_lm_head(model, lm_head_scale)
    model.save_pretrained(out, safe_serialization=True)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=pixels, do_sample_frames=False)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
    return out


def build_tiny_llava(out_dir: str | Path, *, num_layers: int = 2, hidden: int = 128, seed: int = 0,
                     vocab_size: int = 1024, image_size: int = 56, lm_head_scale: float = 12.0) -> Path:
    """A random LLaVA-1.5-style model: CLIP tower, MLP projector, Llama text model (1-D RoPE).
    An image becomes (image_size/14)^2 visual tokens."""
    from safetensors.torch import load_file, save_file
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(LLAVA_SPECIAL, vocab_size, eos="</s>", bos="<s>", pad="<pad>", unk="<unk>")
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in LLAVA_SPECIAL}
    heads = hidden // 32
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=image_size, patch_size=14,
                                       projection_dim=64),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=num_layers, num_attention_heads=heads,
                                num_key_value_heads=heads, max_position_embeddings=4096,
                                bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                                tie_word_embeddings=False),
        image_token_index=ids["<image>"], image_seq_length=(image_size // 14) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False, architectures=["LlavaForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    _sharpen_lm_head(model, lm_head_scale)
    model.save_pretrained(out, safe_serialization=True)
    # vLLM expects the CLIP tower in the layout of real LLaVA-1.5 checkpoints (vision_model. prefix).
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        renamed = {
            (name.replace("vision_tower.", "vision_tower.vision_model.", 1)
             if "vision_tower." in name and "vision_tower.vision_model." not in name else name): t
            for name, t in tensors.items()
        }
        save_file(renamed, file, metadata={"format": "pt"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_generation_config(out, eos=ids["</s>"], pad=ids["<pad>"], bos=ids["<s>"])
    return out


def _sharpen_lm_head(model, scale: float) -> None:
    # A randomly initialised LM head gives almost uniform next-token distributions; a trained LM's are
    # peaked. Scaling the head keeps greedy decoding as it is and makes sampling at temperature 1 look real.
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)


def _write_generation_config(out: Path, eos: int, pad: int, bos: int | None = None) -> None:
    gen = {"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    if bos is not None:
        gen["bos_token_id"] = bos
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


BUILDERS = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "llava": build_tiny_llava}


def build_tiny_target(kind: str, out_dir: str | Path, **kwargs) -> Path:
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny target {kind!r}; choose from {sorted(BUILDERS)}")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    return BUILDERS[kind](out, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Requests for the tiny targets (tests, demo)
# ---------------------------------------------------------------------------------------------------------
def random_image(seed: int, size: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def random_video(seed: int, num_frames: int, size: int):
    import numpy as np

    return video_input((np.random.RandomState(seed).rand(num_frames, size, size, 3) * 255).astype("uint8"))


def chat_prompt(kind: str, text: str, images: int = 0, video: bool = False) -> str:
    if kind == "qwen2_5_vl":
        vision = "<|vision_start|><|image_pad|><|vision_end|>" * images
        vision += "<|vision_start|><|video_pad|><|vision_end|>" if video else ""
        return f"<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n"
    return "USER: " + "<image>\n" * images + f"{text} ASSISTANT:"


def text_prompts(kind: str, n: int, seed: int = 0) -> list[str]:
    """Short random-word chat prompts (the first is always "red circle")."""
    import random

    rng = random.Random(seed)
    return [chat_prompt(kind, "red circle")] + [
        chat_prompt(kind, " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 12))))
        for _ in range(n - 1)]


def mixed_requests(kind: str, seed: int = 0, image_size: int | None = None) -> list:
    """Text-only (short and long), 1-image, 2-image and (Qwen2.5-VL) video requests."""
    size = image_size or (112 if kind == "qwen2_5_vl" else 56)
    words = " ".join(CORPUS_WORDS[(seed + i) % len(CORPUS_WORDS)] for i in range(40))
    requests: list = [
        chat_prompt(kind, "red circle"),
        chat_prompt(kind, f"describe {words}"),
        {"prompt": chat_prompt(kind, "describe the picture", images=1),
         "multi_modal_data": {"image": random_image(seed + 1, size)}},
        {"prompt": chat_prompt(kind, "what is left and right", images=2),
         "multi_modal_data": {"image": [random_image(seed + 2, size), random_image(seed + 3, size)]}},
    ]
    if kind == "qwen2_5_vl":
        requests.append({"prompt": chat_prompt(kind, "describe what happens", video=True),
                         "multi_modal_data": {"video": random_video(seed + 4, 4, size)}})
    return requests
