"""`python -m sds_backend fit`: fit the head to a prompt and write the outputs to a folder.

Outputs: weights.json (component -> weight), texture.png (with the texture stage),
evolution.gif, head.glb (morph targets + texture), fit.json (settings and figures) and
checkpoint.safetensors (continue with --resume).

Every input is checked before a model loads (well under 2 s; torch is imported only to check a
checkpoint to resume): prompt, settings, model source, bundle, starting weights, the checkpoint
and the output folder (created, probed for a small write, locked, and refused when it holds
another fit's outputs unless --overwrite, or --resume with that fit's checkpoint). Outputs are staged and moved into the folder together at the end; a failure or an
abort leaves the folder as it was. Exit codes: sds_backend/exits.py (README's table).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import exits, fit_config
from ..bundle import BundleError
from ..files import InputError, OutputError, OutputSet, parse_json, read_input_file
from ..inputs import model_identity
from .device import check_device_name
from .request import FIT_FILES, LEGACY_CHECKPOINT, OUTPUT_FILES, FitRequest, make_request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help='what the head should look like, e.g. "Winston Churchill"')
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--model", default=None,
                        help="Stable Diffusion hub id or local folder (default: $SDS_HEAD_MODEL or SD 1.5)")
    parser.add_argument("--vae-model", default=None,
                        help="with --vae tiny: the AutoencoderTiny, hub id or local folder "
                             "(default: $SDS_HEAD_TINY_VAE or madebyollin/taesd)")
    parser.add_argument("--bundle", default=None,
                        help="morphable model .npz, or .glb with morph targets (default: assets/default_head.npz)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cuda[:N], mps or cpu")
    fit_config.add_flags(parser)
    parser.add_argument("--initial-weights", type=Path, default=None,
                        help="weights.json ({component: weight}) to start from; components it omits start at 0")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier fit in OUT")
    parser.add_argument("--expressions", action="store_true", help="add the ARKit expression targets to head.glb")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass
class Plan:
    """What `fit` will do, known before a model loads."""

    request: FitRequest
    outputs: OutputSet            # prepared: the folder exists, is locked, and takes a small write
    checkpoint: Path              # where the fit writes its checkpoint (in the folder, or staged with the rest)
    resume: bool                  # continue from the checkpoint already in the folder


def check_arguments(args: argparse.Namespace) -> Plan:
    """Everything that can be known before a model loads, checked."""
    check_device_name(args.device)
    weights_json = None
    if args.initial_weights is not None:
        weights_json = parse_json(read_input_file(args.initial_weights, "--initial-weights", 1 << 20),
                                  f"--initial-weights {args.initial_weights}")
    request = make_request(args.prompt, args.negative, args.model, args.bundle, weights_json=weights_json,
                           config=fit_config.from_flags(args), export_expressions=args.expressions,
                           vae_model=args.vae_model)
    outputs = OutputSet(args.out, FIT_FILES, what="--out",
                        hint="pass --overwrite to replace them, --resume to continue that fit")
    existing = outputs.existing_outputs()
    checkpoint = outputs.folder / OUTPUT_FILES["checkpoint"]
    resume = args.resume and checkpoint.exists()
    if args.resume:
        check_resumable(outputs.folder, checkpoint, request, existing)
    outputs.replace = args.overwrite or resume
    outputs.prepare()
    # The checkpoint lies in the folder from the first periodic save, so that a crash can resume;
    # when it would sit beside another fit's outputs (--overwrite), it is staged with the rest.
    if resume or not existing:
        checkpoint = outputs.direct_path(OUTPUT_FILES["checkpoint"])
    else:
        checkpoint = outputs.path(OUTPUT_FILES["checkpoint"])
    return Plan(request, outputs, checkpoint, resume)


def check_resumable(folder: Path, checkpoint_path: Path, request: FitRequest, existing: list[str]) -> None:
    from ..core.checkpoint import CheckpointError, Expected, Identity, load

    if not checkpoint_path.exists():
        if (folder / LEGACY_CHECKPOINT).exists():
            raise InputError(f"--resume: {folder / LEGACY_CHECKPOINT} is a pickled checkpoint of an earlier release; "
                             "it is not opened (loading a pickle can run code). Run again with --overwrite")
        if existing:
            raise InputError(f"--resume: {folder} holds the outputs of another run ({', '.join(existing)}) but no "
                             f"{checkpoint_path.name} to continue from; pass --overwrite to replace them")
        logging.getLogger("sds_backend").info("--resume: no checkpoint in %s yet, starting from the beginning", folder)
        return
    identity = Identity(config=request.config.to_dict(), prompt=request.prompt, negative_prompt=request.negative_prompt,
                        model=model_identity(request.model), bundle=request.bundle.digest(),
                        components=request.bundle.num_components, rig=request.rig.identity(),
                        tiny_vae=request.tiny_vae)
    try:
        load(checkpoint_path, identity, Expected.of(request.config, request.rig), device="cpu")
    except CheckpointError as exc:
        raise InputError(f"--resume: {exc}") from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def fail(code: int, text: str) -> int:
        print(f"error: {text}", file=sys.stderr)
        return code

    try:
        plan = check_arguments(args)
    except (InputError, BundleError, ValueError) as exc:
        return fail(exits.BAD_INPUT, str(exc))
    except OutputError as exc:
        return fail(exits.OUTPUT, str(exc))
    with exits.StopSignals() as stop:
        try:
            return _fit(args, plan, stop)
        except KeyboardInterrupt:
            plan.outputs.discard()
            kept = plan.checkpoint.parent == plan.outputs.folder and plan.checkpoint.exists()
            print("aborted: nothing was written" + (f" (the last checkpoint stays in {plan.checkpoint})" if kept else ""),
                  file=sys.stderr)
            return stop.exit_code
        except BaseException as exc:
            plan.outputs.discard()
            return _failure_code(exc, fail)


def _failure_code(exc: BaseException, fail) -> int:
    from ..core.checkpoint import CheckpointError
    from ..core.guidance import ModelLoadError

    if isinstance(exc, ModelLoadError):
        return fail(exits.BACKEND, str(exc))
    if isinstance(exc, (CheckpointError, InputError)):
        return fail(exits.BAD_INPUT, str(exc))
    if isinstance(exc, OutputError):
        return fail(exits.OUTPUT, str(exc))
    if not isinstance(exc, Exception):
        raise exc
    log = exits.log_bug("fit", exc)
    return fail(exits.BUG, f"internal error (a bug): {type(exc).__name__}: {exc}\nthe traceback is in {log}")


def _fit(args, plan: Plan, stop: exits.StopSignals) -> int:
    from .device import resolve_device
    from .job import Backend, write_outputs

    request, outputs = plan.request, plan.outputs
    device = resolve_device(args.device)
    progress = _ProgressBar(request.config.total_steps, enabled=not args.quiet and sys.stderr.isatty())
    job = Backend(device).prepare(request, plan.checkpoint, resume=plan.resume)
    result = job.run(on_event=progress.update, should_stop=lambda: stop.requested)
    progress.close()
    write_outputs(outputs, request, result, job.fitter.guidance.model.model_id)
    written = outputs.commit()
    state = "stopped" if result.stopped else "done"
    print(f"{state}: {result.iterations} iterations in {result.seconds:.1f} s; outputs in {outputs.folder}",
          file=sys.stderr)
    for name, path in sorted(written.items()):
        print(f"  {name:24s} {path}", file=sys.stderr)
    return stop.exit_code if stop.requested else exits.OK


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
