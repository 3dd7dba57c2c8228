"""SDS Head backend: morphable head model, differentiable rasterizer, SDS guidance and fitting.

Layout (docs/design.md has the map): the modules at this level are the contracts both processes
import (protocol, bundle, fit_config, inputs, files: stdlib and numpy only); core/ is the torch
library, app/ the commands and the server, tools/ benchmarks and asset builders.
"""
from pathlib import Path

__version__ = "0.1.0"
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "default_head.npz"
