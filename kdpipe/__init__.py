"""kdpipe: knowledge-distillation pipelines as DAGs of Ray Train + DeepSpeed stages, tracked in MLflow."""

__version__ = "0.1.0"
