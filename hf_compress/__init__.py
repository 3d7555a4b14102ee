"""hf_compress: distillation, pruning and quantisation-aware training as Trainer plug-ins."""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module; imported on first use so `import hf_compress` stays light
_EXPORTS = {
    "DistillationTrainer": "hf_compress.trainers.distillation_trainer",
    "DistillationConfig": "hf_compress.distillation.config",
    "student_from_teacher": "hf_compress.distillation.student",
    "cache_teacher_logits": "hf_compress.distillation.cache",
    "PruningCallback": "hf_compress.callbacks.pruning",
    "PruningConfig": "hf_compress.pruning.config",
    "QATCallback": "hf_compress.callbacks.qat",
    "QATConfig": "hf_compress.quantization.config",
    "ClusteringCallback": "hf_compress.callbacks.clustering",  # clustering
    "ClusteringConfig": "hf_compress.clustering.config",  # clustering
    "shared_student_from_teacher": "hf_compress.distillation.sharing",  # clustering (cross-layer sharing)
    "quantize_model": "hf_compress.quantization.ptq",
    "load_pretrained": "hf_compress.loading",
    "merge_lora": "hf_compress.pruning.lora",
    "select_modules": "hf_compress.modules",
    "compression_report": "hf_compress.report",
    "write_model_card": "hf_compress.integration",
    "export_onnx": "hf_compress.onnx",
    "report_to_integrations": "hf_compress.callbacks._logs",
    "LowRankCallback": "hf_compress.callbacks.lowrank",  # lowrank
    "LowRankConfig": "hf_compress.lowrank.config",  # lowrank
    "analyze_sensitivity": "hf_compress.sensitivity.analysis",  # sensitivity
    "plan_budget": "hf_compress.sensitivity.budget",  # sensitivity
    "SensitivityConfig": "hf_compress.sensitivity.config",  # sensitivity
    "BudgetConfig": "hf_compress.sensitivity.config",  # sensitivity
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _register_with_transformers():
    """After `import hf_compress`, AutoModel*.from_pretrained / pipeline load compressed directories
    (hf_compress.integration); without it stock transformers refuses them."""
    from .integration import register

    register()


_register_with_transformers()


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


def __dir__():
    return __all__
