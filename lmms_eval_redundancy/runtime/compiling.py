"""``compile=true``: the vision tower and the LLM of one model instance run under ``torch.compile``.

Each compiled module gets its own ``forward`` replaced on the instance by a compiled one (``dynamic=False``: one
graph per input shape; the LLM's prompts come in length buckets, ``runtime.decoding``), so hooks on the module
itself still run, uncompiled, around it. The vision encoder layers are compiled one by one (one graph serves
them all), except those whose attention module a method hooks to read inside the tower (``Family.serving``):
they run uncompiled. The LLM is compiled whole, prefill and decoding (with CUDA graphs on a GPU). Methods inside
the LLM are refused: their hooks on decoder layers change the sequence per stage and their layers keep dynamic
caches.
"""

from __future__ import annotations

import functools

import torch

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.registry import MethodError, Stage

RECOMPILE_LIMIT = 64  # graphs per compiled module (batch sizes x length buckets x vision tiles); torch's default is 8


def compile_forward(module: torch.nn.Module, mode: str) -> None:
    """Replace ``module.forward`` on this instance by ``torch.compile`` of it (hooks on ``module`` stay outside)."""
    compiled = torch.compile(module.forward, dynamic=False, mode=mode)

    @functools.wraps(module.forward)
    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    module.forward = forward


def check_compilable(method) -> None:
    """Refuse ``compile=true`` for a method inside the LLM."""
    if method.stage is Stage.INSIDE_LLM:
        raise MethodError(f"compile=true compiles the LLM, but {method.name} prunes inside it (hooks on decoder layers "
                          "that change the sequence per stage, a dynamic KV cache): drop compile=true for this method")


def compile_model(model, family, method) -> None:
    """Compile ``model``'s vision encoder layers and LLM in place for ``method`` (attached already)."""
    check_compilable(method)
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1:
        raise UserError(f"compile=true needs the model on one device, not spread over {sorted(map(str, devices))}: "
                        "drop device_map= or compile=true")
    hooked = family.attention_hooked_layers(method.vision_needs())
    for index, layer in enumerate(family.vision_encoder_layers):
        if index not in hooked:
            compile_forward(layer, "default")
    compile_forward(family.language_model, "reduce-overhead" if model.device.type == "cuda" else "default")
