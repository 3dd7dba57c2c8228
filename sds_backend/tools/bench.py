"""`python -m sds_backend bench {raster,fit} [--architecture sd15]`: print one JSON object of figures.

Figures are medians over repeated runs; ratios are measured within one run, round-robin, so
that a noisy machine affects both sides of a ratio alike.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("raster", "fit"), help="which benchmark")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cuda[:N], mps or cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per configuration (default: raster 15, fit 25)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--model", default=None,
                        help="fit: 'tiny' (CPU default), 'sd15-arch' (random SD 1.5 weights; CUDA default) or a model id/folder")
    parser.add_argument("--architecture", choices=("sd15",), default=None,
                        help="fit: compare the full VAE with TAESD on this architecture (random weights) instead")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..app.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repeats = {} if args.repeats is None else {"repeats": args.repeats}     # else each bench's own default
    if args.what == "raster":
        from .bench_raster import run as bench_raster

        figures = bench_raster(device, **repeats)
    elif args.architecture:
        from .bench_vae import run as bench_vae

        figures = bench_vae(device, **repeats)
    else:
        from .bench_fit import run as bench_fit

        figures = bench_fit(device, model=args.model, **repeats)
    print(json.dumps(figures, indent=2))
    return 0
