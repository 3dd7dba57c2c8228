"""Fit a head to a prompt without the UI, inside Blender:

    blender -b [file.blend] --python-exit-code 1 -P blender_addon/headless.py -- \\
        --prompt "an old sailor" --out DIR [--model ID_OR_FOLDER] [--steps N] [--fbx] [--glb] [--save F.blend]

The head is --object NAME, else the active mesh with shape keys, else the first SDS head in the
file, else (for a file whose active mesh has no shape keys: an error) a new default head
(--bundle picks another bundle; the startup file's cube is ignored). Timers and modal operators do
not run under -b, so the same controller the panel uses is driven by a blocking loop here.
Progress goes to stdout as `[sds-head] ...` lines; Ctrl-C stops the fit after the current
iteration and still writes the outputs.

Outputs in --out: weights.json, texture.png (when the head has a texture), head.glb (--glb),
head.fbx (--fbx), and --save writes the .blend with the texture packed. The backend's job
folder is --out/job.

Exit codes: 0 done (or stopped by Ctrl-C), 2 bad arguments, 3 bad input (prompt, head, backend
Python, model folder), 4 the backend failed (model cannot load, crash, hang, garbage),
5 an output could not be written, 1 anything unexpected.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import bpy

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_INPUT, EXIT_BACKEND, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5
ADDON_DIR = Path(__file__).resolve().parent


def say(text: str) -> None:
    print(f"[sds-head] {text}", flush=True)


def fail(text: str) -> None:
    print(f"[sds-head] error: {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="blender -b -P blender_addon/headless.py --",
                                     description="Fit a morphable head to a text prompt inside Blender.")
    parser.add_argument("--prompt", required=True, help="what the head should look like")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the add-on preference)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None)
    parser.add_argument("--backend-python", default=None, help="backend interpreter (default: the add-on preference)")
    parser.add_argument("--object", default=None, help="name of the head object to fit")
    parser.add_argument("--bundle", default=None, help="bundle for a new head when the file has none")
    parser.add_argument("--stages", default="shape", help="comma-separated: shape,texture")
    parser.add_argument("--steps", type=int, default=200, help="shape iterations")
    parser.add_argument("--texture-steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=100.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--texture-lr", type=float, default=0.05)
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 regularisation of the weights")
    parser.add_argument("--weight-clamp", type=float, default=3.0)
    parser.add_argument("--render-size", type=int, default=256)
    parser.add_argument("--texture-size", type=int, default=512)
    parser.add_argument("--event-every", type=int, default=5)
    parser.add_argument("--texture-every", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=None, help="seconds of backend silence treated as a hang")
    parser.add_argument("--fbx", action="store_true", help="write head.fbx")
    parser.add_argument("--glb", action="store_true", help="write head.glb")
    parser.add_argument("--save", type=Path, default=None, help="save the .blend here (texture packed)")
    parser.add_argument("--verbose", action="store_true", help="copy the backend's stderr to ours")
    return parser.parse_args(argv)


def addon_package() -> str:
    """The add-on's package name: an enabled install of this very folder (a link install), else this
    folder imported from its parent. Another enabled SDS Head (an older copy or extension) is
    disabled for this run only, so one set of classes is registered."""
    import addon_utils

    for name in list(bpy.context.preferences.addons.keys()):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None) if module is not None else None
        if not path or getattr(module, "bl_info", {}).get("name") != "SDS Head":
            continue
        if Path(path).resolve().parent == ADDON_DIR:
            return name
        say(f"disabling the installed add-on {name} ({Path(path).parent}) for this run")
        addon_utils.disable(name, default_set=False)
    root = str(ADDON_DIR.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    package = ADDON_DIR.name
    module = importlib.import_module(package)
    if not hasattr(bpy.types.Scene, "sdshead"):
        module.register()
    return package


def pick_head(args, scene_mod, bundle_io, paths, errors):
    objects = bpy.data.objects
    if args.object:
        obj = objects.get(args.object)
        if obj is None:
            raise errors.UserError(f"--object {args.object!r}: no such object in this file")
        return obj
    active = bpy.context.view_layer.objects.active
    if active is not None and active.type == "MESH" and active.data.shape_keys is not None:
        return active
    for obj in objects:
        if obj.type == "MESH" and scene_mod.PROP_COMPONENTS in obj:
            return obj
    if active is not None and active.type == "MESH" and bpy.data.filepath:
        return active  # the file's active mesh was meant: check_head names what it lacks
    path = args.bundle or str(paths.default_bundle_path())
    if not Path(path).is_file():
        raise errors.UserError(f"no head in this file and no bundle at {path} to create one "
                                  "(build it with 'python -m sds_backend make-head' or pass --bundle)")
    try:
        bundle = bundle_io.load(path)
    except bundle_io.BundleError as exc:
        raise errors.UserError(str(exc)) from None
    obj = scene_mod.build_head(bundle)
    say(f"created '{obj.name}' from {path} ({bundle.num_components} shape keys)")
    return obj


def write_outputs(args, obj, job_status, inputs, scene_mod, pngfile) -> dict[str, str]:
    out: Path = args.out
    names = scene_mod.component_names(obj)
    weights = scene_mod.read_weights(obj, names)
    written: dict[str, str] = {}
    record = {
        "prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "model": inputs.model or None,
        "seed": inputs.seed, "stages": list(inputs.stages), "object": obj.name, "names": names,
        "weights": weights, "state": job_status.state, "iterations": job_status.iteration,
        "seconds": job_status.seconds, "blender": bpy.app.version_string,
    }
    (out / "weights.json").write_text(json.dumps(record, indent=1))
    written["weights"] = str(out / "weights.json")
    image = scene_mod.texture_image(obj)
    if scene_mod.has_pixels(image):
        width, height = image.size
        pngfile.write_png(out / "texture.png", scene_mod.read_pixels(image), width, height, image.channels)
        written["texture"] = str(out / "texture.png")
    if args.glb:
        written["glb"] = str(scene_mod.export_gltf(obj, str(out / "head.glb")))
    if args.fbx:
        written["fbx"] = str(scene_mod.export_fbx(obj, str(out / "head.fbx")))
    if args.save:
        scene_mod.pack_textures(obj)
        args.save.parent.mkdir(parents=True, exist_ok=True)
        bpy.ops.wm.save_as_mainfile(filepath=str(args.save.resolve()), check_existing=False)
        written["blend"] = str(args.save)
    return written


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    package = addon_package()
    controller = importlib.import_module(f"{package}.controller")
    scene_mod = importlib.import_module(f"{package}.scene")
    bundle_io = importlib.import_module(f"{package}.bundle_io")
    paths = importlib.import_module(f"{package}.paths")
    preferences = importlib.import_module(f"{package}.preferences")
    pngfile = importlib.import_module(f"{package}.pngfile")
    errors = importlib.import_module(f"{package}.errors")
    CONTROLLER = controller.CONTROLLER

    prefs = preferences.get_preferences()
    overrides = {"echo_stderr": args.verbose}
    if args.backend_python:
        overrides["python"] = args.backend_python
    if args.device:
        overrides["device"] = args.device
    if args.timeout:
        overrides.update(hello_timeout=args.timeout, reply_timeout=args.timeout)
    settings = preferences.backend_settings(prefs, **overrides)
    inputs = controller.FitInputs(
        prompt=args.prompt, negative_prompt=args.negative,
        model=args.model if args.model is not None else prefs.model,
        stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
        shape_steps=args.steps, texture_steps=args.texture_steps, seed=args.seed, guidance_scale=args.guidance,
        lr=args.lr, texture_lr=args.texture_lr, l2_weight=args.l2, weight_clamp=args.weight_clamp,
        render_size=args.render_size, texture_size=args.texture_size, event_every=args.event_every,
        texture_every=args.texture_every)

    last = {"iteration": -1, "state": ""}

    def report(status) -> None:
        if status.state != last["state"]:
            last["state"] = status.state
            if status.state == "running":
                say(f"backend ready ({status.backend}); {status.message}")
            elif status.state == "stopping":
                say(status.message)
        if status.iteration != last["iteration"] and status.total:
            last["iteration"] = status.iteration
            loss = "" if status.loss is None else f" loss {status.loss:.5g}"
            say(f"{status.stage} {status.iteration}/{status.total}{loss} ({status.seconds:.1f} s)")

    try:
        obj = pick_head(args, scene_mod, bundle_io, paths, errors)
        args.out.mkdir(parents=True, exist_ok=True)
        CONTROLLER.listeners.append(report)
        started = time.monotonic()
        CONTROLLER.start_fit(obj, inputs, settings, job_root=args.out / "job")
        say(f"fitting '{obj.name}' to \"{inputs.prompt.strip()}\" (stages {', '.join(inputs.stages)}; "
            f"backend pid {CONTROLLER.backend.pid})")
        interrupted = False
        while CONTROLLER.busy:
            try:
                CONTROLLER.tick(wait=0.5)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                say("Ctrl-C: stopping after the current iteration (Ctrl-C again to abort)")
                CONTROLLER.stop()
        status = CONTROLLER.status
        if status.state == "failed":
            fail(status.last_error)
            return EXIT_BACKEND
        say(f"{status.message} (wall {time.monotonic() - started:.1f} s)")
        try:
            written = write_outputs(args, obj, status, inputs, scene_mod, pngfile)
        except (OSError, errors.UserError, RuntimeError) as exc:
            fail(f"writing the outputs failed: {exc}")
            return EXIT_OUTPUT
        for name, path in written.items():
            say(f"wrote {name}: {path}")
        return EXIT_OK
    except errors.UserError as exc:
        fail(str(exc))
        return EXIT_INPUT
    finally:
        if report in CONTROLLER.listeners:
            CONTROLLER.listeners.remove(report)
        CONTROLLER.shutdown("headless run ended")


def _script_args() -> list[str]:
    return sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []


if __name__ == "__main__":
    try:
        code = main(_script_args())
    except Exception:  # an unexpected failure still ends Blender with a non-zero code
        import traceback

        traceback.print_exc()
        code = EXIT_UNEXPECTED
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
