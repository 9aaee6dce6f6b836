"""lmms-eval requests over documents held in memory, for tools and tests that drive a model directly."""

from __future__ import annotations

from lmms_eval.api.instance import Instance


def simple_requests(model, docs: list[dict], request_type: str = "generate_until", task: str = "docs",
                    split: str = "test", gen_kwargs: dict | None = None) -> list[Instance]:
    """One lmms-eval ``Instance`` per doc, as the evaluator builds them for a simple model.

    Each doc has a ``question`` and ``visuals`` (PIL images or video paths), and for ``loglikelihood`` a
    ``target`` continuation. The docs become ``model.task_dict[task][split]``, where ``doc_to_visual``
    reads them.
    """
    model.task_dict = {**getattr(model, "task_dict", {}), task: {split: dict(enumerate(docs))}}
    gen_kwargs = gen_kwargs or {}
    return [
        Instance(request_type=request_type, idx=0, metadata={"task": task, "doc_id": index, "repeats": 1},
                 arguments=(doc["question"], doc["target"] if request_type == "loglikelihood" else dict(gen_kwargs),
                            lambda d: d["visuals"], index, task, split))
        for index, doc in enumerate(docs)
    ]
