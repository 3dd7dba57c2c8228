"""SDS Head backend: morphable head model, differentiable rasterizer, SDS guidance and fitting."""

__version__ = "0.1.0"
