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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rasterize import (COVERED_KEY_LIMIT, Rasterization, _expand, check_mesh_inputs, corner_indices, decode_depth,
                        gather_columns, pixel_xy, scatter_columns, signed_areas)

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
    # stored column by column, so that the columns `antialias` indexes with are contiguous
    return Topology(*(t.t().contiguous().t() for t in (edges, edge_faces, edge_opposite)), num_faces)


def antialias(color: torch.Tensor, rast: Rasterization, clip_verts: torch.Tensor, faces: torch.Tensor,
              topology: Topology | None = None) -> torch.Tensor:
    """Blend colours across visible silhouette edges so that silhouettes carry gradients.

    color       float [B, H, W, C]  the point-sampled render (surface colour where covered,
                                    background elsewhere); gradients flow to it
    rast        Rasterization of clip_verts/faces at color's resolution
    clip_verts  float [B, V, 4]     the clip-space vertices given to `rasterize`; gradients flow to
                                    them through the silhouette edge positions
    faces       int [F, 3]          the faces given to `rasterize`
    topology    from `prepare_topology(faces)`; computed here when omitted (costly: cache it)
    ->          float [B, H, W, C]

    Faces are front-facing when counter-clockwise in NDC (glTF/OpenGL winding). Silhouette
    edges at the image border and crossings of surfaces that intersect without sharing an
    edge are not antialiased. Gradients are zero away from visible silhouette edges except
    for the pass-through of `color`.
    """
    if not rast.made_from(clip_verts, faces):
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
    channels = color.shape[-1]
    colors = color.permute(3, 0, 1, 2).reshape(channels, -1)                     # [C, B*H*W]
    edges = _visible_side_edges(clip_verts, faces, topology, height, width, rast.geometry)
    if edges is None:
        return color
    screen, ends, batch_of_edge = edges
    found = _scanline_crossings(screen, batch_of_edge, height, width, rast.depth_keys(), rast.depth.dtype)
    if found is None:
        return color
    target, in_pixel, out_pixel, edge, column, crossing, edge_terms = found
    flat = clip_verts.reshape(batch * clip_verts.shape[1], 4)
    scale = _CrossingScale.apply(flat, ends.index_select(1, edge), column, crossing, edge_terms, (height, width))
    blended = _Blend.apply(colors, target, out_pixel, in_pixel, scale.to(colors.dtype))
    return blended.view(channels, batch, height, width).permute(1, 2, 3, 0)


class _Blend(torch.autograd.Function):
    """colors [C, N] + scale * (colors[:, out] - colors[:, in]) added at the target pixels.

    Written out so that the backward scatters the side gradients into its copy of the incoming
    gradient: autograd would fill a zero [C, N] buffer for them and add it, two more passes over
    the image.
    """

    @staticmethod
    def forward(ctx, colors, target, out_pixel, in_pixel, scale):
        difference = colors.index_select(1, out_pixel) - colors.index_select(1, in_pixel)      # [C, K]
        ctx.save_for_backward(target, out_pixel, in_pixel, scale, difference)
        return colors.index_add(1, target, scale * difference)

    @staticmethod
    def backward(ctx, grad):
        target, out_pixel, in_pixel, scale, difference = ctx.saved_tensors
        grad_at_target = grad.index_select(1, target)
        grad_scale = (grad_at_target * difference).sum(0) if ctx.needs_input_grad[4] else None
        grad_colors = None
        if ctx.needs_input_grad[0]:
            grad_colors = grad.clone(memory_format=torch.contiguous_format)
            side = grad_at_target * scale
            grad_colors.index_add_(1, out_pixel, side)
            grad_colors.index_add_(1, in_pixel, -side)
        return grad_colors, None, None, None, grad_scale


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] along axis 0 for an int64 index vector: index_select, which is several times
    faster than advanced indexing here, forward and backward."""
    return values.index_select(0, index)


@torch.no_grad()
def _visible_side_edges(clip_verts, faces, topology, height, width, geometry=None):
    """Silhouette edges of every batch item in screen space.

    -> screen [8, M]: x_a, y_a, x_c, y_c of the endpoints, their NDC depths z_a, z_c, and
       x_o, y_o of the vertex that marks the covered side; the endpoints a, c [2, M] as indices
       into the batch-flattened [B*V] vertices; batch index [M]. None when there is no
       silhouette edge. No gradients: `_CrossingScale` differentiates the endpoints.
    """
    batch, num_vertices = clip_verts.shape[:2]
    num_faces, num_edges = faces.shape[0], topology.edges.shape[0]
    device = clip_verts.device
    flat_d = clip_verts.detach().reshape(batch * num_vertices, 4)
    w = flat_d[:, 3]
    if geometry is not None:            # rasterize's projection; no face reaches behind the near plane
        xd, yd, z = geometry.vertices
        in_front = w > 0
        area = geometry.face_area
    else:
        in_front = (flat_d[:, 2] + w >= 0) & (w > 0)
        safe_w = torch.where(in_front, w, torch.ones_like(w))
        xd, yd = pixel_xy(flat_d[:, 0], flat_d[:, 1], safe_w, height, width)
        z = flat_d[:, 2] / safe_w
        corner = corner_indices(faces, batch, num_vertices)                         # [3, B*F]
        area = signed_areas(*(_at(t, corner.reshape(-1)).view(3, -1) for t in (xd, yd)))   # [B*F]
    # screen y points down, so counter-clockwise in NDC is negative signed area here
    front = (area < 0).view(batch, num_faces)
    face0, face1 = topology.faces[:, 0], topology.faces[:, 1]
    boundary = face1 < 0
    front0 = front.index_select(1, face0)
    front1 = front.index_select(1, face1.clamp_min(0))
    silhouette = boundary[None] | (front0 != front1)                             # [B, E]
    ends = topology.edges.t()                                   # [2, E]: contiguous (column-major storage)
    if batch > 1:
        offset = torch.arange(batch, device=device) * num_vertices
        ends = (ends[:, None, :] + offset[None, :, None]).reshape(2, -1)  # [2, B*E]
    silhouette &= (_at(in_front, ends[0]) & _at(in_front, ends[1])).view(batch, num_edges)
    edge_batch, edge = torch.nonzero(silhouette, as_tuple=True)
    if edge.numel() == 0:
        return None
    # the covered side is where the front face lies (the only face on a boundary edge)
    second_is_front = ~_at(boundary, edge) & _at(front1.reshape(-1), edge_batch * num_edges + edge)
    marker = torch.where(second_is_front, _at(topology.opposite[:, 1], edge), _at(topology.opposite[:, 0], edge))
    base = edge_batch * num_vertices
    a, c, o = _at(topology.edges[:, 0], edge) + base, _at(topology.edges[:, 1], edge) + base, marker + base
    screen = torch.stack([_at(xd, a), _at(yd, a), _at(xd, c), _at(yd, c), _at(z, a), _at(z, c),
                          _at(xd, o), _at(yd, o)])
    return screen, torch.stack([a, c]), edge_batch


@torch.no_grad()
def _scanline_crossings(screen, edge_batch, height, width, depth_keys, depth_dtype):
    """Crossings of silhouette edges with the pixel-centre scanlines of both directions.

    Every edge is listed twice: once against rows (u = x, v = y: lines y = row + 0.5, cells
    along x) and once against columns (u = y, v = x). For the visible, front-most crossing of
    each pair of neighbouring pixel centres -> the pixel to correct, the in-side and out-side
    pixels, the edge, whether it crosses a column, (sign, offset to the border between the two
    pixels, tau along the edge) [3, K] and its edge's (du, dv, weight, d weight / d steepness,
    |du| + |dv|) [5, K], the numbers `_CrossingScale` turns into the correction's scale; None
    when there is no such crossing.
    """
    count = edge_batch.shape[0]
    device = edge_batch.device
    x_a, y_a, x_c, y_c = screen[:4]
    ua, va = torch.cat([x_a, y_a]), torch.cat([y_a, x_a])
    uc, vc = torch.cat([x_c, y_c]), torch.cat([y_c, x_c])
    du, dv = uc - ua, vc - va
    is_column = torch.arange(2 * count, device=device) >= count
    lines = torch.where(is_column, width, height)                    # scanlines of the direction
    cells = torch.where(is_column, height, width)                    # pixel centres along one scanline
    first = torch.minimum(torch.ceil(torch.minimum(va, vc) - 0.5).clamp_min(0).to(torch.int64), lines)
    last = torch.minimum(torch.ceil(torch.maximum(va, vc) - 0.5).clamp_min(0).to(torch.int64), lines)
    weight, weight_slope, total = _blend_weight(du, dv)
    # a direction far from perpendicular to an edge has no weight there: no crossings
    counts = torch.where((weight > 0) & (cells >= 2), last - first, 0).clamp_min(0)
    owner, step = _expand(counts)
    if owner.numel() == 0:
        return None
    line = _at(first, owner) + step
    # per crossing: its direction, and the edge it belongs to
    column = owner >= count
    edge = torch.where(column, owner - count, owner)
    cells_o = torch.where(column, height, width)
    cell_stride_o = torch.where(column, width, 1)
    v_line = line.to(ua.dtype) + 0.5
    va_o, dv_o, ua_o, du_o = (_at(t, owner) for t in (va, dv, ua, du))
    tau = (v_line - va_o) / dv_o
    u_cross = ua_o + tau * du_o                                      # where the edge meets the scanline
    cell = torch.floor(u_cross - 0.5).to(torch.int64)               # pixel centres cell+0.5 <= u < cell+1.5
    sx_o, sy_o, z_a, z_c = (_at(screen[k], edge) for k in (6, 7, 4, 5))
    ou, ov = torch.where(column, sy_o, sx_o), torch.where(column, sx_o, sy_o)
    side = (ou - ua_o) * dv_o - (ov - va_o) * du_o
    in_is_next = dv_o * side > 0                                     # covered side lies toward +u
    line_base = _at(edge_batch, edge) * (height * width) + line * torch.where(column, 1, width)
    inside = (cell >= 0) & (cell + 1 < cells_o)
    cell_c = torch.minimum(cell.clamp_min(0), (cells_o - 2).clamp_min(0))
    in_pixel = line_base + torch.where(in_is_next, cell_c + 1, cell_c) * cell_stride_o
    out_pixel = line_base + torch.where(in_is_next, cell_c, cell_c + 1) * cell_stride_o
    z_edge = z_a + tau * (z_c - z_a)
    in_key, out_key = _at(depth_keys, in_pixel), _at(depth_keys, out_pixel)
    out_covered = out_key < COVERED_KEY_LIMIT
    visible = inside & (in_key < COVERED_KEY_LIMIT) & (
        ~out_covered | (decode_depth(out_key, depth_dtype) > z_edge))
    keep = torch.nonzero(visible).squeeze(1)
    if keep.numel() == 0:
        return None
    # one crossing per pair of pixel centres and direction: the front-most
    pair = _at(line_base + cell_c * cell_stride_o, keep) * 2 + _at(column, keep)
    z01 = ((_at(z_edge, keep).float() + 1) * 0.5).clamp(0, 1)
    order = ((pair << 32) | z01.view(torch.int32).to(torch.int64)).argsort()
    _, runs = torch.unique_consecutive(_at(pair, order), return_counts=True)
    keep = _at(keep, _at(order, torch.cumsum(runs, 0) - runs))
    sign = torch.where(_at(in_is_next, keep), 1.0, -1.0).to(ua.dtype)
    cell_k, stride_k = _at(cell_c, keep), _at(cell_stride_o, keep)
    offset = _at(u_cross, keep) - (cell_k + 1).to(ua.dtype)          # signed distance to the box boundary
    target = _at(line_base, keep) + torch.where(offset >= 0, cell_k + 1, cell_k) * stride_k
    edge_terms = torch.stack([du, dv, weight, weight_slope, total]).index_select(1, _at(owner, keep))
    return (target, _at(in_pixel, keep), _at(out_pixel, keep), _at(edge, keep), _at(column, keep),
            torch.stack([sign, offset, _at(tau, keep)]), edge_terms)


def _blend_weight(du: torch.Tensor, dv: torch.Tensor):
    """Weight of a scan direction for edges (du, dv) in its (u, v) axes.

    Steepness |dv| / (|du| + |dv|) is 1 for an edge perpendicular to the scanlines; the weight
    is a smoothstep of it over _BLEND_BAND, so the two directions' weights sum to one.
    -> weight, d weight / d steepness, |du| + |dv| (bounded below for zero-length edges).
    """
    low, high = _BLEND_BAND
    steep = dv.abs()
    total = (du.abs() + steep).clamp_min(1e-12)
    ramp = ((steep / total - low) / (high - low)).clamp(0, 1)
    return ramp * ramp * (3 - 2 * ramp), ramp * (1 - ramp) * (6 / (high - low)), total


class _CrossingScale(torch.autograd.Function):
    """Signed scale of each kept crossing's correction, with its derivative in the clip-space vertices.

    scale = sign * offset * weight: offset = u_cross - boundary, where the edge a -> c meets the
    scanline v at u_cross = u_a + tau du, tau = (v - v_a) / dv (du, dv: the edge in the scan
    direction's (u, v) axes), and weight is that direction's blend weight. `_scanline_crossings`
    computes these numbers from the vertices without autograd; this node returns the scale and
    writes out its backward, where autograd would record some forty nodes for them.
    """

    @staticmethod
    def forward(ctx, flat, ends, column, crossing, edge_terms, size):
        sign, offset, _ = crossing
        ctx.save_for_backward(flat, ends, column, crossing, edge_terms)
        ctx.size = size
        return sign * offset * edge_terms[2]

    @staticmethod
    def backward(ctx, grad):
        flat, ends, column, crossing, edge_terms = ctx.saved_tensors
        height, width = ctx.size
        sign, offset, tau = crossing
        du, dv, weight, weight_slope, total = edge_terms
        grad = grad * sign
        grad_offset = grad * weight
        # weight(steepness), steepness = |dv| / (|du| + |dv|): d/d|dv| = |du| / total², d/d|du| = -|dv| / total²
        grad_steep = grad * offset * weight_slope / (total * total)
        slope = du / dv
        along = grad_offset * tau
        # u_cross = u_a + tau du, tau = (v - v_a) / dv
        grad_du = along - grad_steep * dv.abs() * du.sign()
        grad_dv = grad_steep * du.abs() * dv.sign() - along * slope
        grad_u = torch.stack([grad_offset - grad_du, grad_du])                     # [a, c]
        grad_v = torch.stack([-grad_offset * slope - grad_dv, grad_dv])
        grad_px = torch.where(column, grad_v, grad_u).view(-1)
        grad_py = torch.where(column, grad_u, grad_v).view(-1)
        # px = (x / w + 1) W / 2, py = (1 - y / w) H / 2
        index = ends.reshape(-1)
        x, y, w = gather_columns(flat, index, (0, 1, 3))
        grad_x = grad_px * (0.5 * width) / w
        grad_y = grad_py * (-0.5 * height) / w
        grad_w = -(grad_x * x + grad_y * y) / w
        return scatter_columns((grad_x, grad_y, grad_w), index, (0, 1, 3), flat.shape), None, None, None, None, None
