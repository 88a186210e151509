"""Errors users can catch by name."""


class UnsupportedPipelineError(TypeError):
    """The pipeline class has no vidaccel adapter."""

    def __init__(self, pipeline_class: str, supported: list[str]):
        self.pipeline_class = pipeline_class
        self.supported = list(supported)
        super().__init__(
            f"vidaccel does not support {pipeline_class}. Supported pipelines: {', '.join(supported)}. "
            "If this pipeline uses one of their transformers, open an issue with its class name."
        )


class AlreadyAcceleratedError(RuntimeError):
    """vidaccel is already applied to this pipeline."""
