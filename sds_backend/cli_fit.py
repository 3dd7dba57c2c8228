"""`python -m sds_backend fit`: fit the head to a prompt and write the outputs to a folder.

Outputs: weights.json (component -> weight), texture.png (with the texture stage),
evolution.gif, head.glb (morph targets + texture), fit.json (settings and figures) and
checkpoint.pt (continue with --resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .fit import FitConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help='what the head should look like, e.g. "Winston Churchill"')
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--model", default=None,
                        help="Stable Diffusion hub id or local folder (default: $SDS_HEAD_MODEL or SD 1.5)")
    parser.add_argument("--bundle", default=None, help="morphable model .npz (default: assets/default_head.npz)")
    parser.add_argument("--stages", default="shape", help="comma-separated: shape, texture (default: shape)")
    parser.add_argument("--steps", type=int, default=None, help="shape-stage iterations (default 200)")
    parser.add_argument("--texture-steps", type=int, default=None, help="texture-stage iterations (default 400)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 100)")
    parser.add_argument("--render-size", type=int, default=None, help="render side in pixels (default 256)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--config", default=None,
                        help="more FitConfig fields as JSON or @file.json, e.g. '{\"lr\": 0.03, \"batch_size\": 2}'")
    parser.add_argument("--initial-weights", type=Path, default=None, help="weights.json to start from")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--expressions", action="store_true", help="add the ARKit expression targets to head.glb")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace) -> FitConfig:
    values: dict = {}
    if args.config:
        text = Path(args.config[1:]).read_text() if args.config.startswith("@") else args.config
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(values, dict):
            raise ValueError("--config: expected a JSON object of FitConfig fields")
    values["stages"] = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    for flag, key in (("steps", "shape_steps"), ("texture_steps", "texture_steps"), ("seed", "seed"),
                      ("guidance", "guidance_scale"), ("render_size", "render_size")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    return FitConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from .guidance import ModelLoadError
    from .job import Backend, FitRequest, resolve_device
    from .morphable import BundleError

    try:
        config = build_config(args)
        device = resolve_device(args.device)
        initial = None
        if args.initial_weights:
            initial = list(json.loads(args.initial_weights.read_text()).values())
        request = FitRequest(prompt=args.prompt, negative_prompt=args.negative, out_dir=args.out, model=args.model,
                             bundle=args.bundle, initial_weights=initial, config=config, resume=args.resume,
                             export_expressions=args.expressions)
        progress = _ProgressBar(sum(config.steps_of(s) for s in config.stages), enabled=not args.quiet and sys.stderr.isatty())
        job = Backend(device).run(request, on_event=progress.update)
        progress.close()
    except (ValueError, ModelLoadError, BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = job.result
    print(f"{'stopped' if result.stopped else 'done'}: {result.iterations} iterations in {result.seconds:.1f} s; "
          f"outputs in {args.out}", file=sys.stderr)
    for name, path in sorted(job.outputs.items()):
        print(f"  {name:10s} {path}", file=sys.stderr)
    return 0


class _ProgressBar:
    """tqdm on a terminal; nothing otherwise (logs and pipes stay clean)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="it", dynamic_ncols=True)
        self.done = 0

    def update(self, event) -> None:
        if self.bar is None or not hasattr(event, "loss"):
            return
        self.bar.update(event.iteration - self.done)
        self.done = event.iteration
        self.bar.set_postfix(stage=event.stage, loss=f"{event.loss:.4g}", t=f"{event.t:.2f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
