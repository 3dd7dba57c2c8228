"""The morphable-model bundle: round trip, vertices(weights), .glb import, and one rejection per malformed field
(more hostile files: test_hostile_inputs.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sds_backend import bundle
from sds_backend.bundle import Bundle, BundleError
from sds_backend.core.morphable import MorphableTensors


def _arrays(num_components: int = 4, expressions: bool = True) -> dict:
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(6, 3)).astype(np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3], [3, 4, 5], [1, 4, 5]], dtype=np.int32)
    arrays = dict(
        mean=mean,
        basis=rng.normal(size=(num_components, 6, 3)).astype(np.float32),
        names=np.array([f"pc{i:02d}" for i in range(num_components)]),
        faces=faces,
        uv=rng.uniform(size=(7, 2)).astype(np.float32),
        uv_faces=np.array([[0, 1, 2], [0, 2, 3], [3, 4, 5], [6, 4, 5]], dtype=np.int32),
        polygons=np.array([[0, 1, 2, 3], [3, 4, 5, -1], [1, 4, 5, -1]], dtype=np.int32),
        meta='{"source": "test"}',
    )
    if expressions:
        arrays["expr_basis"] = rng.normal(size=(2, 6, 3)).astype(np.float32)
        arrays["expr_names"] = np.array(["jawOpen", "eyeBlinkLeft"])
    return arrays


def test_round_trip_is_byte_reproducible(tmp_path):
    model = Bundle.from_arrays(**_arrays())
    bundle.save(model, tmp_path / "a.npz")
    bundle.save(model, tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert not list(tmp_path.glob(".*tmp"))
    loaded = bundle.load(tmp_path / "a.npz")
    assert loaded.names == model.names and loaded.expr_names == ("jawOpen", "eyeBlinkLeft")
    assert loaded.meta == {"source": "test"}
    np.testing.assert_array_equal(loaded.basis, model.basis)
    np.testing.assert_array_equal(loaded.polygons, model.polygons)


def test_vertices_is_mean_plus_weighted_basis_batched():
    model = Bundle.from_arrays(**_arrays())
    weights = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    vertices = MorphableTensors.from_bundle(model, dtype=torch.float64).vertices(weights)
    expected = model.mean[None] + np.einsum("bk,kvc->bvc", weights.numpy(), model.basis)
    assert vertices.shape == (2, 6, 3) and vertices.dtype == torch.float64
    np.testing.assert_allclose(vertices.numpy(), expected, rtol=1e-6, atol=1e-6)
    # differentiable in the weights, on the weights' device
    w = torch.zeros(4, requires_grad=True)
    MorphableTensors.from_bundle(model).vertices(w).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), model.basis.sum((1, 2)), rtol=1e-5)
    with pytest.raises(ValueError, match="weights: expected last dimension K=4"):
        MorphableTensors.from_bundle(model).vertices(torch.zeros(3))


def _corrupt(name, value):
    arrays = _arrays()
    if value is None:
        del arrays[name]
    else:
        arrays[name] = value
    return arrays


CORRUPTIONS = {
    "missing mean": (_corrupt("mean", None), "missing required field.*mean"),
    "mean wrong shape": (_corrupt("mean", np.zeros((6, 2), np.float32)), r"'mean' must have shape \[\?, 3\]"),
    "mean NaN": (_corrupt("mean", np.full((6, 3), np.nan, np.float32)), "'mean' contains NaN or inf"),
    "mean integer": (_corrupt("mean", np.zeros((6, 3), np.int32)), "'mean' must be a float array"),
    "no components": (_corrupt("basis", np.zeros((0, 6, 3), np.float32)), "no components"),
    "basis wrong V": (_corrupt("basis", np.zeros((4, 5, 3), np.float32)), r"'basis' must have shape \[\?, 6, 3\]"),
    "basis inf": (_corrupt("basis", np.full((4, 6, 3), np.inf, np.float32)), "'basis' contains NaN or inf"),
    "K != len(names)": (_corrupt("names", np.array(["a", "b", "c"])), "'names' has 3 entries but 'basis' has K=4"),
    "duplicate names": (_corrupt("names", np.array(["a", "a", "b", "c"])), "duplicate names: a"),
    "empty name": (_corrupt("names", np.array(["a", " ", "b", "c"])), "'names' contains an empty name"),
    "face index out of range": (_corrupt("faces", np.array([[0, 1, 9], [0, 2, 3], [3, 4, 5], [1, 4, 5]], np.int32)),
                                r"'faces' indexes outside \[0, 6\)"),
    "negative face index": (_corrupt("faces", np.array([[0, 1, -1], [0, 2, 3], [3, 4, 5], [1, 4, 5]], np.int32)),
                            r"'faces' indexes outside"),
    "faces float": (_corrupt("faces", np.zeros((4, 3), np.float32)), "'faces' must be an integer array"),
    "faces quads": (_corrupt("faces", np.zeros((4, 4), np.int32)), r"'faces' must have shape \[\?, 3\]"),
    "uv out of [0,1]": (_corrupt("uv", np.full((7, 2), 1.5, np.float32)), r"'uv' must lie in \[0, 1\]"),
    "uv_faces count": (_corrupt("uv_faces", np.zeros((3, 3), np.int32)), r"'uv_faces' must have shape \[4, 3\]"),
    "uv_faces out of range": (_corrupt("uv_faces", np.full((4, 3), 7, np.int32)), r"'uv_faces' indexes outside \[0, 7\)"),
    "polygons out of range": (_corrupt("polygons", np.array([[0, 1, 2, 99]], np.int32)), "'polygons' indexes outside"),
    "polygons bad padding": (_corrupt("polygons", np.array([[0, 1, 2, -5]], np.int32)), "pads triangles with -1 only"),
    "expr wrong V": (_corrupt("expr_basis", np.zeros((2, 5, 3), np.float32)), r"'expr_basis' must have shape"),
    "expr names count": (_corrupt("expr_names", np.array(["jawOpen"])), "'expr_names' has 1 entries but 'expr_basis' has E=2"),
    "meta not JSON": (_corrupt("meta", "{not json"), "'meta' is not valid JSON"),
    "unknown field": (dict(_arrays(), colour=np.zeros(3)), "unknown field.*colour"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_validate_rejects_malformed_bundle_naming_the_field(case, tmp_path):
    arrays, message = CORRUPTIONS[case]
    with pytest.raises(BundleError, match=message):
        Bundle.from_arrays(**arrays)
    # the same error through a file on disk, prefixed with the path
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in arrays.items()})
    with pytest.raises(BundleError, match=message):
        bundle.load(tmp_path / "bad.npz")


def test_unreadable_files(tmp_path):
    with pytest.raises(BundleError, match="bundle: .*nope.npz not found"):
        bundle.load(tmp_path / "nope.npz")
    for junk in (b"not a zip", b"PK\x03\x04 a broken zip"):
        (tmp_path / "junk.npz").write_bytes(junk)
        with pytest.raises(BundleError, match="cannot read the file as an .npz bundle"):
            bundle.load(tmp_path / "junk.npz")


def test_glb_round_trip_rebuilds_the_model(tmp_path):
    from sds_backend.core.export import write_glb
    from synthetic import synthetic_model

    model = synthetic_model(5)
    weights = np.linspace(-1, 1, 5).astype(np.float32)
    write_glb(tmp_path / "head.glb", model, weights)
    imported = bundle.load(tmp_path / "head.glb")
    assert imported.names == model.names
    # the exporter split vertices at UV seams; the importer welds them back
    assert imported.num_vertices == model.num_vertices
    assert imported.faces.shape == model.faces.shape
    w = torch.tensor(weights)
    ours = MorphableTensors.from_bundle(model).vertices(w).numpy()[model.faces]
    theirs = MorphableTensors.from_bundle(imported).vertices(w).numpy()[imported.faces]
    np.testing.assert_allclose(theirs, ours, atol=1e-6)
    np.testing.assert_allclose(imported.uv[imported.uv_faces], model.uv[model.uv_faces], atol=1e-6)


def test_glb_without_morph_targets_is_refused(tmp_path):
    from sds_backend.core.export import glb_bytes
    from synthetic import synthetic_model

    data = glb_bytes(synthetic_model(3), np.zeros(3, np.float32))
    # same file with the targets removed from the JSON chunk
    import json
    import struct

    length = struct.unpack_from("<I", data, 12)[0]
    document = json.loads(data[20:20 + length])
    del document["meshes"][0]["primitives"][0]["targets"]
    text = json.dumps(document).encode()
    text += b" " * (-len(text) % 4)
    rest = data[20 + length:]
    (tmp_path / "plain.glb").write_bytes(struct.pack("<III", 0x46546C67, 2, 20 + len(text) + len(rest))
                                         + struct.pack("<II", len(text), 0x4E4F534A) + text + rest)
    with pytest.raises(BundleError, match="no morph targets"):
        bundle.load(tmp_path / "plain.glb")
    (tmp_path / "fake.glb").write_bytes(b"not a glb at all")
    with pytest.raises(BundleError, match="not a binary glTF"):
        bundle.load(tmp_path / "fake.glb")
