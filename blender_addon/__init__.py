"""SDS Head: fit a morphable head's shape keys and UV texture to a text prompt (Blender add-on).

A thin bpy layer over a pure-Python bridge: the fit runs in a separate backend process
(`<backend python> -m sds_backend serve`), so Blender's Python never imports torch.
Blender 3.4+ reads `bl_info`; Blender 4.2+ can also install it as an extension
(blender_manifest.toml).

This file imports nothing from bpy at module level, so the plain-Python layers (`bridge`,
`paths` and the modules shared with the backend, see paths.py) can be imported and tested
without Blender; the bpy modules load in `register()`.
"""

bl_info = {
    "name": "SDS Head",
    "author": "SDS Head contributors",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "View3D > Sidebar > SDS Head",
    "description": "Fit a morphable head (shape keys + UV texture) to a text prompt with Score Distillation Sampling",
    "category": "Mesh",
}


def register() -> None:
    from . import registration

    registration.register()


def unregister() -> None:
    """Ends a running fit and the backend process before anything is unregistered."""
    from . import registration

    registration.unregister()
