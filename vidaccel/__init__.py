"""vidaccel: faster diffusers video pipelines with measured quality."""

__version__ = "0.1.0"
