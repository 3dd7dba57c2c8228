"""`python -m sds_backend bench {raster,fit}`: print one JSON object of benchmark figures.

Figures are medians over repeated runs; ratios are measured within one run, round-robin, so
that a noisy machine affects both sides of a ratio alike.
"""
from __future__ import annotations

import argparse
import json

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("raster", "fit"), help="which benchmark")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch here")
    return device


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.what == "raster":
        from .bench_raster import run as bench
    else:
        from .bench_fit import run as bench
    print(json.dumps(bench(device, repeats=args.repeats), indent=2))
    return 0
