"""lmms-eval entry point: registers the model id ``llava_redundancy``."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="llava_redundancy", simple_class_path="lmms_eval_redundancy.lmms.model.LlavaRedundancy")
