"""Small LLaVA-family checkpoints built locally (random weights), and configs with real geometry.

Everything here is built from configs, a word-level tokenizer and explicitly sized processors, then
saved with ``save_pretrained`` so that it loads back through ``from_pretrained`` like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from lmms_eval_redundancy.families import FAMILIES

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]
WORDS = (
    "user assistant system : . , ? ! a an the is are of in on at to and or what which how many where "
    "does this image video show shows color colour shape object objects left right top bottom middle "
    "red green blue yellow white black orange purple gray circle square triangle star cross "
    "yes no zero one two three four five six seven eight nine ten first second third "
    "answer with word single letter number describe appeared moved up down order more"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'video' %}<video> "
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)

# Real checkpoint geometry (vision tower, projector input, grid pinpoints); text towers are cut to
# one or two layers by ``real_geometry_config``.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ONEVISION_PINPOINTS = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose image and video tokens are special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 4):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    return Qwen2Config(**common) if family == "llava_onevision" else LlamaConfig(**common)


def _vision_config(tower: str, image_size: int, patch_size: int, hidden: int = 32, layers: int = 2):
    common = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if tower == "siglip":
        return SiglipVisionConfig(**common)
    return CLIPVisionConfig(projection_dim=hidden, **common)


def default_tower(family: str) -> str:
    """The vision tower kind of the real checkpoints: SigLIP for OneVision, CLIP otherwise."""
    return "siglip" if family == "llava_onevision" else "clip"


def tiny_config(family: str, tokenizer: PreTrainedTokenizerFast, image_size: int = 32, patch_size: int = 8,
                tower: str | None = None, vision: dict | None = None, text: dict | None = None):
    """Config of a tiny random model of ``family`` that agrees with ``build_tokenizer``.

    ``tower`` is ``clip`` (a [CLS] token, dropped before the LLM) or ``siglip`` (none); ``vision`` and
    ``text`` override the widths and depths (``hidden``, ``layers``) of the two towers.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    tower = tower or default_tower(family)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    text_config = _text_config(family, vocab_size=len(tokenizer), **(text or {}))
    vision_config = _vision_config(tower, image_size, patch_size, **(vision or {}))
    pinpoints = [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)]
    common = dict(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id)
    clip = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
    if family == "llava":
        return LlavaConfig(**common, **clip)
    if family == "llava_next":
        return LlavaNextConfig(**common, **clip, image_grid_pinpoints=pinpoints)
    return LlavaOnevisionConfig(**common, video_token_id=video_token_id, image_grid_pinpoints=pinpoints,
                                vision_feature_layer=-1,
                                vision_feature_select_strategy="default" if tower == "clip" else "full",
                                vision_aspect_ratio="anyres_max_9")


def tiny_processor(family: str, tokenizer: PreTrainedTokenizerFast, image_size: int = 32, patch_size: int = 8,
                   tower: str | None = None):
    """The processor matching ``tiny_config`` (same patch size, image size, grid pinpoints and tower)."""
    has_cls = (tower or default_tower(family)) == "clip"
    square = {"height": image_size, "width": image_size}
    pinpoints = [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)]
    clip = dict(tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    if family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square),
                              **clip)
    if family == "llava_next":
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square,
                                                     image_grid_pinpoints=pinpoints)
        return LlavaNextProcessor(image_processor=image_processor, **clip)
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size=square, image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=square),
        num_image_tokens=(image_size // patch_size) ** 2 + has_cls,
        vision_feature_select_strategy="default" if has_cls else "full",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Build a random tiny ``family`` checkpoint and save it (model, tokenizer, processors) to ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(family, tokenizer, image_size, patch_size)
    torch.manual_seed(seed)
    model = FAMILIES[family].model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tiny_processor(family, tokenizer, image_size, patch_size).save_pretrained(out_dir)
    return out_dir


def real_geometry_config(name: str, text_layers: int = 1, vision_layers: int = 2, intermediate_size: int = 256,
                         vocab_size: int = 1024):
    """Config with the vision geometry of a real llava-hf checkpoint and a cut-down text tower.

    ``name`` is one of ``llava-1.5-7b``, ``llava-v1.6-vicuna-7b``, ``llava-onevision-qwen2-0.5b``,
    ``llava-onevision-qwen2-7b``. The text hidden size is the real one (it decides codebook
    compatibility), the vocabulary is small so the model stays cheap to instantiate (these configs are
    for counting and shaping visual tokens, not for text generation).
    """
    clip_336 = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    siglip_384 = SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers, num_attention_heads=16,
        image_size=384, patch_size=14,
    )
    llama = dict(vocab_size=vocab_size, intermediate_size=intermediate_size, num_hidden_layers=text_layers,
                 num_attention_heads=32)
    if name == "llava-1.5-7b":
        return LlavaConfig(vision_config=clip_336, text_config=LlamaConfig(hidden_size=4096, **llama),
                           image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default")
    if name == "llava-v1.6-vicuna-7b":
        return LlavaNextConfig(vision_config=clip_336, text_config=LlamaConfig(hidden_size=4096, **llama),
                               image_token_id=32000, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    hidden = {"llava-onevision-qwen2-0.5b": 896, "llava-onevision-qwen2-7b": 3584}.get(name)
    if hidden is None:
        raise ValueError(f"unknown geometry {name!r}")
    qwen = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate_size,
                       num_hidden_layers=text_layers,
                       num_attention_heads=14 if hidden == 896 else 28, num_key_value_heads=2)
    return LlavaOnevisionConfig(vision_config=siglip_384, text_config=qwen, image_token_id=151646,
                                video_token_id=151647, image_grid_pinpoints=ONEVISION_PINPOINTS,
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio="anyres_max_9")


@torch.no_grad()
def tiny_codebook(model_dir: str | Path, out: str | Path, rows: int = 6) -> tuple[Path, float]:
    """A codebook for a tiny LLaVA checkpoint: ``rows`` of its projected tokens of one noise image,
    and a threshold (median score of another image's tokens) that keeps about half of them."""
    import numpy as np
    from PIL import Image

    from lmms_eval_redundancy.codebook.store import Codebook, save_codebook
    from lmms_eval_redundancy.methods.codebook import redundancy_scores
    from lmms_eval_redundancy.runtime.loading import load

    loaded = load(str(model_dir), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = loaded.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    features = loaded.family.image_features({"pixel_values": pixels})
    prototypes = features[0][:rows].clone()
    threshold = round(float(redundancy_scores(features[1], prototypes).median()), 4)
    meta = {"model": str(model_dir), "source": "tiny: projected tokens of a noise image", "threshold": str(threshold)}
    return save_codebook(Codebook(prototypes, meta), out), threshold
