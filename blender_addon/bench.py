"""Main-thread cost of applying one backend update to the default head; prints one JSON object.

    .venv-bpy/bin/python -m blender_addon.bench [--repeats 30] [--texture 1024] [--bundle PATH]

Measured through the controller's own apply step (what the UI timer runs per tick), medians:
  apply_weights_ms       a progress update: 50 shape-key values
  apply_weights_eval_ms  the same plus the depsgraph evaluation of the deformed mesh (what the
                         viewport pays when it redraws)
  apply_texture_ms       a tick with weights AND a new 1024^2 texture, as the add-on runs it: the
                         bridge's reader thread decoded the PNG (pngfile.read_png), the main thread
                         copies the pixels into the image
  reader_decode_ms       that decode, on the reader thread (not main-thread time)
  apply_texture_blender_decode_ms  the same tick when Blender has to decode the PNG on the main
                         thread (the fallback for PNGs read_png leaves to Blender: filtered rows,
                         palettes, 16 bit, interlacing; the backend writes none of them)
The PNGs have unfiltered rows, as the backend writes them (--png takes other files instead).
The head is assets/default_head.npz; while that file is missing, a procedural stand-in of
similar size (synthetic.py) is used and "head" says so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000.0, 3)


def _p95_ms(samples: list[float]) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000.0, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blender_addon.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--texture", type=int, default=1024, help="texture edge in pixels")
    parser.add_argument("--bundle", default=None, help="head bundle (default: assets/default_head.npz)")
    parser.add_argument("--png", action="append", default=[],
                        help="texture PNG(s) to apply instead of the generated Paeth-filtered ones (e.g. written "
                             "by the backend); repeat for several")
    args = parser.parse_args(argv)

    import bpy
    import numpy as np

    from . import bridge, controller, paths, pngfile, scene, synthetic

    bundle_path = Path(args.bundle) if args.bundle else paths.default_bundle_path()
    if bundle_path.is_file():
        bundle, head = scene.load_bundle(str(bundle_path)), str(bundle_path)
    else:
        bundle = synthetic.make_bundle(rings=64, segments=96, components=50, expressions=52)
        head = f"synthetic stand-in ({bundle_path} missing)"
    bpy.ops.wm.read_factory_settings(use_empty=True)
    obj = scene.build_head(bundle, texture_size=args.texture)
    names = scene.component_names(obj)
    indices = scene.key_indices(obj, names)
    image = scene.texture_image(obj)

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="sdshead-bench-"))
    size = args.texture
    pngs = []
    for i in range(4):  # a smooth base with noise, like a texture in the middle of a fit
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([0.6 + 0.2 * np.sin(6 * x + i), 0.45 + 0.2 * np.cos(5 * y), 0.4 + 0.1 * np.sin(9 * x * y)], -1)
        rgba = np.concatenate([np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1), np.ones((size, size, 1))], -1)
        pngs.append(str(pngfile.write_png(work / f"texture{i}.png", rgba.astype(np.float32).ravel(), size, size, 4)))
    if args.png:
        pngs = [str(Path(p).resolve()) for p in args.png]
    decode_seconds, decoded = [], []
    for p in pngs:
        started = time.perf_counter()
        decoded.append(pngfile.read_png(p))
        decode_seconds.append(time.perf_counter() - started)
    assert all(d is not None for d in decoded), "read_png could not decode the bench PNGs"

    ctl = controller.FitController()
    job = controller.Job(id="bench", object_name=obj.name, names=names, indices=indices, moves=[True] * len(names),
                         widen=True, image_name=image.name,
                         job_dir=work, stages=("shape", "texture"), started_at=time.monotonic())

    decoded_pixels = decoded

    def update(i: int, texture: bool, predecoded: bool = True) -> bridge.JobUpdate:
        weights = rng.normal(size=len(names)).clip(-3, 3).tolist()
        progress = {"id": "bench", "iteration": i, "total": 1000, "stage": "shape", "loss": 0.1, "t": 0.5,
                    "weights": weights, "seconds": 0.0}
        if not texture:
            return bridge.JobUpdate(job_id="bench", progress=progress, messages=1)
        k = i % len(pngs)
        message = {"id": "bench", "iteration": i, "path": pngs[k]}
        return bridge.JobUpdate(job_id="bench", progress=progress, texture=message,
                                texture_data=decoded_pixels[k] if predecoded else None, messages=2)

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    depsgraph = bpy.context.evaluated_depsgraph_get()
    ctl._apply(job, update(0, True))  # warm-up: first image load, first evaluation
    depsgraph.update()
    weights_only, weights_eval, with_texture, blender_decode = [], [], [], []
    for i in range(args.repeats):
        u = update(i, False)
        weights_only.append(timed(lambda: ctl._apply(job, u)))
        depsgraph.update()
        u = update(i, False)
        weights_eval.append(timed(lambda: (ctl._apply(job, u), depsgraph.update())))
        u = update(i, True)
        with_texture.append(timed(lambda: ctl._apply(job, u)))
        u = update(i + 1, True, predecoded=False)
        blender_decode.append(timed(lambda: ctl._apply(job, u)))
    result = {
        "apply_weights_ms": _median_ms(weights_only),
        "apply_weights_p95_ms": _p95_ms(weights_only),
        "apply_weights_eval_ms": _median_ms(weights_eval),
        "apply_texture_ms": _median_ms(with_texture),
        "apply_texture_p95_ms": _p95_ms(with_texture),
        "reader_decode_ms": _median_ms(decode_seconds),
        "apply_texture_blender_decode_ms": _median_ms(blender_decode),
        "keys": len(names), "vertices": len(obj.data.vertices), "texture": size, "repeats": args.repeats,
        "head": head, "blender": bpy.app.version_string,
        "texture_pngs": ("given: " + ", ".join(args.png)) if args.png else "generated, unfiltered rows as the backend writes",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
