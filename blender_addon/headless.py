"""Fit a head to a prompt without the UI, inside Blender:

    blender -b [file.blend] --python-exit-code 1 -P blender_addon/headless.py -- \\
        --prompt "an old sailor" --out DIR [--model ID_OR_FOLDER] [--steps N] [--fbx] [--glb] [--save F.blend]

The head is --object NAME, else the active mesh with shape keys, else the first SDS head in the
file, else (for a file whose active mesh has no shape keys: an error) a new default head
(--bundle picks another bundle; the startup file's cube is ignored). Timers and modal operators do
not run under -b, so the same controller the panel uses is driven by a blocking loop here.
Progress goes to stdout as `[sds-head] ...` lines. The settings flags are the backend's own
(`python -m sds_backend fit --help` lists them, with their defaults); a flag that is not given
is not sent, so the backend's defaults apply.

Outputs in --out: weights.json ({shape key: weight}, as `python -m sds_backend fit` writes it),
fit.json (prompt, settings, state, iterations, Blender version), texture.png (when the head has a
texture), head.glb (--glb), head.fbx (--fbx); --save writes the .blend with the texture packed.
Everything is checked before the fit starts (the folder is probed for a small write; a folder
holding another run's outputs, or an existing --save file, is refused unless --overwrite), staged,
and moved into place together at the end: a failure leaves the folder as it was.

Exit codes (sds_backend/exits.py, README): 0 done, 2 bad arguments, 3 bad input (prompt,
settings, head, backend Python, model folder), 4 the backend failed (model cannot load, crash,
hang, garbage), 5 an output cannot be written, 130 / 143 stopped by Ctrl-C / SIGTERM (the fit ends
after its current iteration and the outputs are written, marked stopped; a second signal aborts
without writing), 1 a bug (its traceback goes to a log file, whose path is printed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import bpy

ADDON_DIR = Path(__file__).resolve().parent
OUTPUT_FILES = ("weights.json", "fit.json", "texture.png", "head.glb", "head.fbx")


def say(text: str) -> None:
    print(f"[sds-head] {text}", flush=True)


def fail(text: str) -> None:
    print(f"[sds-head] error: {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str], fit_config) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="blender -b -P blender_addon/headless.py --",
                                     description="Fit a morphable head to a text prompt inside Blender.")
    parser.add_argument("--prompt", required=True, help="what the head should look like")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the add-on preference)")
    parser.add_argument("--vae-model", default=None,
                        help="with --vae tiny: the AutoencoderTiny, hub id or local folder (default: the add-on's "
                             "Tiny VAE preference, else madebyollin/taesd)")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default=None)
    parser.add_argument("--backend-python", default=None, help="backend interpreter (default: the add-on preference)")
    parser.add_argument("--object", default=None, help="name of the head object to fit")
    parser.add_argument("--bundle", default=None, help="bundle for a new head when the file has none")
    parser.add_argument("--keys", default=None, metavar="PATTERN[,PATTERN]",
                        help="fit only the shape keys these globs match (case-insensitive); the others the "
                             "fit would move are locked at their values")
    parser.add_argument("--lock", default=None, metavar="PATTERN[,PATTERN]",
                        help="keep the shape keys these globs match at their values")
    fit_config.add_flags(parser)
    parser.add_argument("--timeout", type=float, default=None, help="seconds of backend silence treated as a hang")
    parser.add_argument("--fbx", action="store_true", help="write head.fbx")
    parser.add_argument("--glb", action="store_true", help="write head.glb")
    parser.add_argument("--save", type=Path, default=None, help="save the .blend here (texture packed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --out, and an existing --save file")
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
        if not path:
            continue
        if Path(path).resolve().parent == ADDON_DIR:
            return name
        # Blender 4.2+ loads an extension without its bl_info: there the name tells
        if getattr(module, "bl_info", {}).get("name") != "SDS Head" and not name.endswith(".sds_head"):
            continue
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


class Addon:
    """The add-on's modules this script uses, imported under whatever package name it has."""

    def __init__(self, package: str):
        for name in ("controller", "scene", "paths", "preferences", "pngfile", "errors", "roles"):
            setattr(self, name, importlib.import_module(f"{package}.{name}"))
        for name in ("exits", "files", "fit_config"):
            setattr(self, name, self.paths.shared(name))


def pick_head(args, addon: Addon):
    scene, errors = addon.scene, addon.errors
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
        if obj.type == "MESH" and scene.PROP_COMPONENTS in obj:
            return obj
    if active is not None and active.type == "MESH" and bpy.data.filepath:
        return active  # the file's active mesh was meant: check_head names what it lacks
    path = args.bundle or str(addon.paths.default_bundle_path())
    if not args.bundle and not Path(path).is_file():
        raise errors.UserError(f"no head in this file and no bundle at {path} to create one "
                               "(build it with 'python -m sds_backend make-head' or pass --bundle)")
    bundle = scene.load_bundle(path)
    obj = scene.build_head(bundle)
    say(f"created '{obj.name}' from {path} ({bundle.num_components} shape keys)")
    return obj


def key_roles(args, obj, addon: Addon) -> dict[str, str]:
    """The object's roles (roles.roles) with --keys / --lock applied."""
    split = (lambda text: [p for p in text.split(",") if p.strip()] if text else None)
    try:
        return addon.roles.with_patterns(addon.roles.roles(obj), split(args.keys), split(args.lock))
    except ValueError as exc:
        raise addon.errors.UserError(str(exc)) from None


def write_outputs(args, obj, status, inputs, outputs, addon: Addon) -> None:
    """weights.json, fit.json, texture.png and the requested exports, into the output set's staging."""
    scene, files = addon.scene, addon.files
    names = [name for name, role in inputs.roles.items() if role != "off"]
    weights = scene.read_weights(obj, names)
    files.atomic_write(outputs.path("weights.json"), (json.dumps(
        {name: round(float(w), 6) for name, w in zip(names, weights)}, indent=2) + "\n").encode())
    record = {
        "prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "model": inputs.model or None,
        "vae_model": inputs.vae_model or None,
        "config": inputs.config, "object": obj.name, "weights": dict(zip(names, weights)), "roles": inputs.roles,
        "state": status.state, "stopped": status.state == "stopped", "iterations": status.iterations_done,
        "seconds": status.seconds, "blender": bpy.app.version_string,
    }
    files.atomic_write(outputs.path("fit.json"), (json.dumps(record, indent=1) + "\n").encode())
    image = scene.texture_image(obj)
    if scene.has_pixels(image):
        width, height = image.size
        addon.pngfile.write_png(outputs.path("texture.png"), scene.read_pixels(image), width, height, image.channels)
    if args.glb:
        scene.export_gltf(obj, str(outputs.path("head.glb")))
    if args.fbx:
        scene.export_fbx(obj, str(outputs.path("head.fbx")))


def main(argv: list[str]) -> int:
    addon = Addon(addon_package())
    try:
        return run(argv, addon)
    except Exception as exc:  # a bug: its traceback goes to a log file, and Blender ends with the bug code
        log = addon.exits.log_bug("headless", exc)
        fail(f"internal error (a bug): {type(exc).__name__}: {exc}; the traceback is in {log}")
        return addon.exits.BUG


def run(argv: list[str], addon: Addon) -> int:
    exits, files = addon.exits, addon.files
    try:
        args = parse_args(argv, addon.fit_config)
    except SystemExit as exc:
        return exits.USAGE if exc.code else exits.OK
    CONTROLLER, UserError = addon.controller.CONTROLLER, addon.errors.UserError
    prefs = addon.preferences.get_preferences()
    overrides = {"echo_stderr": args.verbose}
    if args.backend_python:
        overrides["python"] = args.backend_python
    if args.device:
        overrides["device"] = args.device
    if args.timeout:
        overrides.update(hello_timeout=args.timeout, reply_timeout=args.timeout)
    settings = addon.preferences.backend_settings(prefs, **overrides)
    outputs = None
    try:
        try:
            config = addon.fit_config.flag_values(args)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        vae_model = args.vae_model if args.vae_model is not None else (
            prefs.tiny_vae if config.get("vae") == "tiny" else "")
        inputs = addon.controller.FitInputs(prompt=args.prompt, negative_prompt=args.negative,
                                            model=args.model if args.model is not None else prefs.model,
                                            vae_model=vae_model, config=config)
        addon.controller.check_fit_inputs(inputs)
        obj = pick_head(args, addon)
        addon.scene.check_head(obj)
        inputs.roles = key_roles(args, obj, addon)
        outputs = files.OutputSet(args.out, OUTPUT_FILES, replace=args.overwrite, what="--out").prepare()
        save = _check_save(args, outputs, files) if args.save else None     # --out exists now: it may hold it
    except UserError as exc:
        fail(str(exc))
        return exits.BAD_INPUT
    except files.OutputError as exc:
        if outputs is not None:
            outputs.discard()
        fail(str(exc))
        return exits.OUTPUT

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

    with exits.StopSignals(notice=say) as stop:
        try:
            CONTROLLER.listeners.append(report)
            started = time.monotonic()
            CONTROLLER.start_fit(obj, inputs, settings)
            say(f"fitting '{obj.name}' to \"{inputs.prompt.strip()}\" (backend pid {CONTROLLER.backend.pid})")
            while CONTROLLER.busy:
                if stop.requested and CONTROLLER.job.stop_requested_at is None:
                    CONTROLLER.stop()
                CONTROLLER.tick(wait=0.5)
            status = CONTROLLER.status
            if status.state == "failed":
                outputs.discard()
                fail(status.last_error)
                return exits.BACKEND
            say(f"{status.message} (wall {time.monotonic() - started:.1f} s)")
            try:
                write_outputs(args, obj, status, inputs, outputs, addon)
                if save is not None:
                    addon.scene.save_blend_copy(obj, save)
                written = outputs.commit()
            except (files.OutputError, OSError, UserError, RuntimeError) as exc:
                outputs.discard()
                fail(f"writing the outputs failed: {exc}")
                return exits.OUTPUT
            for name, path in written.items():
                say(f"wrote {name}: {path}")
            if save is not None:
                say(f"wrote {save}")
            return stop.exit_code if stop.requested else exits.OK
        except KeyboardInterrupt:
            outputs.discard()
            say("aborted: nothing was written")
            return stop.exit_code
        except UserError as exc:
            outputs.discard()
            fail(str(exc))
            return exits.BAD_INPUT
        finally:
            if report in CONTROLLER.listeners:
                CONTROLLER.listeners.remove(report)
            CONTROLLER.shutdown("headless run ended")


def _check_save(args, outputs, files) -> Path:
    save = args.save.expanduser().absolute()
    if save.parent == outputs.folder and save.name in OUTPUT_FILES:
        raise files.OutputError(f"--save: {save} is where the fit writes its {save.name}; choose another name")
    return files.check_output_file(save, "--save", args.overwrite)


def _script_args() -> list[str]:
    return sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []


if __name__ == "__main__":
    try:
        code = main(_script_args())
    except Exception:  # the add-on itself could not be loaded: still end Blender with a non-zero code
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
