"""Tiny LLaVA-family checkpoints built locally (random weights), and configs with real geometry.

Each family builds its own tiny config and processor (``Family.tiny_config``, ``Family.tiny_processor``)
from the pieces here: a word-level tokenizer, small vision and text configs. ``families.build_tiny_model``
saves a checkpoint with ``save_pretrained`` so that it loads back through ``from_pretrained`` like a real one.
"""

from __future__ import annotations

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

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


def tiny_text_config(model: str, vocab_size: int, hidden: int = 64, layers: int = 4):
    """A small Llama (``model="llama"``) or Qwen2 (``"qwen2"``) text config agreeing with ``build_tokenizer``."""
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
    return Qwen2Config(**common) if model == "qwen2" else LlamaConfig(**common)


def tiny_vision_config(tower: str, image_size: int, patch_size: int, hidden: int = 32, layers: int = 2):
    """A small CLIP (a [CLS] token) or SigLIP (none) vision config."""
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


def tiny_pinpoints(image_size: int) -> list[list[int]]:
    """The anyres grid of tiny models: 1x1 to 2x2 tiles."""
    return [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)]


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


CLIP_WORDS = [*WORDS, "it"]


def build_tiny_clip(out_dir, vision_width: int, seed: int = 0, projection_dim: int = 16, text: dict | None = None):
    """Save a random tiny CLIP checkpoint (text tower, tokenizer, a one-layer vision tower of width
    ``vision_width`` for its post-layernorm and visual projection) to ``out_dir``; the text config keeps
    CLIP's legacy ``eos_token_id=2`` (pooling at the largest token id, the end-of-text token here). ``text``
    overrides the text tower's sizes (e.g. a real tower's widths and depth, for timing)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    special = ["<|pad|>", "<|unk|>"]
    vocab = {tok: i for i, tok in enumerate(special + CLIP_WORDS + ["<|startoftext|>", "<|endoftext|>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(t, vocab[t]) for t in ("<|startoftext|>", "<|endoftext|>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", unk_token="<|unk|>",
                                        bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, **(text or {})}
    text_config = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, projection_dim=projection_dim,
                                 pad_token_id=0, bos_token_id=vocab["<|startoftext|>"], eos_token_id=2, **sizes)
    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=1,
                              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=projection_dim)).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
