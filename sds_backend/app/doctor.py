"""`python -m sds_backend doctor`: which device, which versions, does the model load, is the head valid.

With `--json` it prints one JSON object on stdout (the Blender add-on's "Check backend" button
parses it); logging and progress bars go to stderr. Exit code 0 when the model loads and the head
bundle validates, 1 otherwise:

    {"ok": bool,
     "device": {"type": "cuda"|"mps"|"cpu", "name": str, "memory_gib": float|null,
                "cuda_available": bool, "mps_available": bool},
     "versions": {"python", "sds_backend", "torch", "diffusers", "transformers": str|null},
     "model": {"id": str, "ok": bool, "seconds": float|null, "dtype": str|null, "device": str|null,
               "resolution": int|null, "error": str|null},
     "head": {"path": str, "ok": bool, "vertices": int|null, "components": int|null, "error": str|null}}
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import time
from pathlib import Path
from typing import Any

from .. import DEFAULT_BUNDLE as DEFAULT_HEAD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id or local folder of a diffusers SD checkpoint "
                             "(default: $SDS_HEAD_MODEL or stable-diffusion-v1-5/stable-diffusion-v1-5)")
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD, help=f"head bundle to validate (default: {DEFAULT_HEAD})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to load the model")
    parser.add_argument("--download", action="store_true",
                        help="let the model check download a hub id that is not cached (off: local files only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..inputs import default_model_id

    from .device import resolve_device

    device = resolve_device("auto") if args.device == "auto" else torch.device(args.device)
    report = {
        "device": _device_info(device),
        "versions": {"python": platform.python_version(), "sds_backend": __version__,
                     **{name: _version(name) for name in ("torch", "diffusers", "transformers")}},
        "model": _check_model(args.model or default_model_id(), device, args.download),
        "head": _check_head(args.head),
    }
    report = {"ok": report["model"]["ok"] and report["head"]["ok"], **report}
    if args.json:
        print(json.dumps(report))
    else:
        _print_text(report)
    return 0 if report["ok"] else 1


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_info(device: Any) -> dict[str, Any]:
    import torch

    from .device import mps_available

    seen = {"cuda_available": torch.cuda.is_available(), "mps_available": mps_available(torch)}
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), **seen}
    if device.type in ("cuda", "mps") and not seen[f"{device.type}_available"]:
        return {"type": device.type, "name": f"not available (torch sees no {device.type.upper()} device)",
                "memory_gib": None, **seen}
    if device.type == "mps":
        return {"type": "mps", "name": f"Apple GPU (MPS) on {platform.machine()}", "memory_gib": None, **seen}
    name = platform.processor() or platform.machine()
    return {"type": device.type, "name": f"{name} ({torch.get_num_threads()} threads)", "memory_gib": None, **seen}


def _check_model(model: str, device: Any, allow_download: bool) -> dict[str, Any]:
    """Load the model the way a fit does; report the time or the one clear error."""
    result: dict[str, Any] = {"id": model, "ok": False, "seconds": None, "dtype": None, "device": str(device),
                              "resolution": None, "error": None}
    try:
        from ..core.guidance import load_model, resolve_dtype

        start = time.perf_counter()
        from .device import resolve_device

        resolve_device(str(device))          # a device torch does not have: the one clear error
        dtype = resolve_dtype("auto", device)
        loaded = load_model(model, dtype, device, allow_download=allow_download)
    except Exception as exc:  # the doctor reports every failure instead of crashing on it
        result["error"] = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        if "allow_download is off" in result["error"]:
            result["error"] += "\n(the doctor looks at local files only; add --download to let it fetch a hub id)"
        return result
    result.update(ok=True, seconds=round(time.perf_counter() - start, 2), dtype=str(dtype).removeprefix("torch."),
                  resolution=loaded.native_resolution)
    return result


def _check_head(path: Path) -> dict[str, Any]:
    from .. import bundle

    result: dict[str, Any] = {"path": str(path), "ok": False, "vertices": None, "components": None, "error": None}
    if not path.is_file():
        result["error"] = f"{path} does not exist (yet): build it with `python -m sds_backend make-head`"
        return result
    try:
        head = bundle.load(path)
    except bundle.BundleError as exc:
        result["error"] = str(exc)
        return result
    result.update(ok=True, vertices=head.num_vertices, components=head.num_components)
    return result


def _print_text(report: dict[str, Any]) -> None:
    device, model, head = report["device"], report["model"], report["head"]
    memory = f", {device['memory_gib']} GiB" if device["memory_gib"] else ""
    lines = [f"device        {device['type']}: {device['name']}{memory}"]
    lines += [f"{name:<14}{version or 'not installed'}" for name, version in report["versions"].items()]
    if model["ok"]:
        lines.append(f"model         ok      {model['id']} loaded in {model['seconds']} s "
                     f"({model['dtype']} on {model['device']}, native {model['resolution']} px)")
    else:
        lines.append(f"model         FAILED  {model['id']}")
        lines += ["                " + line for line in model["error"].splitlines()]
    if head["ok"]:
        lines.append(f"head          ok      {head['path']} ({head['vertices']} vertices, {head['components']} components)")
    else:
        lines.append(f"head          FAILED  {head['error']}")
    lines.append("all good" if report["ok"] else "something essential failed (see above)")
    print("\n".join(lines))
