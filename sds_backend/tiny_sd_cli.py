"""`python -m sds_backend make-tiny-sd DIR`: save the tiny random Stable Diffusion used by tests."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from sds_backend.tiny_sd import save_tiny_sd

    print(save_tiny_sd(args.folder, seed=args.seed))
    return 0
