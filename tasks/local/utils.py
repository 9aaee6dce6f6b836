"""Prompt, visual and scoring functions of the local tasks (data: ``lmms-eval-redundancy make-local-data``)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def image_visual(doc):
    return [doc["image"].convert("RGB")]


def pair_visual(doc):
    return [doc["image_1"].convert("RGB"), doc["image_2"].convert("RGB")]


def video_visual(doc):
    return [str(DATA_DIR / doc["video"])]


def exact_match(doc, results):
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"].lower())}
