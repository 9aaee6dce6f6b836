"""Prompts and video frames exactly as the lmms-eval wrapper builds them (training reuses them)."""

from __future__ import annotations

import numpy as np
from jinja2 import TemplateError

from lmms_eval_redundancy.core.errors import UserError

# Used only when neither the checkpoint's processor nor its tokenizer carries a chat template.
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "{% endif %}{{ message['role'].upper() }}: {% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<image>\n{% elif part['type'] == 'video' %}<video>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def chat_template_of(processor, override: str | None = None) -> str:
    """The template to use: ``override`` (refused if it cannot render a prompt), else the processor's, else the
    tokenizer's, else Vicuna's."""
    if override:
        try:
            chat_prompt(processor, override, "a question", 1, 0)
        except (TemplateError, TypeError, ValueError) as err:
            raise UserError(f"chat_template={override!r} cannot render a prompt ({err}); give a Jinja chat template "
                            "over `messages`, or leave chat_template out to use the checkpoint's") from None
    return override or processor.chat_template or processor.tokenizer.chat_template or VICUNA_TEMPLATE


def load_video_frames(path: str, num_frames: int) -> np.ndarray:
    """``num_frames`` frames sampled uniformly from a video file, ``[F, H, W, 3]`` uint8."""
    from decord import VideoReader, cpu

    reader = VideoReader(path, ctx=cpu(0))
    index = np.linspace(0, len(reader) - 1, min(num_frames, len(reader)), dtype=int)
    return reader.get_batch(index.tolist()).asnumpy()


def chat_prompt(processor, chat_template: str, context: str, n_images: int, n_videos: int,
                continuation: str | None = None) -> str:
    """One user turn (the visuals first, unless the context places them) and the assistant's cue."""
    image_token = getattr(processor, "image_token", "<image>")
    video_token = getattr(processor, "video_token", "<video>")
    parts = []
    if image_token not in context and video_token not in context:
        parts = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": context}]}]
    prompt = processor.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                           tokenize=False)
    return prompt if continuation is None else prompt + continuation
