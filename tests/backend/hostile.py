"""Hostile files, paths and values for the hostile-input suite (test_hostile_inputs.py).

Each maker writes into a folder and returns a path; each table row is (case id, value, the text
the error must contain). Values are finite but absurd, texts are invalid, files are of the wrong
kind or crafted to break a parser.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from sds_backend import fit_config


# --------------------------------------------------------------------------------- settings values
def config_cases() -> list[tuple[str, dict, str]]:
    """(id, --config object, expected text): three absurd values for every number of FitConfig."""
    cases = []
    for name, limits in fit_config.RANGES.items():
        pair = name in fit_config.PAIRS
        for label, value in (("1e308", 1e308), ("-1e308", -1e308), ("text", "7")):
            if label == "-1e308" and limits.low > -1 and not pair:
                value = limits.low - 1 if limits.integer else -1e308
            cases.append((f"{name}={label}", {name: [value, value] if pair else value}, f"config.{name}"))
    cases += [
        ("stages=colour", {"stages": ["colour"]}, "config.stages"),
        ("stages=empty", {"stages": []}, "config.stages"),
        ("stages=reversed", {"stages": ["texture", "shape"]}, "'shape' before 'texture'"),
        ("stages=twice", {"stages": ["shape", "shape"]}, "config.stages"),
        ("stages=object", {"stages": {"shape": 1}}, "config.stages"),
        ("weighting=cubic", {"weighting": "cubic"}, "config.weighting"),
        ("shading=list", {"shading": ["lambert"]}, "config.shading"),
        ("compile=yes", {"compile": "yes"}, "config.compile"),
        ("guidance_resolution=100", {"guidance_resolution": 100}, "multiple of 8"),
        ("t_min>t_max", {"t_min": 0.9, "t_max": 0.5}, "config.t_min"),
        ("yaw_range=reversed", {"yaw_range": [10, -10]}, "low <= high"),
        ("yaw_range=three", {"yaw_range": [1, 2, 3]}, "config.yaw_range"),
        ("seed=2**64", {"seed": 2 ** 64}, "config.seed"),
        ("unknown", {"no_such_knob": 1}, "unknown key(s) no_such_knob"),
    ]
    return cases


# ------------------------------------------------------------------------------------------ bundles
def small_arrays() -> dict:
    """A valid two-component bundle: an octahedron 20 cm across."""
    mean = np.array([[0.1, 0, 0], [-0.1, 0, 0], [0, 0.1, 0], [0, -0.1, 0], [0, 0, 0.1], [0, 0, -0.1]], np.float32)
    faces = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]], np.int32)
    rng = np.random.default_rng(0)
    return dict(mean=mean, basis=(rng.normal(size=(2, 6, 3)) * 0.01).astype(np.float32), names=np.array(["a", "b"]),
                faces=faces, uv=rng.uniform(size=(6, 2)).astype(np.float32), uv_faces=faces.copy())


def _npz(folder: Path, name: str, arrays: dict) -> Path:
    path = folder / name
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _changed(**changes) -> dict:
    arrays = small_arrays()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


def _zip_bomb(folder: Path) -> Path:
    """A valid small .npz whose central directory claims 3 GB once decompressed."""
    path = _npz(folder, "bomb.npz", small_arrays())
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")                    # the first central directory entry
    struct.pack_into("<I", data, at + 24, 3_000_000_000)
    path.write_bytes(bytes(data))
    return path


def _pickled_npz(folder: Path) -> Path:
    """An .npz whose 'names' member is a pickle that would create a file when unpickled."""
    marker = folder / "PICKLE_RAN"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = folder / "pickled.npz"
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([Payload()], dtype=object), allow_pickle=True)
    arrays = small_arrays()
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, value, allow_pickle=False)
            archive.writestr(f"{key}.npy", buffer.getvalue() if key == "names" else member.getvalue())
    return path


def _glb(document: dict, binary: bytes) -> bytes:
    text = json.dumps(document).encode()
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return (struct.pack("<III", 0x46546C67, 2, total) + struct.pack("<II", len(text), 0x4E4F534A) + text
            + struct.pack("<II", len(binary), 0x004E4942) + binary)


def _valid_glb() -> tuple[dict, bytes]:
    """A minimal valid GLB document (a triangle fan with one morph target) and its binary chunk."""
    arrays = small_arrays()
    positions, deltas = arrays["mean"], arrays["basis"][0]
    indices = arrays["faces"].astype(np.uint32).reshape(-1)
    binary = positions.tobytes() + deltas.tobytes() + indices.tobytes()
    views = [{"buffer": 0, "byteOffset": 0, "byteLength": positions.nbytes},
             {"buffer": 0, "byteOffset": positions.nbytes, "byteLength": deltas.nbytes},
             {"buffer": 0, "byteOffset": positions.nbytes + deltas.nbytes, "byteLength": indices.nbytes}]
    accessors = [{"bufferView": 0, "componentType": 5126, "count": 6, "type": "VEC3"},
                 {"bufferView": 1, "componentType": 5126, "count": 6, "type": "VEC3"},
                 {"bufferView": 2, "componentType": 5125, "count": len(indices), "type": "SCALAR"}]
    document = {"asset": {"version": "2.0"}, "buffers": [{"byteLength": len(binary)}], "bufferViews": views,
                "accessors": accessors,
                "meshes": [{"extras": {"targetNames": ["t0"]},
                            "primitives": [{"attributes": {"POSITION": 0}, "indices": 2, "targets": [{"POSITION": 1}]}]}]}
    return document, binary


def _glb_case(folder: Path, name: str, edit) -> Path:
    document, binary = _valid_glb()
    result = edit(document, binary)
    data = result if isinstance(result, bytes) else _glb(document, binary)
    path = folder / name
    path.write_bytes(data)
    return path


def _set(path: str, value):
    """An edit that sets document[path...] = value (path: dotted keys and list indices)."""
    def edit(document, binary):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target = document
        for key in parents:
            target = target[key]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return edit


_DELETE = object()


def _indices_from_view(view: int, count: int):
    """An edit that reads the indices from another buffer view (floats read as integers: huge)."""
    def edit(document, binary):
        document["accessors"][2].update(bufferView=view, count=count)
    return edit


def _special_files(folder: Path) -> None:
    (folder / "folder.npz").mkdir(exist_ok=True)
    if not (folder / "fifo.npz").exists():
        os.mkfifo(folder / "fifo.npz")
    if not (folder / "loop.npz").is_symlink():
        (folder / "loop.npz").symlink_to(folder / "loop.npz")
    if not (folder / "dangling.npz").is_symlink():
        (folder / "dangling.npz").symlink_to(folder / "nowhere.npz")
    (folder / "text.npz").write_text("mean,basis\n1,2\n")
    (folder / "empty.npz").write_bytes(b"")
    (folder / "notes.txt").write_text("a head")
    (folder / "truncated.npz").write_bytes(_npz(folder, "whole.npz", small_arrays()).read_bytes()[:300])
    (folder / "garbage.glb").write_bytes(b"glTF but not really")


def _file(name: str):
    return lambda folder: folder / name


_N = small_arrays()
# (id, maker(folder) -> path, text the error must contain)
BUNDLE_CASES = [
    ("missing", _file("absent.npz"), "not found"),
    ("folder", _file("folder.npz"), "is a folder"),
    ("fifo", _file("fifo.npz"), "FIFO"),
    ("dev-zero", lambda folder: Path("/dev/zero"), "character device"),
    ("symlink-loop", _file("loop.npz"), "symlink loop"),
    ("dangling-symlink", _file("dangling.npz"), "not found"),
    ("text-as-npz", _file("text.npz"), "cannot read the file as an .npz bundle"),
    ("empty-file", _file("empty.npz"), "cannot read the file as an .npz bundle"),
    ("truncated-zip", _file("truncated.npz"), "cannot read the file as an .npz bundle"),
    ("not-npz-or-glb", _file("notes.txt"), "neither .npz nor .glb"),
    ("zip-bomb", _zip_bomb, "once decompressed"),
    ("pickled-member", _pickled_npz, "cannot read the file as an .npz bundle"),
    ("missing-field", lambda f: _npz(f, "nofaces.npz", _changed(faces=None)), "missing required field(s): faces"),
    ("nan", lambda f: _npz(f, "nan.npz", _changed(mean=np.full((6, 3), np.nan, np.float32))), "NaN or inf"),
    ("float64-overflow", lambda f: _npz(f, "overflow.npz", _changed(basis=np.full((2, 6, 3), 1e300))), "NaN or inf"),
    ("one-point", lambda f: _npz(f, "point.npz", _changed(mean=np.zeros((6, 3), np.float32),
                                                          basis=np.zeros((2, 6, 3), np.float32))),
     "all vertices lie at one point"),
    ("zero-area", lambda f: _npz(f, "zeroarea.npz", _changed(faces=np.array([[0, 0, 1]] * 8, np.int32))),
     "every triangle has zero area"),
    ("km-head", lambda f: _npz(f, "huge.npz", _changed(mean=_N["mean"] * 1e6)), "across"),
    ("micro-head", lambda f: _npz(f, "tiny.npz", _changed(mean=_N["mean"] * 1e-6, basis=_N["basis"] * 1e-6)), "across"),
    ("far-away", lambda f: _npz(f, "far.npz", _changed(mean=_N["mean"] + 1e5)), "from the origin"),
    ("wild-component", lambda f: _npz(f, "wild.npz", _changed(basis=_N["basis"] * 1e4)), "moves a vertex by"),
    ("face-out-of-range", lambda f: _npz(f, "faces.npz", _changed(faces=_N["faces"] + 100)), "indexes outside"),
    ("faces-float", lambda f: _npz(f, "ffaces.npz", _changed(faces=_N["faces"].astype(np.float32))), "integer array"),
    ("int64-overflow", lambda f: _npz(f, "i64.npz", _changed(faces=_N["faces"].astype(np.int64) + 2 ** 40)),
     "int32 range"),
    ("names-bytes", lambda f: _npz(f, "bnames.npz", _changed(names=np.array([b"\xff\xfe", b"b"]))), "not UTF-8"),
    ("names-control", lambda f: _npz(f, "cnames.npz", _changed(names=np.array(["a\nb", "b"]))), "control character"),
    ("names-long", lambda f: _npz(f, "lnames.npz", _changed(names=np.array(["x" * 500, "b"]))), "characters"),
    ("names-duplicate", lambda f: _npz(f, "dnames.npz", _changed(names=np.array(["a", "a"]))), "duplicate names"),
    ("meta-nested", lambda f: _npz(f, "meta.npz", {**small_arrays(), "meta": np.array("[" * 100_000 + "]" * 100_000)}),
     "nested too deeply"),
    ("meta-huge", lambda f: _npz(f, "bigmeta.npz", {**small_arrays(), "meta": np.array("{}" + " " * 2_000_000)}),
     "characters, more than"),
    ("unknown-field", lambda f: _npz(f, "extra.npz", {**small_arrays(), "colour": np.zeros(3)}), "unknown field"),
    ("uv-outside", lambda f: _npz(f, "uv.npz", _changed(uv=np.full((6, 2), 7.0, np.float32))), "must lie in [0, 1]"),
    ("glb-garbage", _file("garbage.glb"), "not a binary glTF"),
    ("glb-version", lambda f: _glb_case(f, "v1.glb", lambda d, b: b"glTF" + struct.pack("<II", 1, 40) + b"\0" * 28),
     "version 1"),
    ("glb-chunk-past-end", lambda f: _glb_case(f, "chunk.glb", lambda d, b: _glb(d, b)[:-16]),
     "runs past the end of the file"),
    ("glb-json-nested", lambda f: _glb_case(f, "nested.glb", lambda d, b: b"glTF" + struct.pack("<II", 2, 200_020)
                                            + struct.pack("<II", 200_000, 0x4E4F534A) + b"[" * 100_000
                                            + b"]" * 100_000),
     "nested too deeply"),
    ("glb-no-meshes", lambda f: _glb_case(f, "nomesh.glb", _set("meshes", [])), "meshes[0]: missing"),
    ("glb-accessor-index", lambda f: _glb_case(f, "acc.glb", _set("meshes.0.primitives.0.attributes.POSITION", 99)),
     "accessor index 99"),
    ("glb-count-past-buffer", lambda f: _glb_case(f, "count.glb", _set("accessors.0.count", 10 ** 9)),
     "run past the end"),
    ("glb-negative-offset", lambda f: _glb_case(f, "neg.glb", _set("accessors.0.byteOffset", -8)),
     "negative or non-integer"),
    ("glb-sparse", lambda f: _glb_case(f, "sparse.glb", _set("accessors.1.sparse", {"count": 1})), "sparse"),
    ("glb-draco", lambda f: _glb_case(f, "draco.glb", _set("accessors.1.bufferView", _DELETE)), "Draco"),
    ("glb-external-buffer", lambda f: _glb_case(f, "uri.glb", _set("buffers.0.uri", "../../etc/passwd")),
     "outside the .glb"),
    ("glb-indices-float", lambda f: _glb_case(f, "fidx.glb", _set("accessors.2.componentType", 5126)),
     "three per triangle"),
    ("glb-indices-out-of-range", lambda f: _glb_case(f, "idx.glb", _indices_from_view(1, 18)), "point outside"),
    ("glb-lines", lambda f: _glb_case(f, "lines.glb", _set("meshes.0.primitives.0.mode", 1)), "mode 1"),
    ("glb-no-targets", lambda f: _glb_case(f, "notargets.glb", _set("meshes.0.primitives.0.targets", _DELETE)),
     "no morph targets"),
    ("glb-target-shape", lambda f: _glb_case(f, "tshape.glb", _set("accessors.1.count", 3)), "morph target 0"),
]


def bundle_cases(folder: Path) -> list[tuple[str, Path, str]]:
    """(id, path, expected text): BUNDLE_CASES made in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    _special_files(folder)
    return [(case, make(folder), expected) for case, make, expected in BUNDLE_CASES]


# --------------------------------------------------------------------------------- weights and JSON
# (id, content of a weights.json for a head with components a and b, text the error must contain)
WEIGHT_FILES = {
    "unknown-name": ('{"a": 1, "zz": 2}', "name(s) the head does not have: 'zz'"),
    "huge-value": ('{"a": 1e308}', "expected a number in [-1000, 1000]"),
    "overflow": ('{"a": 1e400}', "expected a number in [-1000, 1000]"),
    "nan-literal": ('{"a": NaN}', "non-finite number NaN"),
    "text-value": ('{"a": "1"}', "expected a number"),
    "bool-value": ('{"a": true}', "expected a number"),
    "list": ("[1, 2]", "expected an object of component name"),
    "nested": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "not-json": ("{a: 1}", "not valid JSON"),
    "not-utf8": (b'{"a": "\xff"}', "not UTF-8"),
    "long-int": ('{"a": ' + "9" * 5000 + "}", "cannot be read as JSON"),
    "too-big": (b" " * (2 << 20), "byte limit"),
}


def weights_file(folder: Path, case: str) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    content, expected = WEIGHT_FILES[case]
    path = folder / f"{case}.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path, expected


def crafted_pickle_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint.pt whose unpickling would create `marker`."""
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"version": 1, "payload": Payload()}))
    return path
