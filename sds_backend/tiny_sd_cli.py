"""`python -m sds_backend make-tiny-sd [DIR]`: the tiny Stable Diffusion used by tests and demos.

With DIR, save a fresh copy there; without, print the folder of the per-machine cached copy
(built on first use), which is what the test suites load.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", nargs="?", help="output folder (created); omit to use the cached copy")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from sds_backend.tiny_sd import cached_tiny_sd, save_tiny_sd

    print(save_tiny_sd(args.folder, seed=args.seed) if args.folder else cached_tiny_sd(seed=args.seed))
    return 0
