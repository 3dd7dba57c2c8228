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
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

_FACE_CACHE: dict[int, tuple] = {}
_FACE_CACHE_SIZE = 8
_EMPTY_KEY = torch.iinfo(torch.int64).max
_LOW32 = 0xFFFFFFFF
COVERED_KEY_LIMIT = (0x3F800000 + 1) << 32   # keys of depth01 <= 1.0 (float bits 0x3F800000) lie below


@dataclass(frozen=True)
class Rasterization:
    """Result of `rasterize`, stored compactly over the P covered pixels.

    resolution  (H, W)
    batch       B
    pixels      int64 [P]     flat pixel index b*H*W + row*W + col, ascending
    triangles   int64 [P]     face index in [0, F) of the visible triangle
    bary        float [3, P]  perspective-correct barycentrics; differentiable in clip_verts
    depth       float [P]     NDC depth z/w of the visible surface (no gradient)
    zbuffer     int64 [B*H*W] or None: the z-buffer `rasterize` resolved visibility with (see
                `depth_keys`); kept so that per-pixel lookups need no dense arrays
    corners     int64 [3, P] or None: the visible triangles' corner vertices (`pixel_corners`
                of the rasterized faces), kept for interpolating over the same faces; see
                `corner_vertices`
    geometry    ScreenGeometry or None: the projection `rasterize` made, kept for `antialias`
                (None when faces were clipped at the near plane)
    """

    resolution: tuple[int, int]
    batch: int
    pixels: torch.Tensor
    triangles: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    zbuffer: torch.Tensor | None = None
    corners: torch.Tensor | None = None
    corners_key: tuple | None = field(default=None, repr=False)   # (faces, its _version, V)
    geometry: "ScreenGeometry | None" = None
    clip_key: tuple | None = field(default=None, repr=False)      # (clip_verts, its _version)

    def made_from(self, clip_verts: torch.Tensor, faces: torch.Tensor) -> bool:
        """True when clip_verts and faces are the very tensors `rasterize` checked and made
        this from, unchanged since: primitives given them again need not check them again."""
        return _unchanged(self.clip_key, clip_verts) and _unchanged(self.corners_key, faces)

    def corner_vertices(self, faces: torch.Tensor, attr_batch: int, num_vertices: int) -> torch.Tensor:
        """int64 [3, P]: `pixel_corners` of `faces` for attributes [attr_batch, num_vertices, C].

        The corners `rasterize` already gathered when `faces` is the very array it rasterized,
        unchanged since, and the attributes are laid out like its vertices; else gathered anew.
        """
        if (_unchanged(self.corners_key, faces) and self.corners_key[2] == num_vertices
                and attr_batch == self.batch):
            return self.corners
        return pixel_corners(faces, self.triangles, self.pixels, self.resolution[0] * self.resolution[1],
                             attr_batch, num_vertices)

    def depth_keys(self) -> torch.Tensor:
        """int64 [B*H*W]: per pixel, the float32 bits of (depth + 1) / 2 in the high 32 bits
        (so keys order like depths), and a key of at least COVERED_KEY_LIMIT where no triangle
        is visible. `decode_depth` turns keys back into depths."""
        if self.zbuffer is not None:
            return self.zbuffer
        keys = torch.full((self.num_pixels,), _EMPTY_KEY, dtype=torch.int64, device=self.pixels.device)
        return keys.index_copy_(0, self.pixels, encode_depth(self.depth))

    @property
    def num_pixels(self) -> int:
        return self.batch * self.resolution[0] * self.resolution[1]

    def triangle_id(self) -> torch.Tensor:
        """int64 [B, H, W]: visible face index, -1 where no triangle covers the pixel centre."""
        dense = torch.full((self.num_pixels,), -1, dtype=torch.int64, device=self.pixels.device)
        dense.index_copy_(0, self.pixels, self.triangles)
        return dense.view(self.batch, *self.resolution)

    def mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, H, W, 1]: 1 where a triangle covers the pixel centre, else 0 (no gradient)."""
        dense = torch.zeros(self.num_pixels, dtype=dtype, device=self.pixels.device)
        dense.index_fill_(0, self.pixels, 1)
        return dense.view(self.batch, *self.resolution, 1)

    def dense_depth(self) -> torch.Tensor:
        """float [B, H, W]: z/w of the visible surface, +inf where empty (no gradient)."""
        dense = torch.full((self.num_pixels,), float("inf"), dtype=self.depth.dtype, device=self.pixels.device)
        dense.index_copy_(0, self.pixels, self.depth)
        return dense.view(self.batch, *self.resolution)

    def dense_bary(self) -> torch.Tensor:
        """float [B, H, W, 3]: barycentrics (zero where empty); differentiable."""
        dense = self.bary.new_zeros(3, self.num_pixels).index_copy_(1, self.pixels, self.bary)
        return dense.t().reshape(self.batch, *self.resolution, 3)


def _unchanged(key: tuple | None, tensor: torch.Tensor) -> bool:
    """Whether key, (tensor, its _version, ...), was taken of this very tensor, not changed since."""
    return key is not None and key[0] is tensor and key[1] == tensor._version


@dataclass(frozen=True)
class ScreenGeometry:
    """Screen-space values `rasterize` computed for every vertex and face (no gradient).

    vertices   float [3, B*V]  pixel x, pixel y and NDC depth z/w of each vertex (meaningless
                               where w <= 0)
    face_area  float [B*F]     twice the signed pixel-space area of each face; negative for
                               faces counter-clockwise in NDC (front-facing)
    """

    vertices: torch.Tensor
    face_area: torch.Tensor


def check_mesh_inputs(clip_verts: torch.Tensor, faces: torch.Tensor) -> None:
    """Shared argument checks for primitives that take clip-space vertices and faces."""
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
    _, low, high = _face_tables(faces)
    if faces.numel() and (low < 0 or high >= num_vertices):
        raise ValueError(f"faces: indices must lie in [0, {num_vertices}), got range [{low}, {high}]")
    # amax propagates NaN and keeps inf, and NaN < inf is false: one reduction and one compare
    if clip_verts.numel() and not bool(clip_verts.detach().abs().amax() < math.inf):
        raise ValueError("clip_verts contains NaN or inf")


def signed_areas(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of triangles with corner coordinates x, y [3, N] -> [N]."""
    return (x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])


def corner_indices(faces: torch.Tensor, batch: int = 1, num_vertices: int = 0) -> torch.Tensor:
    """int64 [3, B*F]: row k holds corner k of every face of every batch item, as an index into
    the batch-flattened [B*V] vertex array (num_vertices = V; unused when batch is 1)."""
    corners = _face_tables(faces)[0]
    if batch == 1:
        return corners
    offset = torch.arange(batch, device=faces.device) * num_vertices
    return (corners[:, None, :] + offset[None, :, None]).reshape(3, -1)


def _face_tables(faces: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(corner rows int64 [3, F], smallest index, largest index) of a face array.

    A face array is usually a long-lived buffer rendered many times, so these are cached per
    tensor (invalidated by in-place changes): the corner rows are a transposing copy, which
    costs more than the gathers that use them, and the index range is two reductions.
    """
    key = id(faces)
    hit = _FACE_CACHE.get(key)
    if hit is not None and hit[0]() is faces and hit[1] == faces._version:
        return hit[2]
    corners = torch.stack(faces.to(torch.int64).unbind(1))                     # [3, F]
    tables = (corners, int(faces.min()), int(faces.max())) if faces.numel() else (corners, 0, -1)
    if len(_FACE_CACHE) >= _FACE_CACHE_SIZE:
        _FACE_CACHE.pop(next(iter(_FACE_CACHE)))
    _FACE_CACHE[key] = (weakref.ref(faces), faces._version, tables)
    return tables


def pixel_corners(faces: torch.Tensor, triangles: torch.Tensor, pixels: torch.Tensor, pixels_per_image: int,
                  batch: int, num_vertices: int) -> torch.Tensor:
    """int64 [3, P]: corner vertex indices (into the batch-flattened [B*V] vertex array) of the
    triangles seen at the covered pixels (a Rasterization's triangles and pixels). Three 1-D
    gathers: several times faster than one along axis 1."""
    corners = corner_indices(faces)
    out = corners.new_empty(3, triangles.shape[0])
    for k in range(3):
        torch.index_select(corners[k], 0, triangles, out=out[k])
    if batch > 1:
        out += (pixels // pixels_per_image) * num_vertices
    return out


def _check_resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if (len(resolution) != 2 or not all(isinstance(r, int) for r in resolution)
            or not all(0 < r <= 8192 for r in resolution)):
        raise ValueError(f"resolution: expected an int or (height, width) in 1..8192, got {resolution!r}")
    return int(resolution[0]), int(resolution[1])


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
        screen, tri_batch, tri_face, vertex_screen = _screen_triangles(clip_verts.detach(), faces, height, width)
        pixels, triangles, depth, zbuffer, area = _zbuffer(screen, tri_batch, tri_face, batch, height, width)
    corners = pixel_corners(faces, triangles, pixels, height * width, batch, num_vertices)
    bary = _barycentrics(clip_verts, corners, pixels, height, width)
    # screen triangles are the faces, in order, unless some were clipped at the near plane
    geometry = ScreenGeometry(vertex_screen, area) if vertex_screen is not None else None
    return Rasterization((height, width), batch, pixels, triangles, bary, depth, zbuffer, corners,
                         (faces, faces._version, num_vertices), geometry, (clip_verts, clip_verts._version))


def pixel_xy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, height: int, width: int):
    """Clip-space x, y, w -> pixel-unit x (right) and y (down), the image conventions above."""
    return (x / w + 1) * (0.5 * width), (1 - y / w) * (0.5 * height)


def _to_screen(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """clip [..., 4] -> [3, ...]: pixel-unit x (right), pixel-unit y (down), NDC depth z/w."""
    x, y, z, w = clip.unbind(-1)
    return torch.stack([*pixel_xy(x, y, w, height, width), z / w])


def _screen_triangles(clip_verts: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    """Screen-space corners of all triangles in front of the near plane (z >= -w).

    -> screen [3 (x, y, z), 3 (corner), N], batch [N], face [N], and the projected vertices
    [3, B*V] when no face needed clipping; then screen triangle n is face n % F of batch item
    n // F, and batch and face are None (not built: they would be two index arrays per render).
    Vertices are projected once and shared, so triangles that share an edge see identical
    corner coordinates. Triangles crossing the near plane are clipped into new triangles.
    """
    batch, num_vertices = clip_verts.shape[:2]
    num_faces = faces.shape[0]
    device = clip_verts.device
    flat = clip_verts.reshape(batch * num_vertices, 4)
    corner = corner_indices(faces, batch, num_vertices)                             # [3, B*F]
    near_dist = flat[:, 2] + flat[:, 3]                      # >= 0: in front of the near plane
    vertex_screen = _to_screen(flat, height, width)          # [3, B*V]; garbage where behind
    screen = vertex_screen.new_empty(3, corner.numel())
    for k in range(3):                                       # 1-D gathers: faster than along axis 1
        torch.index_select(vertex_screen[k], 0, corner.view(-1), out=screen[k])
    screen = screen.view(3, 3, -1)                           # [3, 3, B*F]
    if bool((near_dist >= 0).all()):
        return screen, None, None, vertex_screen
    num_behind = (near_dist.index_select(0, corner.reshape(-1)).view(3, -1) < 0).sum(0)
    if bool((num_behind == 0).all()):
        return screen, None, None, vertex_screen
    tri_batch = torch.arange(batch, device=device).repeat_interleave(num_faces)
    tri_face = torch.arange(num_faces, device=device).repeat(batch)
    keep = torch.nonzero(num_behind == 0).squeeze(1)
    crossing = torch.nonzero((num_behind == 1) | (num_behind == 2)).squeeze(1)
    tri_clip = flat[corner[:, crossing].t()]                 # [M, 3, 4]
    clipped, parent = _clip_near(tri_clip, tri_clip[..., 2] + tri_clip[..., 3])
    parent = crossing[parent]
    clipped_screen = _to_screen(clipped, height, width).permute(0, 2, 1)          # [3, 3, M']
    return (torch.cat([screen[:, :, keep], clipped_screen], 2),
            torch.cat([tri_batch[keep], tri_batch[parent]]), torch.cat([tri_face[keep], tri_face[parent]]), None)


def _clip_near(tri: torch.Tensor, dist: torch.Tensor):
    """Clip triangles [M, 3, 4] with one or two vertices behind the near plane (dist < 0).

    One vertex behind gives a quad (two triangles), two behind give one smaller triangle.
    Vertex order is rotated cyclically, so winding (and facing) is preserved.
    -> triangles [M', 3, 4], index of the source triangle [M'].
    """
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


def _zbuffer(screen, tri_batch, tri_face, batch, height, width):
    """Scanline visibility over screen triangles [3, 3, N] of batch items tri_batch [N] and faces
    tri_face [N] (both None: triangle n is face n % F of item n // F, see `_screen_triangles`).

    -> pixels [P], faces [P], depth [P], keys [B*H*W], signed areas of the triangles [N].
    """
    sx = screen[0]
    area = signed_areas(sx, screen[1])
    # degenerate or off-screen triangles (and w <= 0 from exotic matrices) get no rows
    live = (area != 0) & torch.isfinite(area) & (sx.amax(0) >= 0) & (sx.amin(0) <= width)
    zbuf = torch.full((batch * height * width,), _EMPTY_KEY, dtype=torch.int64, device=screen.device)
    tris = None if bool(live.all()) else torch.nonzero(live).squeeze(1)
    faces_per_item = screen.shape[2] // batch                # screen triangles per item when unclipped
    span_tri = _draw(screen, area, tris, tri_batch, faces_per_item, zbuf, height, width)
    covered = zbuf < COVERED_KEY_LIMIT
    pixels = torch.nonzero(covered).squeeze(1)
    won = zbuf.index_select(0, pixels)
    triangles = span_tri.index_select(0, won & _LOW32)
    if tri_face is not None:
        triangles = tri_face.index_select(0, triangles)
    elif batch > 1:
        triangles = triangles % faces_per_item
    return pixels, triangles, decode_depth(won, screen.dtype), zbuf, area


def encode_depth(depth: torch.Tensor) -> torch.Tensor:
    """NDC depths -> the high 32 bits of z-buffer keys: float32 bits of (depth + 1) / 2, which
    order like the depths for every depth >= -1. Depths beyond the far plane (and NaN) give keys
    at or above COVERED_KEY_LIMIT."""
    return ((depth.float() + 1) * 0.5).clamp_min(0).view(torch.int32).to(torch.int64) << 32


def decode_depth(keys: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NDC depths of z-buffer keys (see `Rasterization.depth_keys`); meaningless for keys at or
    above COVERED_KEY_LIMIT (no visible surface)."""
    return (keys >> 32).to(torch.int32).view(torch.float32).to(dtype) * 2 - 1


def _draw(screen, area, tris, tri_batch, faces_per_item, zbuf, height, width):
    """Scanline-convert the triangles `tris` (None: all) of screen [3, 3, N], with their signed
    areas [N] and batch items [N] (None: triangle n belongs to item n // faces_per_item), into
    zbuf (keys, amin).

    Fragment keys order by depth, then by span index, which follows triangle order, so exact
    depth ties go to the earlier triangle. -> the screen triangle of each span [S].
    """
    dtype = screen.dtype
    if tris is not None:
        screen, area = screen.index_select(2, tris), area.index_select(0, tris)
    sx, sy, sz = screen                                                      # each [3 corners, n]
    num_tris = sx.shape[1]
    # z/w is affine in screen space: z = z_origin + gx x + gy y
    ex1, ey1, ez1 = sx[1] - sx[0], sy[1] - sy[0], sz[1] - sz[0]
    ex2, ey2, ez2 = sx[2] - sx[0], sy[2] - sy[0], sz[2] - sz[0]
    gx = (ez1 * ey2 - ez2 * ey1) / area
    gy = (ex1 * ez2 - ex2 * ez1) / area
    z_origin = sz[0] - gx * sx[0] - gy * sy[0]

    xs, ys = _sort_corners_by_y(sx, sy)                                       # [3 (t, m, b), n]
    # rows whose centre y = j + 0.5 lies in [yt, yb): the upper part [yt, ym) and lower part [ym, yb)
    rows = torch.ceil(ys - 0.5).clamp(0, height).to(torch.int64)
    rows_per_half = (rows[1:] - rows[:2]).clamp_min(0)                           # [upper, lower]

    # Every edge is the line x = offset + y * slope, with both numbers computed from its upper
    # endpoint and slope in the same way in every triangle that shares it: neighbours agree bit
    # for bit on where a row crosses it, so no pixel falls between them. A half (upper or lower
    # part of a triangle) is bounded by the long edge t->b and one short edge, t->m or m->b.
    def line(xa, ya, xc, yc):
        slope = (xc - xa) / (yc - ya)           # inf/nan only on horizontal edges, which own no rows
        return xa - ya * slope, slope

    long_offset, long_slope = line(xs[0], ys[0], xs[2], ys[2])
    # short edges of all upper halves (t->m), then of all lower halves (m->b): consecutive rows
    short_offset, short_slope = line(xs[:2].reshape(-1), ys[:2].reshape(-1), xs[1:].reshape(-1), ys[1:].reshape(-1))
    # spans are listed triangle by triangle (upper half, then lower half);
    # `half` indexes the [upper halves, lower halves] arrays
    span_half, row_offset = _expand(torch.stack(rows_per_half.unbind(0), 1).view(-1))
    span_tri = span_half >> 1
    half = span_tri + (span_half & 1) * num_tris
    row = rows[:2].reshape(-1).index_select(0, half) + row_offset
    y = row.to(dtype) + 0.5

    def at_tri(t):
        return t.index_select(0, span_tri)

    x_long = at_tri(long_offset) + y * at_tri(long_slope)
    x_short = short_offset.index_select(0, half) + y * short_slope.index_select(0, half)
    col_start = torch.ceil(torch.minimum(x_long, x_short) - 0.5).clamp(0, width).to(torch.int64)
    col_end = torch.ceil(torch.maximum(x_long, x_short) - 0.5).clamp(0, width).to(torch.int64)

    # depth at the first pixel of each span, then one step of gx per pixel
    gx_s = at_tri(gx)
    z_first = at_tri(z_origin) + gx_s * (col_start.to(dtype) + 0.5) + at_tri(gy) * y
    if tris is not None:
        span_tri = tris.index_select(0, span_tri)
    base_pixel = row * width + col_start
    if zbuf.shape[0] > height * width:
        item = span_tri // faces_per_item if tri_batch is None else tri_batch.index_select(0, span_tri)
        base_pixel = base_pixel + item * (height * width)

    frag_span, step = _expand((col_end - col_start).clamp_min(0))
    if frag_span.numel() == 0:
        return span_tri
    if span_half.shape[0] > _LOW32:
        raise ValueError(f"too many triangle rows to rasterize in one call ({span_half.shape[0]}); split the batch")
    frag_pixel = base_pixel.index_select(0, frag_span) + step
    frag_z = z_first.index_select(0, frag_span) + gx_s.index_select(0, frag_span) * step.to(dtype)
    # depths beyond the far plane get keys above COVERED_KEY_LIMIT: no per-fragment select needed
    key = encode_depth(frag_z) | frag_span
    zbuf.scatter_reduce_(0, frag_pixel, key, reduce="amin", include_self=True)
    return span_tri


def _sort_corners_by_y(sx: torch.Tensor, sy: torch.Tensor):
    """Corners [3, N] reordered by y (ties by corner index). -> x [3, N], y [3, N], top row first.

    Ranks from three comparisons and a scatter: several times faster than sort along a
    leading axis of length three.
    """
    num = sx.shape[1]
    y0, y1, y2 = sy
    c01, c02, c12 = (y1 < y0).to(torch.int64), (y2 < y0).to(torch.int64), (y2 < y1).to(torch.int64)
    target = torch.stack([c01 + c02, 1 - c01 + c12, 2 - c02 - c12]) * num + torch.arange(num, device=sx.device)
    target = target.view(-1)
    xs = sx.new_empty(3 * num).scatter_(0, target, sx.reshape(-1))
    ys = sy.new_empty(3 * num).scatter_(0, target, sy.reshape(-1))
    return xs.view(3, num), ys.view(3, num)


def _expand(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-length expansion: counts [N] (>= 0) -> (owner [sum], position within its run [sum]).

    The owner of position p is the number of runs that end at or before p: a count of the run
    ends and its running sum, a third faster than repeat_interleave on CPU.
    """
    if counts.numel() == 0:
        return counts.new_empty(0), counts.new_empty(0)
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1])
    owner = torch.bincount(ends, minlength=total + 1)[:total].cumsum(0)
    return owner, torch.arange(total, device=counts.device) - (ends - counts).index_select(0, owner)


def _barycentrics(clip_verts, corners, pixels, height, width):
    """Perspective-correct barycentrics of the covered pixels, differentiable in clip_verts.

    With homogeneous 2D vertices v_i = (x_i, y_i, w_i) and the pixel p = (px, py, 1) in NDC,
    the point on the triangle seen through p is sum_i l_i v_i = w p, so l = w M^-1 p with
    M = [v0 v1 v2]: l_i is proportional to e_i = det[v_j, v_k, p] ((i, j, k) cyclic). Row
    operations turn that determinant into a 2D cross product of the corners relative to the
    pixel, e_i = d_j x d_k with d = (x - px w, y - py w) = w (NDC corner - p). It needs no
    division by w (exact for triangles that cross the near plane), and its terms are as small
    as the triangle, so float32 keeps its precision on sub-pixel triangles, where the expanded
    form c_i . p cancels terms of the size of the coordinates.
    """
    batch, num_vertices = clip_verts.shape[:2]
    if pixels.numel() == 0:
        return clip_verts.new_zeros(3, 0) + 0 * clip_verts.sum()  # stays in the graph: backward still works
    flat = clip_verts.reshape(batch * num_vertices, 4)
    rem = pixels % (height * width) if batch > 1 else pixels
    px = (rem % width).to(clip_verts.dtype).mul_(2 / width).add_(1 / width - 1)          # NDC x of the centre
    py = (rem // width).to(clip_verts.dtype).mul_(-2 / height).add_(1 - 1 / height)      # NDC y
    return _Barycentrics.apply(flat, corners, px, py)


class _Barycentrics(torch.autograd.Function):
    """l = e / sum(e), e_i = d_{i+1} x d_{i+2}, d = (x - px w, y - py w) at the corners [3, P].

    One autograd node with the backward written out (a dozen nodes otherwise). The corners
    are gathered with 1-D gathers of x, y and w: gathering along the second axis of a [9, F]
    table is several times slower, and so is its backward.
    """

    @staticmethod
    def forward(ctx, flat, corners, px, py):
        x, y, w = gather_columns(flat, corners.view(-1), (0, 1, 3)).view(3, 3, -1)
        dx, dy = x - px * w, y - py * w
        e = cross_rows(dx, dy)
        total = e.sum(0, keepdim=True)
        bary = e / total
        ctx.save_for_backward(corners, px, py, dx, dy, bary, total)
        ctx.table_shape = flat.shape
        return bary

    @staticmethod
    def backward(ctx, grad):
        corners, px, py, dx, dy, bary, total = ctx.saved_tensors
        grad_e = (grad - (grad * bary).sum(0, keepdim=True)) / total
        # e = dx x dy: de = ddx x dy + dx x ddy, so g_dx = dy x g_e and g_dy = g_e x dx
        grad_dx, grad_dy = cross_rows(dy, grad_e), cross_rows(grad_e, dx)
        grad_w = -(grad_dx * px + grad_dy * py)
        rows = (grad_dx.view(-1), grad_dy.view(-1), grad_w.view(-1))
        return scatter_columns(rows, corners.view(-1), (0, 1, 3), ctx.table_shape), None, None, None


def gather_columns(table: torch.Tensor, index: torch.Tensor, columns: tuple[int, ...]) -> torch.Tensor:
    """[len(columns), n]: row k is table[index, columns[k]] for a table [N, C] (no autograd).

    One 1-D gather per column, several times faster than gathering rows of a [N, C] table.
    The autograd nodes that use it scatter their gradients back with `scatter_columns`.
    """
    out = table.new_empty(len(columns), index.shape[0])
    for k, column in enumerate(columns):
        torch.index_select(table[:, column].contiguous(), 0, index, out=out[k])
    return out


def scatter_columns(rows, index: torch.Tensor, columns: tuple[int, ...], table_shape) -> torch.Tensor:
    """The adjoint of `gather_columns`: a zero table [N, C] with rows[k] added at [index, columns[k]]."""
    num_rows, num_columns = table_shape
    table = rows[0].new_zeros(num_columns, num_rows)                          # channel-first: rows are contiguous
    for row, column in zip(rows, columns):
        table[column].index_add_(0, index, row)
    return table.t()


def cross_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross product along axis 0 of [3, ...] tensors: row i is a_{i+1} b_{i+2} - a_{i+2} b_{i+1}.

    Row by row: a few elementwise passes, forward and backward; torch.linalg.cross over a
    leading axis is several times slower, and rolls of the rows copy each operand twice more.
    """
    a0, a1, a2 = a
    b0, b1, b2 = b
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])
