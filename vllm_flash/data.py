"""Training data: LLaVA-format JSONL -> the target's features, streamed to sharded safetensors.

A row: {"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "frames_dir/" | "clip.mp4",
        "conversations": [{"from": "human", "value": "<image>\\nWhat ..."}, {"from": "gpt", "value": "..."}]}
Paths are relative to the image root (default: the JSONL's folder). `<image>` / `<video>` mark where the media
go in a human turn (a row without markers gets its media before the first human text).

Rows that cannot be used are counted by reason and reported; nothing is dropped silently.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import atomic_write
from .modeling import frames_from_token_ids

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # raised in an encoding worker, it comes back whole
        return BadRow, (self.reason, self.detail)


@dataclass
class Conversation:
    row_id: str
    messages: list[dict]  # chat-template messages with typed content parts
    images: list[Any] = field(default_factory=list)  # PIL images
    videos: list[Any] = field(default_factory=list)  # (T, H, W, 3) uint8 arrays
    answers: list[str] = field(default_factory=list)
    answer_token_ids: list[int] | None = None  # a regenerated answer, exactly as the target produced it


@dataclass
class BadDataReport:
    counts: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(detail)

    def summary(self) -> str:
        if not self.counts:
            return "no bad rows"
        return "; ".join(f"{reason}: {n} (e.g. {self.examples[reason][0]})" for reason, n in
                         sorted(self.counts.items()))


def _load_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise BadRow("missing image", str(path))
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadRow("corrupt image", f"{path}: {err}") from None


def _load_video(path: Path):
    import numpy as np

    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not frames:
            raise BadRow("missing video", f"{path} has no frame images")
        images = [_load_image(p) for p in frames]
        size = images[0].size
        return np.stack([np.asarray(img.resize(size)) for img in images])
    if not path.is_file():
        raise BadRow("missing video", str(path))
    try:
        import cv2
    except ImportError:
        raise BadRow("no video decoder", f"{path}: install opencv, or pass a folder of frames") from None
    capture = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(frame[:, :, ::-1])
        ok, frame = capture.read()
    if not frames:
        raise BadRow("corrupt video", str(path))
    return np.stack(frames)


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def parse_row(line: str, root: Path, line_number: int) -> Conversation:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRow("malformed row", f"line {line_number}: {err.msg}") from None
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list) or not row["conversations"]:
        raise BadRow("malformed row", f"line {line_number}: no 'conversations' list")
    row_id = str(row.get("id", line_number))
    images = [_load_image(root / p) for p in _as_list(row.get("image"))]
    videos = [_load_video(root / p) for p in _as_list(row.get("video"))]
    turns = row["conversations"]
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt", "user", "assistant") \
                or not isinstance(turn.get("value"), str):
            raise BadRow("malformed row", f"row {row_id}: a turn without from/value")
    human_text = "".join(t["value"] for t in turns if t["from"] in ("human", "user"))
    markers = (human_text.count("<image>"), human_text.count("<video>"))
    if markers == (0, 0):
        leading = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)  # media go first
    elif markers != (len(images), len(videos)):
        raise BadRow("malformed row", f"row {row_id}: {len(images)} images / {len(videos)} videos but "
                                      f"{markers[0]} <image> / {markers[1]} <video> markers")
    else:
        leading = []
    messages, answers = [], []
    for turn in turns:
        if turn["from"] in ("gpt", "assistant"):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
            answers.append(turn["value"])
            continue
        parts = [{"type": p} if p in ("image", "video") else {"type": "text", "text": p}
                 for p in _split_markers(turn["value"])]
        messages.append({"role": "user", "content": leading + parts})
        leading = []
    if not answers:
        raise BadRow("malformed row", f"row {row_id}: no assistant turn")
    return Conversation(row_id, messages, images, videos, answers)


def _split_markers(text: str) -> list[str]:
    out = []
    for chunk in text.replace("<video>", "\x00video\x00").replace("<image>", "\x00image\x00").split("\x00"):
        chunk = chunk.strip("\n") if chunk in ("image", "video") else chunk
        if chunk.strip():
            out.append(chunk if chunk in ("image", "video") else chunk.strip("\n"))
    return out


@dataclass(frozen=True)
class RowLine:
    """A JSONL row not read yet. Its media are decoded where it is read (`read`), so a list of these costs the
    text alone: decoded, the world's 80000 training clips alone held about 14 GB."""
    line: str
    root: Path
    number: int

    def read(self) -> Conversation:
        return parse_row(self.line, self.root, self.number)

    def media_counts(self) -> tuple[int, int]:
        """(images, videos) the row names, without decoding them; (0, 0) for a malformed row."""
        try:
            row = json.loads(self.line)
        except json.JSONDecodeError:
            return 0, 0
        return (len(_as_list(row.get("image"))), len(_as_list(row.get("video")))) if isinstance(row, dict) else (0, 0)


def row_lines(path: str | Path, image_root: str | Path | None = None) -> list[RowLine]:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    return [RowLine(line, root, number) for number, line in enumerate(path.read_text().splitlines(), 1)
            if line.strip()]


def read_conversations(path: str | Path, report: BadDataReport, image_root: str | Path | None = None
                       ) -> Iterator[Conversation]:
    """The usable rows, read one at a time as they are asked for; the others counted in `report`."""
    for row in row_lines(path, image_root):
        try:
            yield row.read()
        except BadRow as bad:
            report.add(bad.reason, bad.detail)


def media_limits(rows) -> dict:
    """The most images and videos any one of `rows` (conversations or `RowLine`s) holds: vLLM's
    `limit_mm_per_prompt` for them."""
    limits = {"image": 1, "video": 1}
    for row in rows:
        images, videos = row.media_counts() if isinstance(row, RowLine) else (len(row.images), len(row.videos))
        limits = {"image": max(limits["image"], images), "video": max(limits["video"], videos)}
    return limits


def first_question(conv: Conversation, processor) -> str:
    """The chat prompt up to the first answer, ready for generation."""
    first_answer = next(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    return processor.apply_chat_template(conv.messages[:first_answer], tokenize=False, add_generation_prompt=True)


def video_input(frames) -> tuple:
    """A clip as (frames, metadata), one frame per second. vLLM 0.32 wants Qwen2.5-VL video arrays with their
    metadata, and training must hand the HF processor the same: the frame rate sets the temporal M-RoPE
    positions, and without it HF assumes 24 fps, which puts every frame of a short clip at time 0."""
    n = len(frames)
    return (frames, {"total_num_frames": n, "fps": 1.0, "duration": n, "video_backend": "opencv",
                     "frames_indices": list(range(n)), "do_sample_frames": False})


def vllm_request(conv: Conversation, processor):
    """The vLLM request (prompt + multimodal data) that asks the target the conversation's first question."""
    prompt = first_question(conv, processor)
    media = {}
    if conv.images:
        media["image"] = conv.images
    if conv.videos:
        media["video"] = [video_input(v) for v in conv.videos]
    return {"prompt": prompt, "multi_modal_data": media} if media else prompt


# ---------------------------------------------------------------------------------------------------------
# Tokenising with the target's processor
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    row_id: str
    inputs: dict  # processor outputs (input_ids, pixel values, grids)
    token_ids: torch.Tensor
    target_from: int
    frames: list[tuple[int, int]]


def encode(conv: Conversation, processor, facts: dict, max_len: int) -> Encoded:
    full_text = processor.apply_chat_template(conv.messages, tokenize=False)
    prefix_text = first_question(conv, processor)
    media = {}
    if conv.images:
        media["images"] = conv.images
    if conv.videos:
        # the metadata vLLM gets with the same clip (`vllm_request`), so the positions match what is served
        clips = [video_input(v) for v in conv.videos]
        metadata = [{k: v for k, v in meta.items() if k != "do_sample_frames"} for _, meta in clips]  # vLLM's key
        media.update(videos=[frames for frames, _ in clips], video_metadata=metadata, do_sample_frames=False)
    prefix = processor(text=[prefix_text], return_tensors="pt", **media)
    prefix_ids = prefix["input_ids"][0]
    if conv.answer_token_ids is not None:
        # Keep the target's own tokens: decoding and re-tokenising its answer need not round-trip.
        answer = torch.tensor(conv.answer_token_ids, dtype=prefix_ids.dtype)
        inputs = {}
        for key, value in prefix.items():
            if isinstance(value, torch.Tensor) and value.shape == prefix["input_ids"].shape:
                # per-token tensors (ids, masks, token types): the answer's tokens are plain text
                tail = answer if key == "input_ids" else torch.full_like(answer, 1 if "mask" in key else 0)
                value = torch.cat([value[0], tail.to(value.dtype)])[None]
            inputs[key] = value
    else:
        inputs = processor(text=[full_text], return_tensors="pt", **media)
    ids = inputs["input_ids"][0]
    if len(ids) > max_len:
        raise BadRow("too long", f"row {conv.row_id}: {len(ids)} tokens > {max_len}")
    if facts["uses_mrope"]:
        inputs["position_ids"] = served_mrope_positions(inputs, facts)[:, None, :]
    grids = inputs.get("video_grid_thw")
    frames_per_video = [int(g[0]) for g in grids] if grids is not None else []
    starts, lengths = frames_from_token_ids(ids, facts["image_token_id"], facts["video_token_id"], frames_per_video)
    return Encoded(conv.row_id, dict(inputs), ids, len(prefix_ids), list(zip(starts, lengths)))


def served_mrope_positions(inputs: dict, facts: dict) -> torch.Tensor:
    """(3, T) M-RoPE positions of one encoded row, laid out as vLLM serves Qwen2.5-VL
    (`get_mrope_input_positions`): a visual block spans (time, row, column) from where the text before it ends,
    a video's time axis steps `tokens_per_second * second_per_grid_t` per frame pair, and the text after a block
    resumes one past the block's largest position. transformers 5 resumes after a video at its spatial extent
    instead, ignoring time; training on that would teach the target positions it is never served."""
    types = inputs["mm_token_type_ids"][0].tolist()
    grids = {1: iter(inputs.get("image_grid_thw", [])), 2: iter(inputs.get("video_grid_thw", []))}
    seconds = iter(inputs.get("second_per_grid_ts", []))
    merge = facts["spatial_merge_size"]
    pieces, start, i = [], 0, 0
    while i < len(types):
        kind = types[i]
        if kind == 0:
            n = next((j for j in range(i, len(types)) if types[j] != 0), len(types)) - i
            pieces.append(torch.arange(n).expand(3, n) + start)
        else:
            t, h, w = (int(x) for x in next(grids[kind]))
            # vLLM's defaults where a model or processor gives neither (Qwen2-VL): one position per frame pair
            step = (facts["tokens_per_second"] or 1.0) * float(next(seconds, 1.0)) if kind == 2 else 1.0
            grid = torch.meshgrid((torch.arange(t) * step).long(), torch.arange(h // merge), torch.arange(w // merge),
                                  indexing="ij")
            pieces.append(torch.stack(grid).reshape(3, -1) + start)
            n = pieces[-1].shape[1]
        i += n
        start = int(pieces[-1].max()) + 1
    return torch.cat(pieces, dim=1)


MAX_CHUNK_ROWS = 500  # rows a worker of `encode_all` encodes and sends back at a time
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def encode_all(target: str | Path, conversations: list[Conversation | RowLine], max_len: int, workers: int = 1,
               pixel_dtype: torch.dtype | None = None, spill: Path | None = None) -> list[Encoded]:
    """`encode` every conversation with `target`'s processor, in order, by `workers` processes, with the pixels
    cast to `pixel_dtype` where given (a row that cannot be encoded raises). `RowLine`s are read by the process
    that encodes them, so that this one never holds their decoded media.

    With `spill`, a folder, the pixels are written to files there as they are encoded, and the rows hold
    copy-on-write memory maps of them: the kernel reads the pages as training needs them and may drop them
    again, so more rows can be held than fit in memory (96000 world rows, a third of them clips, hold 17 GB of
    bf16 pixels; held in memory they ran a 24 GiB machine out). What an earlier call spilled there is deleted
    (rows still mapped from it keep their pages until they are let go)."""
    spill_to = None
    if spill is not None:
        spill = Path(spill)
        spill.mkdir(parents=True, exist_ok=True)
        for old in spill.glob("encoded-*"):
            shutil.rmtree(old)
        spill_to = Path(tempfile.mkdtemp(prefix="encoded-", dir=spill))
    # a few chunks per process, so that none waits on the last, and none so large that its blob (held by the
    # worker while sent, and by this process while read) weighs more than a few hundred MB. One process encodes
    # in chunks too, each spilled to a file of its own: its copy-on-write map is committed memory, and the kernel
    # (heuristic overcommit) refuses a single map larger than the machine's memory (the 176000 rows of a fifth
    # recount round spilled 28 GB into one file, and mapping it on a 24 GiB machine failed with ENOMEM).
    size = min(-(-len(conversations) // (workers * 8)), MAX_CHUNK_ROWS) if workers > 1 else MAX_CHUNK_ROWS
    chunks = [(str(target), conversations[i:i + size], max_len, pixel_dtype,
               spill_to and spill_to / f"pixels-{i // size:05d}.bin") for i in range(0, len(conversations), size)]
    if workers <= 1 or len(chunks) < 2:
        return _map_spilled([row for chunk in chunks for row in _encode_chunk(chunk)])
    import multiprocessing
    import pickle

    # a chunk comes back as one pickled blob of our own rows: sent as tensors, tens of thousands of rows would
    # each hold a shared-memory file open at once
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        # imap: each blob is let go once read, so the rows are never held twice
        return _map_spilled([row for blob in pool.imap(_encode_chunk_pickled, chunks) for row in pickle.loads(blob)])


@dataclass(frozen=True)
class _Spilled:
    """Where `_encode_chunk` wrote a pixel tensor: `_map_spilled` maps it back."""
    path: str
    offset: int  # bytes
    shape: tuple
    dtype: torch.dtype


def _spill(tensor: torch.Tensor, file, path: Path) -> _Spilled:
    tensor = tensor.contiguous()
    file.write(b"\0" * (-file.tell() % 8))  # every tensor starts aligned for its dtype
    offset = file.tell()
    file.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return _Spilled(str(path), offset, tuple(tensor.shape), tensor.dtype)


def _map_spilled(rows: list[Encoded]) -> list[Encoded]:
    import numpy as np

    maps: dict[str, torch.Tensor] = {}
    for row in rows:
        for key, value in row.inputs.items():
            if isinstance(value, _Spilled):
                if value.path not in maps:  # copy-on-write: the tensors are writable, the file never written
                    maps[value.path] = torch.from_numpy(np.memmap(value.path, dtype=np.uint8, mode="c"))
                size = math.prod(value.shape) * value.dtype.itemsize
                row.inputs[key] = maps[value.path][value.offset:value.offset + size].view(value.dtype).reshape(
                    value.shape)
    return rows


@functools.lru_cache(maxsize=2)
def _processor_and_facts(target: str) -> tuple:
    """Loaded once per process, not once per chunk it encodes."""
    from transformers import AutoProcessor

    from .checkpoint import load_target_config
    from .config import target_facts

    return AutoProcessor.from_pretrained(target), target_facts(load_target_config(target))


def _encode_chunk(job: tuple) -> list[Encoded]:
    """The rows of one chunk; each row's pixels cast, and spilled to `spill_path` where given, as it comes (cast
    after the whole chunk, the processor's fp32 pixels of every row would be held at once)."""
    target, conversations, max_len, pixel_dtype, spill_path = job
    processor, facts = _processor_and_facts(target)
    rows = []
    with contextlib.ExitStack() as stack:
        spill_file = stack.enter_context(open(spill_path, "wb")) if spill_path else None
        for conversation in conversations:
            if isinstance(conversation, RowLine):
                conversation = conversation.read()
            row = encode(conversation, processor, facts, max_len)
            for key in PIXEL_KEYS:
                if key in row.inputs:
                    pixels = row.inputs[key].to(pixel_dtype) if pixel_dtype else row.inputs[key]
                    row.inputs[key] = _spill(pixels, spill_file, spill_path) if spill_file else pixels
            rows.append(row)
    return rows


def _encode_chunk_pickled(job: tuple) -> bytes:
    import pickle

    torch.set_num_threads(1)  # one process per core
    return pickle.dumps(_encode_chunk(job))


def encode_or_report(conv: Conversation, processor, facts: dict, max_len: int, report: BadDataReport
                     ) -> Encoded | None:
    """`encode`, with a row that cannot be used counted in `report` (by reason) instead of raised."""
    try:
        return encode(conv, processor, facts, max_len)
    except BadRow as bad:
        report.add(bad.reason, bad.detail)
    except (ValueError, RuntimeError) as err:  # e.g. the processor rejects an image's size
        report.add("unprocessable", f"row {conv.row_id}: {err}")
    return None


@torch.no_grad()
def hf_features(model, encoded: Encoded, layer_ids: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's final-norm hidden states at every position (the features that feed the LM head), and with
    `layer_ids` the residual stream after each of those layers, concatenated (T, len(layer_ids) * d): what vLLM's
    runner hands a drafter as aux hidden states. Read by hooks on the decoder layers, so the states do not
    depend on what a transformers version returns as `hidden_states`."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encoded.inputs.items() if isinstance(v, torch.Tensor)}
    inputs.pop("attention_mask", None)
    layers = model.model.language_model.layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [layers[i - 1].register_forward_hook(
        lambda _module, _args, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in layer_ids or []]
    try:
        final = model.model(**inputs).last_hidden_state[0].float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
    if not layer_ids:
        return final, None
    return final, torch.cat([captured[i][0] for i in layer_ids], dim=-1).float().cpu()


# ---------------------------------------------------------------------------------------------------------
# Feature shards
# ---------------------------------------------------------------------------------------------------------
class ShardWriter:
    """Streams samples into features-XXXXX.safetensors files of `per_shard` samples each."""

    def __init__(self, out_dir: str | Path, per_shard: int = 256, dtype: torch.dtype = torch.float32) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.per_shard, self.dtype = per_shard, dtype
        self.buffer: dict[str, torch.Tensor] = {}
        self.count = 0
        self.shards: list[str] = []

    def add(self, token_ids: torch.Tensor, features: torch.Tensor, frames: list[tuple[int, int]],
            target_from: int, layer_states: torch.Tensor | None = None) -> None:
        key = f"{self.count:08d}"
        self.buffer[f"{key}.token_ids"] = token_ids.to(torch.int64).contiguous()
        self.buffer[f"{key}.features"] = features.to(self.dtype).contiguous()
        if layer_states is not None:
            self.buffer[f"{key}.layer_states"] = layer_states.to(self.dtype).contiguous()
        self.buffer[f"{key}.frames"] = torch.tensor(frames, dtype=torch.int64).reshape(-1, 2)
        self.buffer[f"{key}.target_from"] = torch.tensor([target_from], dtype=torch.int64)
        self.count += 1
        if self.count % self.per_shard == 0:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"features-{len(self.shards):05d}.safetensors"
        tensors, self.buffer = self.buffer, {}
        atomic_write(self.out / name, lambda tmp: save_file(tensors, tmp))
        self.shards.append(name)

    def close(self, meta: dict) -> None:
        self.flush()
        index = {"shards": self.shards, "num_samples": self.count, **meta}
        atomic_write(self.out / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))


class FeatureShards:
    """Random access to the samples of a feature directory; tensors are read from disk on demand."""

    def __init__(self, feature_dir: str | Path) -> None:
        self.dir = Path(feature_dir)
        self.index = json.loads((self.dir / "index.json").read_text())
        self.target_layer_ids = self.index.get("target_layer_ids")
        self.keys: list[tuple[str, str]] = []
        for shard in self.index["shards"]:
            with safe_open(str(self.dir / shard), framework="pt") as f:
                self.keys += sorted({(shard, k.split(".")[0]) for k in f.keys()})

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        from .train import Sample

        shard, key = self.keys[i]
        with safe_open(str(self.dir / shard), framework="pt") as f:
            frames = f.get_tensor(f"{key}.frames")
            layer_states = f.get_tensor(f"{key}.layer_states").float() if self.target_layer_ids else None
            return Sample(f.get_tensor(f"{key}.token_ids"), f.get_tensor(f"{key}.features").float(),
                          [tuple(r) for r in frames.tolist()], int(f.get_tensor(f"{key}.target_from")[0]),
                          layer_states)
