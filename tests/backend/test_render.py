"""Rasterizer correctness against a brute-force reference, gradients against finite differences,
and inverse rendering that must recover the parameters of a synthetic morphable model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meshes import perspective_clip, triangle_soup
from sds_backend.tools.procedural import uv_sphere
from reference_render import reference_rasterize
from sds_backend.tools.bench_raster import silhouette_gradient_error
from sds_backend.core.render import antialias, camera, interpolate, prepare_topology, rasterize, shading, texture


def _compare_with_reference(clip: torch.Tensor, faces: torch.Tensor, height: int, width: int):
    rast = rasterize(clip[None], faces, (height, width))
    ours = rast.triangle_id()[0].numpy()
    ref_tri, ref_depth, ref_bary = reference_rasterize(clip.numpy(), faces.numpy(), height, width)
    agree = ours == ref_tri
    both = agree & (ref_tri >= 0)
    depth_err = np.abs(rast.dense_depth()[0].numpy()[both] - ref_depth[both]).max(initial=0)
    bary_err = np.abs(rast.dense_bary()[0].detach().numpy()[both] - ref_bary[both]).max(initial=0)
    return agree.mean(), depth_err, bary_err, (ref_tri >= 0).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_triangles_match_reference(seed):
    # overlapping triangles, some crossing the near plane and some wholly behind the camera
    clip, faces = triangle_soup(400, torch.Generator().manual_seed(seed))
    agree, depth_err, bary_err, coverage = _compare_with_reference(clip, faces, 72, 96)
    assert coverage > 0.3
    assert agree >= 0.999
    assert depth_err <= 1e-4 and bary_err <= 1e-4


@pytest.mark.parametrize("n_lat,n_lon,resolution", [(23, 46, 96), (71, 142, 64)])
def test_sphere_matches_reference(n_lat, n_lon, resolution):
    vertices, faces = uv_sphere(n_lat, n_lon)
    cams = camera.orbit_cameras(torch.tensor([25.0]), torch.tensor([15.0]), 3.0, fov_deg=45)
    clip = cams.to_clip(vertices.float()).double()[0]
    agree, depth_err, bary_err, coverage = _compare_with_reference(clip, faces, resolution, resolution)
    assert coverage > 0.2
    assert agree >= 0.999
    assert depth_err <= 1e-4 and bary_err <= 1e-4


def test_closed_mesh_is_watertight():
    # every pixel centre inside the projected sphere is covered: shared edges leave no gaps
    vertices, faces = uv_sphere(40, 80)
    clip = perspective_clip(vertices * 0.8 + torch.tensor([0.0, 0.0, -3.0], dtype=torch.float64))
    rast = rasterize(clip[None], faces, 200)
    covered = rast.mask()[0, ..., 0].bool()
    # pixels well inside the silhouette (silhouette radius computed from the exact projection)
    ys, xs = torch.meshgrid(torch.arange(200), torch.arange(200), indexing="ij")
    ndc = torch.stack([(2 * xs + 1) / 200 - 1, 1 - (2 * ys + 1) / 200], -1).double()
    focal = 1 / math.tan(math.radians(30))
    radius = focal * 0.8 / math.sqrt(3.0 ** 2 - 0.8 ** 2)
    inner = ndc.norm(dim=-1) < radius * 0.95
    assert bool(covered[inner].all())


def test_empty_and_degenerate_inputs():
    clip = perspective_clip(torch.tensor([[0.0, 0.0, -2.0], [1.0, 0.0, -2.0], [2.0, 0.0, -2.0],   # collinear
                                          [0.0, 0.0, -2.0], [0.0, 0.0, -2.0], [0.0, 0.0, -2.0],   # a point
                                          [-1.0, -1.0, 3.0], [1.0, -1.0, 3.0], [0.0, 1.0, 3.0]],  # behind
                                         dtype=torch.float64))
    faces = torch.arange(9).reshape(3, 3)
    rast = rasterize(clip[None], faces, 32)
    assert rast.pixels.numel() == 0
    assert (rast.triangle_id() == -1).all()
    no_faces = rasterize(clip[None], torch.zeros(0, 3, dtype=torch.int64), 16)
    assert no_faces.pixels.numel() == 0
    image = interpolate(torch.ones(9, 2, dtype=torch.float64), rast, faces)
    assert image.shape == (1, 32, 32, 2) and bool((image == 0).all())


def test_equal_depths_go_to_the_face_listed_first():
    # two copies of one triangle, at exactly the same depth: every pixel shows the first listed,
    # whichever copy that is; corners sorted by y keep ties in corner order
    corners = torch.tensor([[-1.0, -0.8, -3.0], [1.2, -0.5, -3.0], [0.1, 1.0, -3.0]], dtype=torch.float64)
    clip = perspective_clip(torch.cat([corners, corners]))[None]
    for faces in (torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[3, 4, 5], [0, 1, 2]])):
        rast = rasterize(clip, faces, 32)
        assert rast.pixels.numel() > 100 and bool((rast.triangles == 0).all())
    from sds_backend.core.render.rasterize import _sort_corners_by_y

    y = torch.randint(0, 3, (3, 200), generator=torch.Generator().manual_seed(0)).double()
    x = torch.rand(3, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ys, order = torch.sort(y, dim=0, stable=True)
    assert all(torch.equal(a, b) for a, b in zip(_sort_corners_by_y(x, y), (x.gather(0, order), ys)))


def test_triangle_through_camera_plane_is_clipped():
    # one large triangle reaching behind the camera: only its in-front part shows, without NaN
    corners = torch.tensor([[-1.0, -0.5, -3.0], [1.0, -0.5, -3.0], [0.0, -0.5, 2.0]], dtype=torch.float64)
    clip = perspective_clip(corners)
    faces = torch.arange(3)[None]
    agree, depth_err, bary_err, coverage = _compare_with_reference(clip, faces, 64, 64)
    assert coverage > 0.05
    assert agree >= 0.999 and depth_err <= 1e-4 and bary_err <= 1e-4


def test_batch_and_bad_arguments():
    vertices, faces = uv_sphere(9, 18)
    cams = camera.orbit_cameras(torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]), 3.0)
    clip = cams.to_clip(vertices.float())
    rast = rasterize(clip, faces, (24, 40))
    single = rasterize(clip[1:], faces, (24, 40))
    assert torch.equal(rast.triangle_id()[1], single.triangle_id()[0])
    with pytest.raises(ValueError, match=r"clip_verts: expected shape \[B, V, 4\]"):
        rasterize(clip[..., :3], faces, 16)
    with pytest.raises(ValueError, match="faces: indices must lie in"):
        rasterize(clip, faces + 1000, 16)
    with pytest.raises(ValueError, match="NaN or inf"):
        rasterize(clip * float("nan"), faces, 16)
    with pytest.raises(ValueError, match="resolution"):
        rasterize(clip, faces, 0)
    # antialias checks its own arguments: other tensors than rasterize's, or its own changed in place
    color = torch.zeros(2, 24, 40, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        antialias(color, rast, clip * float("nan"), faces)
    with pytest.raises(ValueError, match="faces: indices must lie in"):
        antialias(color, rast, clip, faces + 1000)
    clip[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        antialias(color, rast, clip, faces)


def test_face_array_changed_in_place_is_seen():
    # nothing is cached per face tensor: an in-place edit is seen by the next call
    vertices, faces = uv_sphere(9, 18)
    cams = camera.orbit_cameras(torch.tensor([30.0]), torch.tensor([10.0]), 3.0)
    clip = cams.to_clip(vertices.float())
    before = rasterize(clip, faces, 48)
    faces.copy_(faces.flip(0))                                 # same faces, reversed order
    after = rasterize(clip, faces, 48)
    fresh = rasterize(clip, faces.clone(), 48)
    assert torch.equal(after.triangles, fresh.triangles)
    assert not torch.equal(after.triangles, before.triangles)
    assert torch.equal(interpolate(vertices.float(), after, faces), interpolate(vertices.float(), fresh, faces.clone()))
    faces[0, 0] = 10_000
    with pytest.raises(ValueError, match="faces: indices must lie in"):
        rasterize(clip, faces, 16)


def _mesh_clip(n_lat=9, n_lon=18):
    vertices, faces = uv_sphere(n_lat, n_lon)
    offset = torch.tensor([0.1, -0.05, -3.2], dtype=torch.float64)
    return perspective_clip(vertices + offset), faces


def test_interpolate_gradients_match_finite_differences():
    clip, faces = _mesh_clip(6, 12)
    attr = torch.randn(clip.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(1, 20, 20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rast_fixed = rasterize(clip[None], faces, 20)

    def through_attr(a):
        return (interpolate(a, rast_fixed, faces) * weights).sum()

    def through_positions(c):
        # visibility is piecewise constant; FD steps of 1e-6 do not change it for this mesh
        return (interpolate(attr, rasterize(c[None], faces, 20), faces) * weights).sum()

    assert torch.autograd.gradcheck(through_attr, (attr.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-3)
    assert torch.autograd.gradcheck(through_positions, (clip.clone().requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_texture_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(0)
    tex = torch.rand(1, 6, 5, 3, dtype=torch.float64, generator=gen)
    uv = 0.05 + 0.9 * torch.rand(1, 4, 4, 2, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda t, u: texture(t, u), (tex.requires_grad_(), uv.requires_grad_()),
                                    eps=1e-7, atol=1e-5, rtol=1e-3)


def test_texture_addresses_texel_centres():
    tex = torch.arange(12, dtype=torch.float64).reshape(1, 3, 4, 1)   # row 0 = top = v near 1
    uv = torch.tensor([[[[0.125, 1 - 1 / 6], [0.875, 1 / 6]]]], dtype=torch.float64)
    assert texture(tex, uv).flatten().tolist() == [0.0, 11.0]


def _sphere_coverage_setup(n_lat, n_lon, resolution):
    vertices, faces = uv_sphere(n_lat, n_lon)
    cams = camera.orbit_cameras(torch.tensor([20.0]), torch.tensor([10.0]), 3.6, fov_deg=40)
    cams = cams.map(torch.Tensor.double)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, resolution, dtype=torch.float64),
                            torch.linspace(0, 1, resolution, dtype=torch.float64), indexing="ij")
    pixel_weights = 1 + torch.sin(3 * xs + 1) * torch.cos(2 * ys) + 0.5 * xs
    gen = torch.Generator().manual_seed(1)
    affine = torch.randn(3, 3, generator=gen, dtype=torch.float64) * 0.3
    shift = torch.randn(3, generator=gen, dtype=torch.float64) * 0.3
    direction = vertices @ affine.T + shift + 0.2 * torch.sin(2 * vertices[:, [1, 2, 0]])
    return vertices, faces, cams, pixel_weights, direction


@pytest.mark.parametrize("num_faces", [2_000, 50_000], ids=["2k", "50k"])
def test_silhouette_gradient_matches_true_coverage(num_faces):
    # the same measurement `bench raster` reports as silhouette_grad_rel_err_*
    assert silhouette_gradient_error(num_faces) <= 0.05


def test_silhouette_gradient_matches_own_forward():
    # the antialiased image is continuous in the vertices, so its FD agrees with autograd
    vertices, faces, cams, pixel_weights, direction = _sphere_coverage_setup(23, 46, 64)
    topology = prepare_topology(faces)

    def loss(v):
        clip = cams.to_clip(v[None])
        rast = rasterize(clip, faces, 64)
        return (antialias(rast.mask(v.dtype), rast, clip, faces, topology)[0, ..., 0] * pixel_weights).sum()

    v = vertices.clone().requires_grad_(True)
    loss(v).backward()
    analytic = (v.grad * direction).sum().item()
    eps = 1e-4
    numeric = (loss(vertices + eps * direction) - loss(vertices - eps * direction)).item() / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-3)
    assert abs(analytic) > 1.0


def test_primitives_depend_only_on_their_arguments():
    # nothing is kept between calls: the same mesh object (Topology) gives identical results and
    # gradients every time, and the same as a topology antialias builds itself; interpolate uses
    # the face array it is given, even one of the rasterized array's shape
    clip, faces = _mesh_clip(17, 34)
    clip = clip[None].float().requires_grad_(True)
    topology = prepare_topology(faces)
    attr = torch.rand(clip.shape[1], 3, generator=torch.Generator().manual_seed(0))
    results = []
    for topo in (topology, topology, None):
        rast = rasterize(clip, faces, 40)
        color = interpolate(attr, rast, faces)
        smooth = antialias(color, rast, clip, faces, topo)
        (grad,) = torch.autograd.grad(smooth.square().sum(), clip)
        results.append((rast.triangles, rast.bary.detach(), color, smooth.detach(), grad))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert not torch.equal(results[0][3], results[0][2])          # silhouettes were blended
    shuffled = faces[torch.randperm(faces.shape[0], generator=torch.Generator().manual_seed(1))]
    triangle, bary = rast.triangle_id()[0], rast.dense_bary()[0].detach()
    expected = (attr[shuffled[triangle.clamp_min(0)]] * bary[..., None]).sum(-2) * rast.mask()[0]
    assert torch.allclose(interpolate(attr, rast, shuffled)[0], expected, atol=1e-6)


def test_antialias_gradients_match_finite_differences():
    # the written-out backward of the silhouette crossings, against finite differences of the
    # antialiased coverage in every clip coordinate (x, y, z, w) of every vertex; the crossing
    # set does not change for perturbations this small, so the output is smooth there
    vertices, faces, cams, pixel_weights, _ = _sphere_coverage_setup(7, 14, 24)
    clip = cams.to_clip(vertices[None]).detach()
    topology = prepare_topology(faces)

    def coverage(c):
        rast = rasterize(c, faces, 24)
        return antialias(rast.mask(c.dtype), rast, c, faces, topology)[0, ..., 0] * pixel_weights

    assert torch.autograd.gradcheck(coverage, (clip.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_antialias_without_silhouette_gradient_is_zero():
    # a point-sampled mask alone gives no gradient to positions; antialias is what adds it
    vertices, faces, cams, pixel_weights, _ = _sphere_coverage_setup(15, 30, 48)
    v = vertices.clone().requires_grad_(True)
    clip = cams.to_clip(v[None])
    rast = rasterize(clip, faces, 48)
    plain = (rast.mask(v.dtype)[0, ..., 0] * pixel_weights).sum()
    assert not plain.requires_grad
    smooth = (antialias(rast.mask(v.dtype), rast, clip, faces)[0, ..., 0] * pixel_weights).sum()
    (grad,) = torch.autograd.grad(smooth, v)
    assert grad.abs().sum() > 0
    # only vertices of silhouette edges receive gradient
    moved = (grad.abs().sum(1) > 0).sum().item()
    assert 0 < moved < vertices.shape[0] // 2


def test_antialias_occluding_contour_over_surface():
    # a small sphere in front of a large one: its outline over the big sphere is antialiased too
    small, small_faces = uv_sphere(15, 30)
    big, big_faces = uv_sphere(15, 30)
    vertices = torch.cat([small * 0.3 + torch.tensor([0.0, 0.0, -2.0], dtype=torch.float64),
                          big * 1.0 + torch.tensor([0.0, 0.0, -4.0], dtype=torch.float64)])
    faces = torch.cat([small_faces, big_faces + small.shape[0]])
    clip = perspective_clip(vertices)
    rast = rasterize(clip[None], faces, 64)
    colour = (rast.triangle_id()[0] < small_faces.shape[0]).double()[None, ..., None] * rast.mask(torch.float64)
    smooth = antialias(colour, rast, clip[None], faces)
    blended = (smooth > 0.01) & (smooth < 0.99)
    assert blended.sum() > 20     # the small sphere's outline, drawn over the big sphere


def test_topology_of_closed_and_open_meshes():
    vertices, faces = uv_sphere(9, 18)
    topo = prepare_topology(faces)
    assert topo.edges.shape[0] == faces.shape[0] * 3 // 2
    assert bool((topo.faces[:, 1] >= 0).all())
    open_topo = prepare_topology(faces[:-18])           # drop the bottom cap
    assert int((open_topo.faces[:, 1] < 0).sum()) == 18
    # the opposite vertex is the third corner of its face
    f, o = topo.faces[:, 0], topo.opposite[:, 0]
    assert bool(((faces[f] == o[:, None]).any(1)).all())
    assert not bool(((faces[f] == o[:, None]).sum(1) > 1).any())


def test_camera_conventions():
    cams = camera.orbit_cameras(torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]), 2.0, fov_deg=60, near=0.5, far=5.0)
    eye = torch.linalg.inv(cams.world_to_view)[:, :3, 3]
    assert torch.allclose(eye, torch.tensor([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]]), atol=1e-6)
    rotation = cams.world_to_view[:, :3, :3]
    assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6)
    # the target projects to the image centre; near and far planes map to NDC -1 and 1
    clip = cams.to_clip(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.5], [0.0, 0.0, -3.0]]))
    ndc = clip[..., :3] / clip[..., 3:]
    assert torch.allclose(ndc[0, 0, :2], torch.zeros(2), atol=1e-6)
    assert ndc[0, 1, 2].item() == pytest.approx(-1.0, abs=1e-5)
    assert ndc[0, 2, 2].item() == pytest.approx(1.0, abs=1e-5)
    # +y world is up in the image
    up = cams.to_clip(torch.tensor([[0.0, 0.5, 0.0]]))
    assert (up[0, 0, 1] / up[0, 0, 3]).item() > 0


def test_orbit_cameras_equal_look_at_from_their_eyes():
    generator = torch.Generator().manual_seed(0)
    yaw = torch.rand(64, generator=generator) * 720 - 360
    pitch = torch.cat([torch.rand(48, generator=generator) * 178 - 89, torch.rand(16, generator=generator) * 80 + 95])
    distance = torch.rand(64, generator=generator) * 3 + 1
    target = torch.tensor([0.1, -0.2, 0.3])
    cams = camera.orbit_cameras(yaw, pitch, distance, target)
    yaw_r, pitch_r = torch.deg2rad(yaw.double()), torch.deg2rad(pitch.double())
    offset = torch.stack([pitch_r.cos() * yaw_r.sin(), pitch_r.sin(), pitch_r.cos() * yaw_r.cos()], -1)
    eye = target.double() + distance.double()[:, None] * offset
    expected = camera.look_at(eye, target.double()).float()
    assert torch.allclose(cams.world_to_view, expected, atol=2e-6)
    # the sampler draws zoom, yaw and pitch from one stream, in ranges
    sampled = camera.OrbitSampler((-30.0, 10.0), (5.0, 15.0)).sample(200, 1.0, target, generator)
    assert -30 <= float(sampled.yaw_deg.min()) and float(sampled.yaw_deg.max()) <= 10
    assert 5 <= float(sampled.pitch_deg.min()) and float(sampled.pitch_deg.max()) <= 15


def test_vertex_normals_of_sphere_point_outward():
    vertices, faces = uv_sphere(12, 24)
    normals = shading.vertex_normals(vertices[None], faces)[0]
    assert torch.allclose(normals, vertices, atol=0.05)
    # the written-out backward against finite differences, on a bumpy batch of two (a coarser
    # sphere: gradcheck perturbs every coordinate)
    vertices, faces = uv_sphere(6, 12)
    bumpy = vertices.double() * (1 + 0.2 * torch.rand(2, vertices.shape[0], 1, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(0)))
    assert torch.autograd.gradcheck(lambda v: shading.vertex_normals(v, faces), (bumpy.requires_grad_(),),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def _synthetic_model(num_components: int = 20):
    """Sphere plus orthonormalised low-order polynomial displacements along the normal."""
    vertices, faces = uv_sphere(17, 34)
    x, y, z = vertices.unbind(1)
    monomials = [x, y, z, x * y, y * z, z * x, x * x - y * y, 3 * z * z - 1, x * y * z, x ** 3, y ** 3, z ** 3,
                 x * x * y, x * x * z, y * y * x, y * y * z, z * z * x, z * z * y, x ** 4 - z ** 4, y ** 4 - x ** 2]
    fields = torch.stack(monomials[:num_components], 1)
    fields, _ = torch.linalg.qr(fields - fields.mean(0))
    fields = fields / fields.abs().max(0).values * 0.08
    basis = fields.t()[:, :, None] * vertices[None]                 # [K, V, 3]
    return vertices, faces, basis


def test_lambert_render_of_a_sphere_matches_its_analytic_shading():
    # each pixel's ray meets the unit sphere where the normal is the hit point itself: the
    # exact Lambert image, lit from a camera-space direction, from cameras off every axis
    vertices, faces = uv_sphere(48, 96)
    cams = camera.orbit_cameras(torch.tensor([35.0, -120.0]), torch.tensor([20.0, -40.0]), 3.0, fov_deg=40)
    lights = torch.nn.functional.normalize(torch.tensor([[0.6, 0.5, 1.0], [-0.8, -0.2, 0.5]]), dim=-1)
    albedo, ambient, size = 0.7, 0.25, 96
    image = shading.render_mesh(vertices.float(), faces, cams, size, light_dir=lights, albedo=albedo,
                                ambient=ambient).image[..., 0].double()
    first = cams.map(lambda t: t[:1])
    alone = shading.render_mesh(vertices.float(), faces, first, size, light_dir=lights[:1], albedo=albedo, ambient=ambient)
    assert torch.allclose(alone.image[0, ..., 0].double(), image[0], atol=1e-6)     # one camera or a batch
    ndc = (torch.arange(size, dtype=torch.float64) * 2 + 1) / size - 1
    focal = 1 / math.tan(math.radians(20))
    rays = torch.stack(torch.broadcast_tensors(ndc[None, :] / focal, -ndc[:, None] / focal, -torch.ones(1, 1)), -1)
    rays = rays / rays.norm(dim=-1, keepdim=True)                          # view space, [H, W, 3]
    for b in range(2):
        centre = cams.world_to_view[b, :3, 3].double()                      # of the sphere, in view space
        along = rays @ centre
        discriminant = along ** 2 - centre.dot(centre) + 1
        hits = discriminant > 0.05                                          # clear of the silhouette
        normal = (along - discriminant.clamp_min(0).sqrt())[..., None] * rays - centre
        exact = albedo * (ambient + (1 - ambient) * (normal @ lights[b].double()).clamp_min(0))
        error = (image[b] - exact)[hits].abs()
        assert hits.sum() > 1500 and error.mean() < 2e-3 and error.max() < 0.02, (b, error.mean(), error.max())


def test_inverse_rendering_recovers_synthetic_weights():
    torch.manual_seed(0)
    vertices, faces, basis = _synthetic_model(20)
    vertices, basis = vertices.float(), basis.float()
    topology = prepare_topology(faces)
    target = (torch.rand(20, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    yaw = torch.arange(8) * 45.0
    pitch = torch.tensor([15.0, -15.0] * 4)
    cams = camera.orbit_cameras(yaw, pitch, 3.2, fov_deg=40)
    lights = torch.tensor([[0.5, 0.6, 1.0], [-0.6, 0.3, 1.0]] * 4)

    def render(weights):
        shape = vertices + torch.einsum("k,kvc->vc", weights, basis)
        out = shading.render_mesh(shape, faces, cams, 64, light_dir=lights, topology=topology)
        return torch.cat([out.image[..., :1], out.alpha], -1)

    with torch.no_grad():
        reference = render(target)
    weights = torch.zeros(20, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.08)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 120, eta_min=1e-3)
    for _ in range(120):
        optimizer.zero_grad()
        loss = ((render(weights) - reference) ** 2).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
    relative_error = ((weights.detach() - target).norm() / target.norm()).item()
    assert relative_error <= 0.05, relative_error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    vertices, faces = uv_sphere(40, 80)
    cams = camera.orbit_cameras(torch.tensor([25.0, -60.0]), torch.tensor([15.0, 0.0]), 3.0, fov_deg=45)
    results = []
    for device in ("cpu", "cuda"):
        v = vertices.float().to(device).requires_grad_(True)
        f = faces.to(device)
        cams_on = cams.map(lambda t: t.to(device))
        out = shading.render_mesh(v, f, cams_on, 96)
        out.image.sum().backward()
        results.append((out.image.detach().cpu(), v.grad.cpu()))
    (image_cpu, grad_cpu), (image_cuda, grad_cuda) = results
    assert (image_cpu - image_cuda).abs().max() < 1e-3
    assert torch.allclose(grad_cpu, grad_cuda, rtol=1e-2, atol=1e-3 * grad_cpu.abs().max())


@pytest.mark.parametrize("resolution", [(8, 1), (1, 8), (1, 1)])
def test_one_pixel_wide_images(resolution):
    vertices, faces = uv_sphere(9, 18)
    cams = camera.orbit_cameras(torch.tensor([10.0]), torch.tensor([5.0]), 2.5)
    v = vertices.float().requires_grad_(True)
    out = shading.render_mesh(v, faces, cams, resolution)
    assert out.image.shape == (1, *resolution, 3) and torch.isfinite(out.image).all()
    out.image.sum().backward()
    assert torch.isfinite(v.grad).all()


def test_float32_barycentrics_keep_their_precision_on_small_triangles():
    # 20k triangles at 256²: a few pixels each. Corner-relative cross products keep float32
    # within ~1e-4 of float64; expanding det[v_j, v_k, p] (terms the size of the coordinates)
    # loses about 5e-3 here.
    from sds_backend.tools.procedural import sphere_with_faces

    vertices, faces = sphere_with_faces(20_000, torch.float64)
    cams = camera.orbit_cameras(torch.tensor([20.0]), torch.tensor([10.0]), 3.6, fov_deg=40)
    clip64 = cams.to_clip(vertices.float()).double()
    rast64 = rasterize(clip64, faces, 256)
    rast32 = rasterize(clip64.float(), faces, 256)
    assert torch.equal(rast32.pixels, rast64.pixels) and torch.equal(rast32.triangles, rast64.triangles)
    assert (rast32.bary.double() - rast64.bary).abs().max() < 5e-4


def test_grey_render_matches_its_three_channel_composite():
    # Lambert renders antialias one grey channel and widen it; over a grey background that must
    # equal compositing the same colour as three channels, in the image and in the gradient
    from sds_backend.core.render.shading import _composite, _vertex_lambert

    vertices, faces = uv_sphere(15, 30)
    cams = camera.orbit_cameras(torch.tensor([30.0]), torch.tensor([10.0]), 3.0)
    topology = prepare_topology(faces)
    weights = torch.rand(1, 40, 40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = []
    for grey in (True, False):
        v = vertices.clone().requires_grad_(True)
        clip = cams.to_clip(v[None])
        rast = rasterize(clip, faces, 40)
        color = _vertex_lambert(v[None], faces, cams, rast, None, 0.25, 0.7)
        render = _composite(color if grey else color.expand(3, -1), rast, clip, faces, topology, 0.3, grey=grey)
        (render.image * weights).sum().backward()
        results.append((render.image.detach(), render.alpha.detach(), v.grad))
    (image_g, alpha_g, grad_g), (image_c, alpha_c, grad_c) = results
    assert image_g.shape == image_c.shape == (1, 40, 40, 3)
    assert torch.allclose(image_g, image_c, atol=1e-12) and torch.equal(alpha_g, alpha_c)
    assert 0 < ((image_c > 0.31) & (image_c < 0.69)).sum()        # lit pixels and blended edges exist
    assert torch.allclose(grad_g, grad_c, rtol=1e-9, atol=1e-12) and grad_g.abs().sum() > 0
