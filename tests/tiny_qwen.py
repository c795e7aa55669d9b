"""Tiny random-weight Qwen-Image-Edit pipelines, built offline, for tests.

:func:`build_tiny_qwen_edit` builds a ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509, ``plus=True``) or a
``QwenImageEditPipeline`` (Qwen-Image-Edit, ``plus=False``) from the real diffusers / transformers classes,
with tiny configs and seeded random weights, and saves it so the folder has the layout of a user's local
diffusers folder: ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``processor/``, ``scheduler/``. Nothing is downloaded; a build takes a fraction of a second.

What is real and what is shrunk:

* the scheduler is the real Qwen-Image-Edit one (dynamic exponential shifting, ``shift_terminal`` 0.02);
* the VAE compresses 8x like the real one, has 4 latent channels (real: 16) and a ``latents_mean`` /
  ``latents_std`` that are not 0 / 1, so the pipelines' latent normalisation is exercised;
* the tokenizer is a byte-level BPE built in code, with Qwen's special tokens after its vocabulary (as in the
  real one) and the text encoder's config naming their ids. Its merges make each word of the pipelines'
  system prompt one token, as Qwen's vocabulary does, so the chat-template prefix that the pipelines drop
  (``prompt_template_encode_start_idx`` = 64 tokens) is exactly the system part here too, and the kept
  embeddings start at the user's part. Other text falls back to (mostly) one token per byte;
* ``processor/`` holds the tokenizer files and a Qwen2.5-VL-format ``preprocessor_config.json`` (14 px
  patches, 2x2 merge, 2 frames) with a small ``max_pixels``, so a condition image gives at most 16 vision
  tokens.

Loading needs care without torchvision (see :func:`load_qwen_edit_pipeline`): transformers 5.x cannot load or
build a ``Qwen2VLProcessor`` then, because its video processor needs torchvision, and
``QwenImageEditPlusPipeline.from_pretrained(folder)`` fails in the processor. :func:`load_qwen_edit_pipeline`
loads the processor's parts itself and hands it over; it works the same for a real Qwen-Image-Edit(-2509)
folder. :func:`small_edit_sizes` shrinks the areas the pipelines resize the input image to (1024x1024 by
default), which makes a run ~70x faster.

``python tests/tiny_qwen.py`` runs a self-check: it builds both pipelines, loads them back, checks the
template drop, the padding mask and determinism, runs them and prints timings.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeAlias
from unittest import mock

import torch
from clora_qwenimage.loading import load_pipeline, make_qwen2vl_processor
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import AddedToken, Regex, pre_tokenizers
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

#: Qwen2.5-VL's special tokens, in the order of their ids in the real vocabulary (151643, 151644, ...).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: The system prompt of both Qwen-Image-Edit pipelines' chat template.
EDIT_SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)

#: Text the tokenizer's merges are learned from: each of its words becomes one token.
_MERGE_CORPUS: tuple[str, ...] = ("system\n" + EDIT_SYSTEM_PROMPT, "user\n", "assistant\n", "Picture 1: ")

#: Tokens of the chat template the Qwen-Image-Edit pipelines drop (``prompt_template_encode_start_idx``).
TEMPLATE_DROP = 64

TEXT_HIDDEN = 32  # the text encoder's hidden size = the transformer's joint_attention_dim
VISION_HIDDEN = 16
Z_DIM = 4  # latent channels

#: The real Qwen-Image-Edit / Qwen-Image-Edit-2509 ``scheduler/scheduler_config.json``.
QWEN_EDIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

#: A ``QwenImageEditPlusPipeline`` or ``QwenImageEditPipeline``, and a diffusers model. ``Any``: pipelines set
#: their components at run time (``register_modules``), so a type checker sees none of their attributes.
QwenEditPipeline: TypeAlias = Any
DiffusersModel: TypeAlias = Any

_PLUS_MODULE = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus"
_EDIT_MODULE = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit"


# ---------------------------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 one-character symbols of a byte-level BPE, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return [table[b] for b in range(256)]


def _learn_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Deterministic BPE training: merge the most frequent pair (ties: the smallest pair) until each word is
    one symbol. Applying the merges in rank order, as BPE does, turns each training word into one token."""
    split = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, symbols in split.items():
            for pair in pairwise(symbols):
                pairs[pair] += words[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in split.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = out


def build_tiny_tokenizer() -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer``: byte-level BPE with Qwen's pre-tokenizer, merges learned from
    :data:`_MERGE_CORPUS`, Qwen's special tokens after the BPE vocabulary, ``<|im_end|>`` as eos and
    ``<|endoftext|>`` as pad (as in the real tokenizer)."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words: Counter[str] = Counter()
    for text in _MERGE_CORPUS:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    merges = _learn_merges(words)
    vocab: dict[str, int] = {}
    for symbol in _byte_alphabet() + [a + b for a, b in merges]:
        vocab.setdefault(symbol, len(vocab))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tokenizers' BPE wants (left, right) pairs
        unk_token=None,  # type: ignore[arg-type]  # as in the real tokenizer_config.json
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
    )
    specials = [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def _add_slow_tokenizer_files(tokenizer: Qwen2Tokenizer, folder: Path) -> None:
    """Complete a tokenizer folder written by ``save_pretrained`` (transformers 5 writes ``tokenizer.json``
    and ``tokenizer_config.json`` only) with what the real Qwen folders carry: ``vocab.json`` + ``merges.txt``
    (the BPE vocabulary, without the added tokens) and ``added_tokens_decoder`` in ``tokenizer_config.json``
    (without it, a load from vocab.json + merges.txt numbers the special tokens differently)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = {t: i for t, i in model["vocab"].items() if t not in QWEN_SPECIAL_TOKENS}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(tokenizer.convert_tokens_to_ids(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in QWEN_SPECIAL_TOKENS
    }
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- processor


def image_processor_config(max_pixels: int = 28 * 28 * 16) -> dict[str, Any]:
    """``processor/preprocessor_config.json`` in the real folders' (Qwen2.5-VL's) format, with a small
    ``max_pixels`` (real: 12845056) so that a condition image gives at most ``max_pixels / 28**2`` tokens."""
    return {
        "min_pixels": 28 * 28,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def load_qwen_edit_pipeline(
    folder: Path, dtype: torch.dtype = torch.float32, plus: bool | None = None
) -> QwenEditPipeline:
    """Load a tiny or real Qwen-Image-Edit(-2509) folder the way clora's backbone plugin does (offline,
    without torchvision); ``plus`` None: the class named by ``model_index.json``."""
    folder = Path(folder)
    if plus is None:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
        plus = name == QwenImageEditPlusPipeline.__name__
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return load_pipeline(pipeline_class, folder, dtype)  # type: ignore[no-any-return]


@contextmanager
def small_edit_sizes(vae_area: int = 64 * 64, condition_area: int = 56 * 56) -> Iterator[None]:
    """Make both pipelines resize the input image to ``vae_area`` pixels instead of 1024*1024.

    The Plus pipeline resizes the VAE image to ``VAE_IMAGE_SIZE`` and the vision-language condition image to
    ``CONDITION_IMAGE_SIZE`` (module constants; 384*384 for the condition); the other pipeline resizes both
    to ``calculate_dimensions(1024 * 1024, ...)``. Both modules' ``calculate_dimensions`` also give the
    default output size (1024*1024 area): it is clamped to ``vae_area`` too. Sides are rounded to multiples
    of 32, so small areas lose the aspect ratio (64*64 and a 4:3 image give 64x64).
    """
    plus_module = importlib.import_module(_PLUS_MODULE)
    edit_module = importlib.import_module(_EDIT_MODULE)
    plus_dims = plus_module.calculate_dimensions
    edit_dims = edit_module.calculate_dimensions

    def plus_clamped(target_area: float, ratio: float) -> Any:
        return plus_dims(min(target_area, vae_area), ratio)

    def edit_clamped(target_area: float, ratio: float) -> Any:
        return edit_dims(min(target_area, vae_area), ratio)

    with (
        mock.patch.object(plus_module, "VAE_IMAGE_SIZE", vae_area),
        mock.patch.object(plus_module, "CONDITION_IMAGE_SIZE", condition_area),
        mock.patch.object(plus_module, "calculate_dimensions", plus_clamped),
        mock.patch.object(edit_module, "calculate_dimensions", edit_clamped),
    ):
        yield


# ---------------------------------------------------------------------------------------------- models


def build_tiny_text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (text model and vision tower) whose token ids match
    ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    ids = {token: vocab[token] for token in QWEN_SPECIAL_TOKENS}
    heads = 2
    head_dim = TEXT_HIDDEN // heads
    mrope_section = [2, 3, 3]  # (time, height, width) split of head_dim / 2 frequencies, real: [16, 24, 24]
    assert sum(mrope_section) == head_dim // 2
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "out_hidden_size": TEXT_HIDDEN,
            "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_vae(seed: int) -> DiffusersModel:
    """A tiny ``AutoencoderKLQwenImage``: 8x spatial compression like the real one, :data:`Z_DIM` channels."""
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # its length sets the pipelines' vae_scale_factor (2**3)
        latents_mean=[round(0.1 * i, 4) for i in range(Z_DIM)],
        latents_std=[round(1.0 + 0.1 * i, 4) for i in range(Z_DIM)],
    )


def build_tiny_transformer(seed: int) -> DiffusersModel:
    """A tiny ``QwenImageTransformer2DModel`` reading the tiny text encoder's hidden states."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * Z_DIM,  # 2x2-packed latents
        out_channels=Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, real: (16, 56, 56) for 128
    )


# ---------------------------------------------------------------------------------------------- pipelines


def template_prefix_length(pipe: QwenEditPipeline) -> int:
    """Tokens of ``pipe``'s chat template before the user's part (``...<|im_start|>user\\n``)."""
    template = pipe.prompt_template_encode
    user = "<|im_start|>user\n"
    return len(pipe.tokenizer(template[: template.index(user) + len(user)])["input_ids"])


def build_tiny_qwen_edit_pipeline(
    plus: bool = True, seed: int = 0, with_processor: bool = True
) -> QwenEditPipeline:
    """The tiny pipeline in memory (float32, eval mode); :func:`build_tiny_qwen_edit` saves it."""
    tokenizer = build_tiny_tokenizer()
    processor = None
    if with_processor:
        processor = make_qwen2vl_processor(Qwen2VLImageProcessorPil(**image_processor_config()), tokenizer)
    pipeline_class: Any = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_EDIT_SCHEDULER_CONFIG),
        vae=build_tiny_vae(seed),
        text_encoder=build_tiny_text_encoder(tokenizer, seed + 1),
        tokenizer=tokenizer,
        processor=processor,
        transformer=build_tiny_transformer(seed + 2),
    )
    prefix = template_prefix_length(pipe)
    if prefix != pipe.prompt_template_encode_start_idx:
        raise AssertionError(f"template prefix has {prefix} tokens, the pipeline drops {TEMPLATE_DROP}")
    return pipe


def build_tiny_qwen_edit(folder: Path, plus: bool = True, seed: int = 0) -> Path:
    """Build and save a tiny random-weight Qwen-Image-Edit(-Plus) pipeline folder; returns folder.

    ``pipeline.save_pretrained`` writes every component but the processor, which transformers cannot build or
    save without torchvision; ``processor/`` is written as in the real folders (the tokenizer files and a
    Qwen2.5-VL ``preprocessor_config.json``) and ``model_index.json`` names ``transformers.Qwen2VLProcessor``
    for it, as the real one does. Load the folder with :func:`load_qwen_edit_pipeline`.
    """
    folder = Path(folder)
    pipe = build_tiny_qwen_edit_pipeline(plus=plus, seed=seed, with_processor=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    processor_dir = folder / "processor"
    pipe.tokenizer.save_pretrained(processor_dir)
    (processor_dir / "preprocessor_config.json").write_text(
        json.dumps(image_processor_config(), indent=2) + "\n"
    )
    for sub in ("tokenizer", "processor"):
        _add_slow_tokenizer_files(pipe.tokenizer, folder / sub)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- checks


def padded_batch_error(transformer: DiffusersModel, seed: int = 0) -> tuple[float, float]:
    """How far a right-padded batch is from unpadded single rows, in float32.

    Runs a batch of 2 rows whose prompt embeddings (9 and 5 tokens) are right-padded with zeros to 9 tokens,
    with ``encoder_hidden_states_mask``, and each row alone without padding and without a mask. Returns the
    largest absolute difference of the outputs, and the same without the mask (padding attended to)."""
    g = torch.Generator().manual_seed(seed)
    channels = transformer.config.in_channels
    joint = transformer.config.joint_attention_dim
    h, w = 4, 6  # packed latent grid of the target and of one reference image (Plus layout)
    img_shapes = [(1, h, w), (1, h, w)]
    latents = torch.randn(2, 2 * h * w, channels, generator=g)
    lengths = (9, 5)
    prompts = [torch.randn(1, n, joint, generator=g) for n in lengths]
    padded = torch.zeros(2, max(lengths), joint)
    mask = torch.zeros(2, max(lengths), dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        padded[i, :n] = p[0]
        mask[i, :n] = 1
    timestep = torch.tensor([0.7, 0.7])

    def forward(x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        out = transformer(
            hidden_states=x,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=text_mask,
            timestep=timestep[: x.shape[0]],
            img_shapes=[img_shapes] * x.shape[0],
            return_dict=False,
        )
        return out[0]

    with torch.no_grad():
        batched = forward(latents, padded, mask)
        unmasked = forward(latents, padded, None)
        single = torch.cat([forward(latents[i : i + 1], prompts[i], None) for i in range(2)])
    return float((batched - single).abs().max()), float((unmasked - single).abs().max())


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plain_load_error(folder: Path, plus: bool) -> str:
    """What a plain ``from_pretrained(folder)`` gives (it fails without torchvision)."""
    if importlib.util.find_spec("torchvision") is not None:
        return "torchvision is installed: not tried"
    try:
        (QwenImageEditPlusPipeline if plus else QwenImageEditPipeline).from_pretrained(folder)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return "it worked"


def _check_prompts(pipe: QwenEditPipeline, image: Any, folder: Path) -> str:
    """The 64-token drop leaves the user's part; one prompt gives no mask; prompts differ; the tokenizer
    loads the same from vocab.json + merges.txt (the real ``tokenizer/`` layout). Returns a summary."""
    import tempfile

    plus = isinstance(pipe, QwenImageEditPlusPipeline)
    tok = pipe.tokenizer
    assert template_prefix_length(pipe) == pipe.prompt_template_encode_start_idx == TEMPLATE_DROP
    user = ("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" if plus else "") + "make it red"
    text = pipe.prompt_template_encode.format(user)
    first_kept = tok.convert_ids_to_tokens(tok(text)["input_ids"][TEMPLATE_DROP])
    assert first_kept == ("Picture" if plus else "<|vision_start|>"), first_kept

    with tempfile.TemporaryDirectory() as slow_dir:
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (Path(slow_dir) / name).write_bytes((folder / "tokenizer" / name).read_bytes())
        slow = AutoTokenizer.from_pretrained(slow_dir)
        assert slow(text)["input_ids"] == tok(text)["input_ids"]

    cond = pipe.image_processor.resize(image, 64, 64)
    cond_image: Any = [cond] if plus else cond
    n_tokens = int(
        pipe.processor(text=[text], images=cond_image, return_tensors="pt")["attention_mask"].sum()
    )
    embeds, mask = pipe.encode_prompt(prompt="make it red", image=cond_image)
    other, _ = pipe.encode_prompt(prompt="make it blue", image=cond_image)
    assert embeds.shape[1] == n_tokens - TEMPLATE_DROP, (embeds.shape, n_tokens)
    assert mask is None
    assert embeds.shape != other.shape or not torch.allclose(embeds, other)
    summary = f"{n_tokens} tokens, {embeds.shape[1]} kept; mask for one prompt: {mask}"
    if not plus:  # the Plus pipeline takes one prompt at a time
        batch, batch_mask = pipe.encode_prompt(prompt=["make it red", "x"], image=[cond, cond])
        summary += f"; batch of 2: {tuple(batch.shape)}, mask row sums {batch_mask.sum(1).tolist()}"
    return summary


def _timed_runs(pipe: QwenEditPipeline, image: Any) -> dict[str, float]:
    """Run the pipeline at its default image sizes and within :func:`small_edit_sizes`; returns timings."""
    call: dict[str, Any] = {
        "image": image,
        "prompt": "make it red",
        "negative_prompt": " ",
        "true_cfg_scale": 4.0,
        "num_inference_steps": 2,
        "height": 32,
        "width": 48,
        "output_type": "pt",
    }
    times: dict[str, float] = {}
    outputs = []
    for label in ("default sizes", "small_edit_sizes", "small_edit_sizes again"):
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        if label == "default sizes":
            out = pipe(generator=generator, **call).images
        else:
            with small_edit_sizes():
                out = pipe(generator=generator, **call).images
        times[label] = time.perf_counter() - t0
        assert out.shape == (1, 3, 32, 48) and out.dtype == torch.float32, (out.shape, out.dtype)
        assert torch.isfinite(out).all()
        outputs.append(out)
    assert torch.equal(outputs[1], outputs[2]), "runs are not deterministic"
    return times


def _digest(folder: Path) -> dict[str, str]:
    import hashlib

    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _self_check() -> None:
    import os
    import tempfile

    import numpy as np
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # as tests/conftest.py does
    for logs in (diffusers_logging, transformers_logging):
        logs.set_verbosity_error()
        logs.disable_progress_bar()
    rss_start = _peak_rss_mib()
    image = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8"))  # 64x48

    with tempfile.TemporaryDirectory() as tmp:
        for plus in (True, False):
            folder = Path(tmp) / ("plus" if plus else "edit")
            t0 = time.perf_counter()
            build_tiny_qwen_edit(folder, plus=plus)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipe = load_qwen_edit_pipeline(folder)
            t_load = time.perf_counter() - t0
            assert isinstance(pipe, QwenImageEditPlusPipeline) == plus
            pipe.set_progress_bar_config(disable=True)
            rss_built = _peak_rss_mib()

            prompts = _check_prompts(pipe, image, folder)
            times = _timed_runs(pipe, image)
            masked_err, unmasked_err = padded_batch_error(pipe.transformer)
            params = {
                k: sum(p.numel() for p in m.parameters())
                for k, m in pipe.components.items()
                if isinstance(m, torch.nn.Module)
            }
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            print(f"== {type(pipe).__name__}")
            print(f"  plain from_pretrained(folder): {_plain_load_error(folder, plus)}")
            print(f"  build+save {t_build:.2f}s, load {t_load:.2f}s, {size / 1024:.0f} KiB, params {params}")
            print(f"  prompt: {prompts}")
            runs = ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
            print(f"  runs (2 steps, true cfg, 64x48 in, 48x32 out): {runs}")
            print(
                f"  padded batch of 2 vs single rows: max |diff| {masked_err:.1e} with the mask, "
                f"{unmasked_err:.1e} without"
            )
            print(
                f"  peak RSS: {rss_start:.0f} MiB after imports, {rss_built:.0f} MiB after build+load, "
                f"{_peak_rss_mib():.0f} MiB after the runs"
            )
        t0 = time.perf_counter()
        again = build_tiny_qwen_edit(Path(tmp) / "again", plus=False)
        t_again = time.perf_counter() - t0
        assert _digest(again) == _digest(Path(tmp) / "edit"), "the build is not deterministic"
        print(f"== rebuild: byte-identical folder ({t_again:.2f}s)")


if __name__ == "__main__":
    _self_check()
