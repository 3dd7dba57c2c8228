"""Visibility and differentiable barycentrics: the `rasterize` primitive.

Visibility is a scanline rasterizer written with whole-tensor torch ops: every triangle is
cut into one span per pixel row it covers, spans are expanded into fragments, and a z-buffer
keeps the nearest fragment per pixel (one `scatter_reduce`). Work is proportional to the
covered area plus the number of (triangle, row) pairs, never to bounding boxes. Barycentrics
of the surviving pixels are then recomputed from the clip-space vertices with autograd on,
so gradients reach vertex positions through everything interpolated from them.

Conventions (shared by every primitive in this package):
    clip space      OpenGL: visible when -w <= x, y, z <= w; NDC = clip.xyz / w
    image           row 0 is the top of the image (NDC y = +1), column 0 the left (x = -1)
    pixel centres   NDC x = (2i + 1) / W - 1,  y = 1 - (2j + 1) / H
    coverage rule   a pixel centre on a shared edge belongs to exactly one triangle: spans
                    include their left end and top row, exclude their right end and bottom row

Gathers of large arrays in this package use `index_select` rather than indexing with a
tensor: on a 2-core CPU it is twice as fast (0.32 against 0.67 ms for 250k values), and its
backward, an `index_add`, twice as fast as the accumulating `index_put` of `x[index]`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A z-buffer key is one int64 per fragment, so that one `scatter_reduce(amin)` resolves
# visibility and ties together: the high 32 bits hold the depth (`_encode_depth`, ordered like
# the depth), the low 32 bits the index of the fragment's span (ordered like the triangles).
_SPAN_BITS = 32
_SPAN_MASK = (1 << _SPAN_BITS) - 1
_EMPTY_KEY = torch.iinfo(torch.int64).max
_COVERED_KEY_LIMIT = (0x3F800000 + 1) << _SPAN_BITS     # keys of depths <= 1 (float bits of 1.0) lie below


@dataclass(frozen=True)
class Rasterization:
    """Result of `rasterize`, stored compactly over the P covered pixels.

    resolution  (H, W)
    batch       B
    pixels      int64 [P]     flat pixel index b*H*W + row*W + col, ascending
    triangles   int64 [P]     face index in [0, F) of the visible triangle
    bary        float [3, P]  perspective-correct barycentrics; differentiable in clip_verts
    depth       float [P]     NDC depth z/w of the visible surface (no gradient)
    """

    resolution: tuple[int, int]
    batch: int
    pixels: torch.Tensor
    triangles: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def num_pixels(self) -> int:
        return self.batch * self.resolution[0] * self.resolution[1]

    def pixel_batch(self) -> torch.Tensor:
        """int64 [P]: the batch item of each covered pixel."""
        return self.pixels // (self.resolution[0] * self.resolution[1])

    def triangle_id(self) -> torch.Tensor:
        """int64 [B, H, W]: visible face index, -1 where no triangle covers the pixel centre."""
        dense = torch.full((self.num_pixels,), -1, dtype=torch.int64, device=self.pixels.device)
        dense[self.pixels] = self.triangles
        return dense.view(self.batch, *self.resolution)

    def mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, H, W, 1]: 1 where a triangle covers the pixel centre, else 0 (no gradient)."""
        dense = torch.zeros(self.num_pixels, dtype=dtype, device=self.pixels.device)
        dense[self.pixels] = 1
        return dense.view(self.batch, *self.resolution, 1)

    def dense_depth(self) -> torch.Tensor:
        """float [B, H, W]: z/w of the visible surface, +inf where empty (no gradient)."""
        dense = torch.full((self.num_pixels,), math.inf, dtype=self.depth.dtype, device=self.pixels.device)
        dense[self.pixels] = self.depth
        return dense.view(self.batch, *self.resolution)

    def dense_bary(self) -> torch.Tensor:
        """float [B, H, W, 3]: barycentrics (zero where empty); differentiable."""
        dense = self.bary.new_zeros(3, self.num_pixels).index_copy(1, self.pixels, self.bary)
        return dense.t().reshape(self.batch, *self.resolution, 3)


def check_mesh_inputs(clip_verts: torch.Tensor, faces: torch.Tensor) -> None:
    """Argument checks shared by the primitives that take clip-space vertices and faces."""
    if not isinstance(clip_verts, torch.Tensor) or not clip_verts.is_floating_point():
        raise TypeError(f"clip_verts: expected a float tensor [B, V, 4], got {type(clip_verts).__name__}"
                        f"{'' if not isinstance(clip_verts, torch.Tensor) else ' of dtype ' + str(clip_verts.dtype)}")
    if clip_verts.ndim != 3 or clip_verts.shape[-1] != 4:
        raise ValueError(f"clip_verts: expected shape [B, V, 4], got {list(clip_verts.shape)}")
    if not isinstance(faces, torch.Tensor) or faces.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"faces: expected an int32/int64 tensor [F, 3], got {getattr(faces, 'dtype', type(faces).__name__)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected shape [F, 3], got {list(faces.shape)}")
    if faces.device != clip_verts.device:
        raise ValueError(f"faces on {faces.device} but clip_verts on {clip_verts.device}; put both on one device")
    num_vertices = clip_verts.shape[1]
    if faces.numel():
        low, high = (int(t) for t in torch.aminmax(faces))
        if low < 0 or high >= num_vertices:
            raise ValueError(f"faces: indices must lie in [0, {num_vertices}), got range [{low}, {high}]")
    # amax propagates NaN and keeps inf, and NaN < inf is false: one reduction and one compare
    if clip_verts.numel() and not bool(clip_verts.detach().abs().amax() < math.inf):
        raise ValueError("clip_verts contains NaN or inf")


def _check_resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """`resolution` as (height, width), checked."""
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if (len(resolution) != 2 or not all(isinstance(r, int) for r in resolution)
            or not all(0 < r <= 8192 for r in resolution)):
        raise ValueError(f"resolution: expected an int or (height, width) in 1..8192, got {resolution!r}")
    return int(resolution[0]), int(resolution[1])


def face_corners(faces: torch.Tensor, batch: int = 1, num_vertices: int = 0) -> torch.Tensor:
    """int64 [3, B*F]: row k holds corner k of every face of every batch item, as an index into
    the batch-flattened [B*V] vertex array (num_vertices = V; unused when batch is 1)."""
    corners = faces.to(torch.int64).t()
    if batch == 1:
        return corners
    offset = torch.arange(batch, device=faces.device) * num_vertices
    return (corners[:, None, :] + offset[None, :, None]).reshape(3, -1)


def pixel_corners(faces: torch.Tensor, triangles: torch.Tensor, pixel_batch: torch.Tensor | None,
                  num_vertices: int) -> torch.Tensor:
    """int64 [3, P]: the corner vertices of faces[triangles], the triangles seen at P pixels.

    pixel_batch  int64 [P], the batch item of each pixel: the corners index a batch-flattened
                 [B*V] vertex array (num_vertices = V); None: they index one [V] array
    """
    corners = face_corners(faces)[:, triangles]
    if pixel_batch is not None:
        corners = corners + pixel_batch * num_vertices
    return corners


def pixel_xy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, height: int, width: int):
    """Clip-space x, y, w -> pixel-unit x (right) and y (down), the image conventions above."""
    return (x / w + 1) * (0.5 * width), (1 - y / w) * (0.5 * height)


def signed_areas(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of triangles with corner coordinates x, y [3, N] -> [N]."""
    return (x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])


def expand_runs(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-length expansion: counts [N] (>= 0) -> (owner [sum], position within its run [sum])."""
    owner = torch.repeat_interleave(counts)
    starts = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.shape[0], device=counts.device) - starts.index_select(0, owner)


def rasterize(clip_verts: torch.Tensor, faces: torch.Tensor, resolution: int | tuple[int, int]) -> Rasterization:
    """Rasterize triangles into a batch of images.

    clip_verts  float32/64 [B, V, 4]  clip-space positions (any device); gradients flow to them
                                      through `Rasterization.bary` only
    faces       int32/64 [F, 3]       vertex indices, shared by the whole batch
    resolution  int or (H, W)

    Triangles are clipped against the near plane (z >= -w), so parts behind the camera never
    show; fragments beyond the far plane (z > w) are dropped. Degenerate triangles cover no
    pixel. At exactly equal depths the face listed first wins (the parts of faces clipped at
    the near plane count after all unclipped faces). Visibility (which triangle, depth)
    carries no gradient: moving a silhouette is `antialias`'s job.
    """
    check_mesh_inputs(clip_verts, faces)
    height, width = _check_resolution(resolution)
    batch, num_vertices = clip_verts.shape[:2]
    with torch.no_grad():
        triangles = _screen_triangles(clip_verts.detach(), faces, height, width)
        pixels, visible_face, depth = _zbuffer(triangles, batch, height, width)
    pixel_batch = pixels // (height * width) if batch > 1 else None
    corners = pixel_corners(faces, visible_face, pixel_batch, num_vertices)
    bary = _barycentrics(clip_verts, corners, pixels, height, width)
    return Rasterization((height, width), batch, pixels, visible_face, bary, depth)


@dataclass(frozen=True)
class _ScreenTriangles:
    """N triangles in screen space (no gradient); corner k of triangle n is [k, n].

    x, y   float [3, N]  pixel-unit position, x right and y down
    z      float [3, N]  NDC depth z/w
    batch  int64 [N]     batch item of each triangle
    face   int64 [N]     face it was cut from
    """

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    batch: torch.Tensor
    face: torch.Tensor

    def select(self, index: torch.Tensor) -> "_ScreenTriangles":
        return _ScreenTriangles(self.x.index_select(1, index), self.y.index_select(1, index),
                                self.z.index_select(1, index), self.batch.index_select(0, index),
                                self.face.index_select(0, index))


def _screen_triangles(clip_verts: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> _ScreenTriangles:
    """Screen-space corners of all triangles in front of the near plane (z >= -w): the faces of
    every batch item (item by item, in face order) that lie wholly in front of it, then the
    pieces `_clip_near` cuts from those that cross it."""
    batch, num_vertices = clip_verts.shape[:2]
    num_faces = faces.shape[0]
    device = clip_verts.device
    flat = clip_verts.reshape(batch * num_vertices, 4)
    corners = face_corners(faces, batch, num_vertices).reshape(-1)                 # [3 * B*F]

    def at_corners(values):                  # per-vertex values [B*V] -> per face corner [3, B*F]
        return values.index_select(0, corners).view(3, -1)

    x, y, z = (at_corners(t) for t in _project(flat, height, width))
    triangles = _ScreenTriangles(x, y, z, torch.arange(batch, device=device).repeat_interleave(num_faces),
                                 torch.arange(num_faces, device=device).repeat(batch))
    corners_behind = at_corners(flat[:, 2] + flat[:, 3] < 0).sum(0)                # [B*F]
    if not bool(corners_behind.any()):
        return triangles
    whole = torch.nonzero(corners_behind == 0).squeeze(1)
    crossing = torch.nonzero((corners_behind == 1) | (corners_behind == 2)).squeeze(1)
    clipped, parent = _clip_near(flat[corners.view(3, -1)[:, crossing].t()])    # [M, 3, 4], [M]
    clipped_x, clipped_y, clipped_z = (t.t() for t in _project(clipped, height, width))   # each [3, M]
    parent = crossing[parent]
    kept = triangles.select(whole)
    return _ScreenTriangles(torch.cat([kept.x, clipped_x], 1), torch.cat([kept.y, clipped_y], 1),
                            torch.cat([kept.z, clipped_z], 1), torch.cat([kept.batch, triangles.batch[parent]]),
                            torch.cat([kept.face, triangles.face[parent]]))


def _project(clip: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """clip [..., 4] -> pixel-unit x (right), pixel-unit y (down), NDC depth z/w, each [...]."""
    x, y, z, w = clip.unbind(-1)
    return *pixel_xy(x, y, w, height, width), z / w


def _clip_near(tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip triangles [M, 3, 4] with one or two vertices behind the near plane (z + w < 0).

    One vertex behind gives a quad (two triangles), two behind give one smaller triangle.
    Vertex order is rotated cyclically, so winding (and facing) is preserved.
    -> triangles [M', 3, 4], index of the source triangle [M'].
    """
    dist = tri[..., 2] + tri[..., 3]                          # [M, 3]: >= 0 in front of the near plane
    behind = dist < 0
    one = behind.sum(1) == 1
    # rotate so that the odd vertex out (the lone behind / lone in-front vertex) comes first
    odd = torch.where(one[:, None], behind, ~behind).to(torch.int64).argmax(1)
    order = (odd[:, None] + torch.arange(3, device=tri.device)) % 3
    tri = torch.gather(tri, 1, order[:, :, None].expand(-1, -1, 4))
    dist = torch.gather(dist, 1, order)
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    p01 = v0 + (dist[:, :1] / (dist[:, :1] - dist[:, 1:2])) * (v1 - v0)
    p02 = v0 + (dist[:, :1] / (dist[:, :1] - dist[:, 2:3])) * (v2 - v0)
    index = torch.arange(tri.shape[0], device=tri.device)
    quad_a = torch.stack([p01, v1, v2], 1)[one]
    quad_b = torch.stack([p01, v2, p02], 1)[one]
    small = torch.stack([v0, p01, p02], 1)[~one]
    return (torch.cat([quad_a, quad_b, small]),
            torch.cat([index[one], index[one], index[~one]]))


def _zbuffer(triangles: _ScreenTriangles, batch: int, height: int, width: int):
    """Scanline visibility of screen triangles -> covered pixels [P] (ascending), the face seen
    at each [P] and its NDC depth [P].

    Fragment keys order by depth, then by span index, which follows triangle order, so exact
    depth ties go to the earlier triangle.
    """
    area = signed_areas(triangles.x, triangles.y)
    # degenerate or off-screen triangles (and w <= 0 from exotic matrices) get no rows
    live = (area != 0) & torch.isfinite(area) & (triangles.x.amax(0) >= 0) & (triangles.x.amin(0) <= width)
    live = torch.nonzero(live).squeeze(1)
    triangles, area = triangles.select(live), area.index_select(0, live)
    dtype = triangles.x.dtype

    # z/w is affine in screen space: z = z_origin + gx x + gy y
    sx, sy, sz = triangles.x, triangles.y, triangles.z
    ex1, ey1, ez1 = sx[1] - sx[0], sy[1] - sy[0], sz[1] - sz[0]
    ex2, ey2, ez2 = sx[2] - sx[0], sy[2] - sy[0], sz[2] - sz[0]
    gx = (ez1 * ey2 - ez2 * ey1) / area
    gy = (ex1 * ez2 - ex2 * ez1) / area
    z_origin = sz[0] - gx * sx[0] - gy * sy[0]

    xs, ys = _sort_corners_by_y(sx, sy)                                          # [3 (t, m, b), n]
    # the rows whose centre y = j + 0.5 lies in [yt, yb): from row_t to row_b - 1
    row_t, row_m, row_b = torch.ceil(ys - 0.5).clamp(0, height).to(torch.int64)   # each [n]

    # Every edge is the line x = offset + y * slope, with both numbers computed from its upper
    # endpoint and slope in the same way in every triangle that shares it: neighbours agree bit
    # for bit on where a row crosses it, so no pixel falls between them. A row above the middle
    # corner lies between the long edge t->b and the upper edge t->m, a row below it between
    # the long edge and the lower edge m->b.
    long_offset, long_slope = _edge_line(xs[0], ys[0], xs[2], ys[2])              # each [n]
    upper_offset, upper_slope = _edge_line(xs[0], ys[0], xs[1], ys[1])
    lower_offset, lower_slope = _edge_line(xs[1], ys[1], xs[2], ys[2])

    # spans: one per row of each triangle, triangle by triangle, top to bottom
    span_tri, row_in_tri = expand_runs(row_b - row_t)
    if span_tri.shape[0] > _SPAN_MASK:
        raise ValueError(f"too many triangle rows to rasterize in one call ({span_tri.shape[0]}); split the batch")

    def per_span(values):                    # per-triangle values -> per span, [S]
        return values.index_select(0, span_tri)

    row = per_span(row_t) + row_in_tri
    y = row.to(dtype) + 0.5
    lower = row >= per_span(row_m)
    x_long = per_span(long_offset) + y * per_span(long_slope)
    x_short = (torch.where(lower, per_span(lower_offset), per_span(upper_offset))
               + y * torch.where(lower, per_span(lower_slope), per_span(upper_slope)))
    col_start = torch.ceil(torch.minimum(x_long, x_short) - 0.5).clamp(0, width).to(torch.int64)
    col_end = torch.ceil(torch.maximum(x_long, x_short) - 0.5).clamp(0, width).to(torch.int64)
    # depth at the first pixel of each span, then one step of gx per pixel
    span_gx = per_span(gx)
    z_first = per_span(z_origin) + span_gx * (col_start.to(dtype) + 0.5) + per_span(gy) * y
    first_pixel = per_span(triangles.batch) * (height * width) + row * width + col_start

    # fragments: one per pixel of each span
    frag_span, step = expand_runs((col_end - col_start).clamp_min(0))
    frag_pixel = first_pixel.index_select(0, frag_span) + step
    frag_z = z_first.index_select(0, frag_span) + span_gx.index_select(0, frag_span) * step.to(dtype)
    # depths beyond the far plane get keys at or above _COVERED_KEY_LIMIT: no per-fragment select needed
    keys = torch.full((batch * height * width,), _EMPTY_KEY, dtype=torch.int64, device=frag_pixel.device)
    keys.scatter_reduce_(0, frag_pixel, _encode_depth(frag_z) | frag_span, reduce="amin", include_self=True)

    pixels = torch.nonzero(keys < _COVERED_KEY_LIMIT).squeeze(1)
    won = keys.index_select(0, pixels)
    visible_face = triangles.face.index_select(0, span_tri.index_select(0, won & _SPAN_MASK))
    return pixels, visible_face, _decode_depth(won, dtype)


def _sort_corners_by_y(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners [3, n] reordered top (t), middle (m), bottom (b) by y, ties in corner order.

    A bubble sort of the three rows (stable): 0.4 ms for 20k triangles on the 2-core CPU,
    where torch.sort along the axis of length 3 takes 1.3 ms (5.6 ms against 1.9 at 80k).
    """
    x, y = list(x), list(y)
    for i, j in ((0, 1), (1, 2), (0, 1)):
        swap = y[i] > y[j]
        x[i], x[j] = torch.where(swap, x[j], x[i]), torch.where(swap, x[i], x[j])
        y[i], y[j] = torch.where(swap, y[j], y[i]), torch.where(swap, y[i], y[j])
    return torch.stack(x), torch.stack(y)


def _edge_line(x_start, y_start, x_end, y_end):
    """The edge from (x_start, y_start) to (x_end, y_end) as x = offset + y * slope -> (offset, slope).
    inf/nan only on horizontal edges, which own no rows."""
    slope = (x_end - x_start) / (y_end - y_start)
    return x_start - y_start * slope, slope


def _encode_depth(depth: torch.Tensor) -> torch.Tensor:
    """NDC depths -> the high 32 bits of z-buffer keys: float32 bits of (depth + 1) / 2, which
    order like the depths for every depth >= -1. Depths beyond the far plane (and NaN) give keys
    at or above _COVERED_KEY_LIMIT."""
    return ((depth.float() + 1) * 0.5).clamp_min(0).view(torch.int32).to(torch.int64) << _SPAN_BITS


def _decode_depth(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NDC depths of z-buffer keys below _COVERED_KEY_LIMIT (see `_encode_depth`)."""
    return (keys >> _SPAN_BITS).to(torch.int32).view(torch.float32).to(dtype) * 2 - 1


def _barycentrics(clip_verts: torch.Tensor, corners: torch.Tensor, pixels: torch.Tensor, height: int,
                  width: int) -> torch.Tensor:
    """Perspective-correct barycentrics [3, P] of the covered pixels, differentiable in clip_verts.

    With homogeneous 2D vertices v_i = (x_i, y_i, w_i) and the pixel p = (px, py, 1) in NDC,
    the point on the triangle seen through p is sum_i l_i v_i = w p, so l = w M^-1 p with
    M = [v0 v1 v2]: l_i is proportional to e_i = det[v_j, v_k, p] ((i, j, k) cyclic). Row
    operations turn that determinant into a 2D cross product of the corners relative to the
    pixel, e_i = d_j x d_k with d = (x - px w, y - py w) = w (NDC corner - p). It needs no
    division by w (exact for triangles that cross the near plane), and its terms are as small
    as the triangle, so float32 keeps its precision on sub-pixel triangles, where the expanded
    form c_i . p cancels terms of the size of the coordinates.
    """
    pixel_in_image = pixels % (height * width)
    px = (pixel_in_image % width).to(clip_verts.dtype) * (2 / width) + (1 / width - 1)        # NDC x of the centre
    py = (pixel_in_image // width).to(clip_verts.dtype) * (-2 / height) + (1 - 1 / height)    # NDC y
    x, y, _, w = clip_verts.reshape(-1, 4).unbind(1)                                         # each [B*V]
    x, y, w = (t.index_select(0, corners.view(-1)).view(3, -1) for t in (x, y, w))          # each [3, P]
    # unbind, not dx[k]: one backward node per tensor rather than a zero-filled [3, P] per row
    dx, dy = (x - px * w).unbind(0), (y - py * w).unbind(0)                                   # each 3 x [P]
    e = torch.stack([dx[1] * dy[2] - dx[2] * dy[1],                                          # e_0 = d_1 x d_2
                     dx[2] * dy[0] - dx[0] * dy[2],                                          # e_1 = d_2 x d_0
                     dx[0] * dy[1] - dx[1] * dy[0]])                                         # e_2 = d_0 x d_1
    return e / e.sum(0, keepdim=True)
