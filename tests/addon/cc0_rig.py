"""A user's rig from CC0 data, for the add-on's rig tests: run with the backend's Python.

    .venv/bin/python tests/addon/cc0_rig.py OUT.npz

Writes a bundle whose components are 20 MakeHuman/MPFB2 head targets as they ship (0..1 shape
keys of an artist's rig, not PCA components) on the default head's mesh, with the default head's
52 ARKit expressions. Exit code 2 when the CC0 source wheel is not in the local cache.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sds_backend import DEFAULT_BUNDLE, bundle
from sds_backend.tools import head_source, make_head

TARGETS = [("nose", "nose-base-up"), ("nose", "nose-compression-compress"), ("nose", "nose-curve-convex"),
           ("nose", "nose-width1-incr"), ("nose", "nose-hump-incr"), ("chin", "chin-height-incr"),
           ("chin", "chin-width-incr"), ("chin", "chin-prominent-incr"), ("chin", "chin-cleft-incr"),
           ("eyebrows", "eyebrows-trans-up"), ("eyebrows", "eyebrows-angle-up"), ("mouth", "mouth-scale-horiz-incr"),
           ("mouth", "mouth-lowerlip-volume-incr"), ("mouth", "mouth-upperlip-volume-incr"),
           ("forehead", "forehead-scale-vert-incr"), ("forehead", "forehead-temple-incr"),
           ("head", "head-scale-horiz-incr"), ("head", "head-scale-depth-incr"), ("head", "head-oval"),
           ("head", "head-fat-incr")]


def main(out: str) -> int:
    wheel = head_source.cached_wheel(head_source.default_cache_dir())
    if wheel is None:
        print(f"{head_source.WHEEL_FILENAME} is not cached; `python -m sds_backend make-head` fetches it", file=sys.stderr)
        return 2
    head = bundle.load(DEFAULT_BUNDLE)
    with head_source.MakeHumanWheel(wheel) as source:
        mesh = source.base_mesh()
        cut = make_head.cut_head(mesh)
        available = {folder: set(source.target_names(folder)) for folder, _ in TARGETS}
        chosen = [(folder, name) for folder, name in TARGETS if name in available[folder]]
        deltas = make_head.restrict_to_head([source.target(folder, name) for folder, name in chosen], cut,
                                            len(mesh.vertices))
    rig = bundle.Bundle.from_arrays(
        mean=head.mean, basis=deltas.astype(np.float32), names=np.array([name for _, name in chosen]),
        faces=head.faces, uv=head.uv, uv_faces=head.uv_faces, polygons=head.polygons, expr_basis=head.expr_basis,
        expr_names=np.array(head.expr_names), meta={"source": "MakeHuman/MPFB2 targets (CC0) on the default head"})
    bundle.save(rig, Path(out))
    print(len(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
