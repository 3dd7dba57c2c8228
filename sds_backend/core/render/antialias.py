"""Analytic silhouette antialiasing: the `antialias` primitive and its topology helper.

A point-sampled render is piecewise constant in the vertex positions, so a loss on it has no
gradient with respect to where silhouettes lie. `antialias` replaces the colour of each pixel
that a visible silhouette edge crosses by the box-filtered value along the scanline:

    value = in + f * (out - in)

where f is the fraction of the pixel (along the scanline) on the outer side of the edge.
This is continuous in the vertex positions, so its gradient is the true derivative of the
output and moves silhouette edges.

Unlike antialiasing between pairs of pixels (which looks for the silhouette edge among the
edges of the triangle that covers a pixel centre, and finds nothing when that triangle is
thinner than a pixel), silhouette edges here come from mesh topology: an edge between a
front- and a back-facing triangle, or a boundary edge. Each scanline crossing of such an
edge is found directly, whatever the size of the triangles around it. Edges steeper than
45 degrees are sampled along rows, flatter ones along columns, and edges near 45 degrees
blend both with weights that sum to one, so the choice never makes the output jump.

The work is split in three steps: `_silhouette_edges` and `_scanline_crossings` decide,
without gradients, which edges cross which pair of pixel centres; `_crossing_scale` then
recomputes the blend factor of each crossing from the clip-space vertices with autograd on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rasterize import Rasterization, check_mesh_inputs, expand_runs, face_corners, pixel_xy, signed_areas

_BLEND_BAND = (0.4, 0.6)  # fraction |dv| / (|du| + |dv|) over which the two scan directions blend


@dataclass(frozen=True)
class Topology:
    """Edge adjacency of a triangle mesh (see `prepare_topology`).

    edges     int64 [E, 2]  vertex indices, smaller first
    faces     int64 [E, 2]  the (up to) two faces on the edge; column 1 is -1 on boundary edges
    opposite  int64 [E, 2]  for each of those faces, its vertex not on the edge (-1 where no face)
    num_faces int           number of faces of the mesh this was built from
    """

    edges: torch.Tensor
    faces: torch.Tensor
    opposite: torch.Tensor
    num_faces: int


def prepare_topology(faces: torch.Tensor) -> Topology:
    """Edge adjacency for `antialias`; compute once per face array and reuse.

    faces  int [F, 3]. Edges shared by more than two faces (non-manifold) keep their first two.
    """
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected shape [F, 3], got {list(faces.shape)}")
    faces = faces.to(torch.int64)
    num_faces = faces.shape[0]
    device = faces.device
    start = faces.reshape(-1)                                       # half-edge k of face f: (f, k) -> (f, k+1)
    end = faces[:, [1, 2, 0]].reshape(-1)
    opposite = faces[:, [2, 0, 1]].reshape(-1)
    owner = torch.arange(num_faces, device=device).repeat_interleave(3)
    low, high = torch.minimum(start, end), torch.maximum(start, end)
    stride = int(faces.max()) + 1 if faces.numel() else 1
    key, order = (low * stride + high).sort(stable=True)
    unique_key, counts = torch.unique_consecutive(key, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    second = torch.where(counts > 1, first + 1, first)
    has_second = counts > 1
    edge_faces = torch.stack([owner[order[first]], torch.where(has_second, owner[order[second]], -1)], 1)
    edge_opposite = torch.stack([opposite[order[first]], torch.where(has_second, opposite[order[second]], -1)], 1)
    edges = torch.stack([unique_key // stride, unique_key % stride], 1)
    return Topology(edges, edge_faces, edge_opposite, num_faces)


def antialias(color: torch.Tensor, rast: Rasterization, clip_verts: torch.Tensor, faces: torch.Tensor,
              topology: Topology | None = None) -> torch.Tensor:
    """Blend colours across visible silhouette edges so that silhouettes carry gradients.

    color       float [B, H, W, C]  the point-sampled render (surface colour where covered,
                                    background elsewhere); gradients flow to it
    rast        Rasterization of clip_verts/faces at color's resolution
    clip_verts  float [B, V, 4]     the clip-space vertices given to `rasterize`; gradients flow to
                                    them through the silhouette edge positions
    faces       int [F, 3]          the faces given to `rasterize`
    topology    from `prepare_topology(faces)`; computed here when omitted (costly: keep it)
    ->          float [B, H, W, C]

    Faces are front-facing when counter-clockwise in NDC (glTF/OpenGL winding). Silhouette
    edges at the image border and crossings of surfaces that intersect without sharing an
    edge are not antialiased. Gradients are zero away from visible silhouette edges except
    for the pass-through of `color`.
    """
    check_mesh_inputs(clip_verts, faces)
    batch, height, width = rast.batch, *rast.resolution
    if color.ndim != 4 or tuple(color.shape[:3]) != (batch, height, width):
        raise ValueError(f"color: expected shape [{batch}, {height}, {width}, C] to match the rasterization, "
                         f"got {list(color.shape)}")
    if clip_verts.shape[0] != batch:
        raise ValueError(f"clip_verts batch {clip_verts.shape[0]} does not match the rasterization batch {batch}")
    topology = topology if topology is not None else prepare_topology(faces)
    if topology.num_faces != faces.shape[0]:
        raise ValueError(f"topology was built for {topology.num_faces} faces, got {faces.shape[0]}")
    edges = _silhouette_edges(clip_verts.detach(), faces, topology, height, width)
    crossings = _scanline_crossings(edges, rast) if edges is not None else None
    if crossings is None:
        return color
    scale = _crossing_scale(clip_verts, edges, crossings, height, width)                 # [K]
    channels = color.shape[-1]
    colors = color.permute(3, 0, 1, 2).reshape(channels, -1)                     # [C, B*H*W]
    difference = colors.index_select(1, crossings.out_pixel) - colors.index_select(1, crossings.in_pixel)  # [C, K]
    blended = colors.index_add(1, crossings.target, scale.to(colors.dtype) * difference)
    return blended.view(channels, batch, height, width).permute(1, 2, 3, 0)


@dataclass(frozen=True)
class _SilhouetteEdges:
    """M silhouette edges a -> c in screen space (no gradient); all fields [M].

    a, c              int64  the endpoints, as indices into the batch-flattened [B*V] vertices
    batch             int64  batch item
    x_a, y_a          float  pixel position of a; x_c, y_c that of c
    z_a, z_c          float  NDC depths of a and c
    x_cover, y_cover  float  pixel position of a vertex on the covered side of the edge: the
                             third corner of the front-facing face on it
    """

    a: torch.Tensor
    c: torch.Tensor
    batch: torch.Tensor
    x_a: torch.Tensor
    y_a: torch.Tensor
    x_c: torch.Tensor
    y_c: torch.Tensor
    z_a: torch.Tensor
    z_c: torch.Tensor
    x_cover: torch.Tensor
    y_cover: torch.Tensor


@torch.no_grad()
def _silhouette_edges(clip_verts, faces, topology: Topology, height: int, width: int) -> _SilhouetteEdges | None:
    """Edges between a front- and a back-facing face, and boundary edges, of every batch item,
    with both endpoints in front of the near plane; None when there is none."""
    batch, num_vertices = clip_verts.shape[:2]
    flat = clip_verts.reshape(batch * num_vertices, 4)
    x, y, z, w = flat.unbind(1)
    in_front = (z + w >= 0) & (w > 0)
    safe_w = torch.where(in_front, w, torch.ones_like(w))        # vertices behind project nowhere useful
    px, py = pixel_xy(x, y, safe_w, height, width)
    depth = z / safe_w
    corners = face_corners(faces, batch, num_vertices).reshape(-1)          # [3 * B*F]
    corner_x, corner_y = (t.index_select(0, corners).view(3, -1) for t in (px, py))
    # screen y points down, so counter-clockwise in NDC is negative signed area here
    front = (signed_areas(corner_x, corner_y) < 0).view(batch, -1)          # [B, F]

    face0, face1 = topology.faces.unbind(1)                                # [E]: face1 -1 on boundaries
    boundary = face1 < 0
    front0, front1 = front.index_select(1, face0), front.index_select(1, face1.clamp_min(0))   # [B, E]
    offset = (torch.arange(batch, device=flat.device) * num_vertices)[:, None]
    a_all, c_all = (t + offset for t in topology.edges.unbind(1))           # [B, E]: into the B*V vertices
    both_in_front = in_front.index_select(0, a_all.view(-1)) & in_front.index_select(0, c_all.view(-1))
    silhouette = (boundary | (front0 != front1)) & both_in_front.view(batch, -1)
    edge_batch, edge = torch.nonzero(silhouette, as_tuple=True)
    if edge.numel() == 0:
        return None
    # the covered side is where the front face lies (the only face on a boundary edge)
    second_is_front = ~boundary[edge] & front1[edge_batch, edge]
    cover = (torch.where(second_is_front, topology.opposite[edge, 1], topology.opposite[edge, 0])
             + offset[edge_batch, 0])
    a, c = a_all[edge_batch, edge], c_all[edge_batch, edge]
    return _SilhouetteEdges(a, c, edge_batch, px[a], py[a], px[c], py[c], depth[a], depth[c], px[cover], py[cover])


@dataclass(frozen=True)
class _Crossings:
    """K crossings of a silhouette edge with a scanline, each between two neighbouring pixel
    centres (no gradient); all fields [K].

    edge       int64  index into the _SilhouetteEdges
    column     bool   the scanline is a pixel column (u = y, v = x), else a row (u = x, v = y)
    line       int64  row or column index of the scanline: it lies at v = line + 0.5
    boundary   float  u of the border between the two pixels (cells of width 1 around the centres)
    sign       float  +1 when the covered side of the edge lies toward +u, else -1
    target     int64  the pixel whose colour the crossing corrects (flat index b*H*W + row*W + col)
    in_pixel   int64  of the two pixels, the one on the covered side
    out_pixel  int64  and the one on the other side
    """

    edge: torch.Tensor
    column: torch.Tensor
    line: torch.Tensor
    boundary: torch.Tensor
    sign: torch.Tensor
    target: torch.Tensor
    in_pixel: torch.Tensor
    out_pixel: torch.Tensor


@torch.no_grad()
def _scanline_crossings(edges: _SilhouetteEdges, rast: Rasterization) -> _Crossings | None:
    """Crossings of silhouette edges with the pixel-centre scanlines of both directions.

    Every edge is listed twice: once against rows (u = x, v = y: lines y = row + 0.5, cells
    along x) and once against columns (u = y, v = x). A crossing is kept when the pixel on its
    covered side is covered and the edge lies in front of whatever covers the other pixel; of
    several crossings of one pair of pixel centres in one direction, the front-most. None when
    no crossing is kept.
    """
    height, width = rast.resolution
    count = edges.a.shape[0]
    # the 2 * count (edge, direction) pairs: rows first, then columns
    column = torch.arange(2 * count, device=edges.a.device) >= count
    u_a, v_a = torch.cat([edges.x_a, edges.y_a]), torch.cat([edges.y_a, edges.x_a])
    u_c, v_c = torch.cat([edges.x_c, edges.y_c]), torch.cat([edges.y_c, edges.x_c])
    num_lines = torch.where(column, width, height)
    cells_per_line = torch.where(column, height, width)
    first = torch.minimum(torch.ceil(torch.minimum(v_a, v_c) - 0.5).clamp_min(0).to(torch.int64), num_lines)
    last = torch.minimum(torch.ceil(torch.maximum(v_a, v_c) - 0.5).clamp_min(0).to(torch.int64), num_lines)
    weight = _blend_weight(u_c - u_a, v_c - v_a)
    # a direction far from perpendicular to an edge has no weight there: no crossings
    counts = torch.where((weight > 0) & (cells_per_line >= 2), last - first, 0).clamp_min(0)
    owner, step = expand_runs(counts)
    if owner.numel() == 0:
        return None

    # one candidate crossing per (edge, direction, scanline)
    def per_candidate(values):               # per (edge, direction) -> per candidate
        return values.index_select(0, owner)

    line = per_candidate(first) + step
    column, num_cells = per_candidate(column), per_candidate(cells_per_line)
    edge = torch.where(column, owner - count, owner)
    u_a, v_a, u_c, v_c = (per_candidate(t) for t in (u_a, v_a, u_c, v_c))
    du, dv = u_c - u_a, v_c - v_a
    tau = (line.to(u_a.dtype) + 0.5 - v_a) / dv
    u_cross = u_a + tau * du                                          # where the edge meets the scanline
    cell = torch.floor(u_cross - 0.5).to(torch.int64)                # pixel centres cell+0.5 <= u < cell+1.5
    x_cover, y_cover = edges.x_cover.index_select(0, edge), edges.y_cover.index_select(0, edge)
    u_cover, v_cover = torch.where(column, y_cover, x_cover), torch.where(column, x_cover, y_cover)
    in_is_next = dv * ((u_cover - u_a) * dv - (v_cover - v_a) * du) > 0     # covered side lies toward +u
    # pixel index of cell k on the scanline: line_start + k * cell_stride
    line_start = edges.batch.index_select(0, edge) * (height * width) + line * torch.where(column, 1, width)
    cell_stride = torch.where(column, width, 1)
    inside = (cell >= 0) & (cell + 1 < num_cells)
    cell = torch.minimum(cell.clamp_min(0), (num_cells - 2).clamp_min(0))
    in_pixel = line_start + torch.where(in_is_next, cell + 1, cell) * cell_stride
    out_pixel = line_start + torch.where(in_is_next, cell, cell + 1) * cell_stride
    z_a, z_c = edges.z_a.index_select(0, edge), edges.z_c.index_select(0, edge)
    z_edge = z_a + tau * (z_c - z_a)
    depth = rast.dense_depth().view(-1)                               # +inf where nothing is visible
    visible = inside & torch.isfinite(depth.index_select(0, in_pixel)) & (depth.index_select(0, out_pixel) > z_edge)
    keep = torch.nonzero(visible).squeeze(1)
    if keep.numel() == 0:
        return None

    # one crossing per pair of pixel centres and direction: the front-most (stable sorts: by
    # depth, then by pair; the first of each pair's run)
    pair = (line_start + cell * cell_stride) * 2 + column.to(torch.int64)     # the pair's first pixel, direction
    keep = keep[torch.argsort(z_edge[keep], stable=True)]
    keep = keep[torch.argsort(pair[keep], stable=True)]
    _, run_length = torch.unique_consecutive(pair[keep], return_counts=True)
    keep = keep[torch.cumsum(run_length, 0) - run_length]

    boundary = (cell[keep] + 1).to(u_a.dtype)
    target = line_start[keep] + torch.where(u_cross[keep] >= boundary, cell[keep] + 1, cell[keep]) * cell_stride[keep]
    sign = torch.where(in_is_next[keep], 1.0, -1.0).to(u_a.dtype)
    return _Crossings(edge[keep], column[keep], line[keep], boundary, sign, target, in_pixel[keep], out_pixel[keep])


def _crossing_scale(clip_verts: torch.Tensor, edges: _SilhouetteEdges, crossings: _Crossings, height: int,
                    width: int) -> torch.Tensor:
    """Signed scale [K] of each crossing's correction, differentiable in clip_verts.

    scale = sign * offset * weight: offset = u_cross - boundary, where the edge a -> c meets
    the scanline v = line + 0.5 at u_cross = u_a + tau du, tau = (v - v_a) / dv (du, dv: the
    edge in the scan direction's (u, v) axes), and weight is that direction's blend weight.
    The expressions of `_scanline_crossings` on the same numbers, so the values agree with it
    bit for bit; here autograd records them, for the kept crossings only.
    """
    flat = clip_verts.reshape(-1, 4)
    x, y, _, w = flat.index_select(0, edges.a[crossings.edge]).unbind(1)       # clip coordinates of a, each [K]
    x_a, y_a = pixel_xy(x, y, w, height, width)
    x, y, _, w = flat.index_select(0, edges.c[crossings.edge]).unbind(1)       # and of c
    x_c, y_c = pixel_xy(x, y, w, height, width)
    column = crossings.column
    u_a, v_a = torch.where(column, y_a, x_a), torch.where(column, x_a, y_a)
    u_c, v_c = torch.where(column, y_c, x_c), torch.where(column, x_c, y_c)
    du, dv = u_c - u_a, v_c - v_a
    tau = (crossings.line.to(du.dtype) + 0.5 - v_a) / dv
    offset = u_a + tau * du - crossings.boundary
    return crossings.sign * offset * _blend_weight(du, dv)


def _blend_weight(du: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Weight of a scan direction for edges (du, dv) in its (u, v) axes.

    Steepness |dv| / (|du| + |dv|) is 1 for an edge perpendicular to the scanlines; the weight
    is a smoothstep of it over _BLEND_BAND, so the two directions' weights sum to one.
    """
    low, high = _BLEND_BAND
    steep = dv.abs()
    total = (du.abs() + steep).clamp_min(1e-12)          # bounded below for zero-length edges
    ramp = ((steep / total - low) / (high - low)).clamp(0, 1)
    return ramp * ramp * (3 - 2 * ramp)
