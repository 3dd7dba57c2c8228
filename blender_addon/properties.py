"""Panel properties: fit settings per scene (saved with the file) and the run status (per session).

`scene.sdshead` holds what the user types (prompt, steps, ...). `window_manager.sdshead_status`
mirrors controller.Status for drawing; it is not saved and takes no part in undo.
"""
from __future__ import annotations

import bpy
from bpy.props import BoolProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from . import controller


class SDSHEAD_PG_settings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What the head should look like", default="")
    negative_prompt: StringProperty(name="Negative", description="What the head should not look like", default="")
    stage_shape: BoolProperty(name="Shape", description="Fit the shape-key weights", default=True)
    stage_texture: BoolProperty(name="Texture", description="Fit the UV texture (after the shape)", default=False)
    shape_steps: IntProperty(name="Steps", description="Iterations of the shape stage", default=200, min=1, soft_max=2000)
    texture_steps: IntProperty(name="Texture Steps", description="Iterations of the texture stage", default=400,
                               min=1, soft_max=4000)
    seed: IntProperty(name="Seed", description="Random seed: same seed, same result", default=0, min=0)
    guidance_scale: FloatProperty(name="Guidance", description="Classifier-free guidance scale", default=100.0,
                                  min=1.0, soft_max=200.0)
    lr: FloatProperty(name="Learning Rate", description="Adam step size for the weights", default=0.05, min=1e-5,
                      soft_max=0.5, precision=4)
    texture_lr: FloatProperty(name="Texture Rate", description="Adam step size for the texture", default=0.05,
                              min=1e-5, soft_max=0.5, precision=4)
    l2_weight: FloatProperty(name="Regularisation", description="L2 penalty on the weights (keeps the head plausible)",
                             default=1e-3, min=0.0, soft_max=0.1, precision=4)
    weight_clamp: FloatProperty(name="Weight Clamp", description="Weights stay within +-this many standard deviations",
                                default=3.0, min=0.1, max=10.0)
    render_size: IntProperty(name="Render Size", description="Pixel size of the renders fed to the diffusion model",
                             default=256, min=32, max=1024)
    texture_size: IntProperty(name="Texture Size", description="Pixel size of the fitted UV texture", default=512,
                              min=16, max=4096)
    event_every: IntProperty(name="Update Every", description="Send the weights to Blender every N iterations",
                             default=5, min=1, max=1000)
    texture_every: IntProperty(name="Texture Every", description="Send the texture to Blender every N iterations",
                               default=20, min=1, max=1000)


class SDSHEAD_PG_status(bpy.types.PropertyGroup):
    state: StringProperty(name="State", default="idle")
    message: StringProperty(name="Message", default="")
    stage: StringProperty(name="Stage", default="")
    iteration: IntProperty(name="Iteration", default=0)
    total: IntProperty(name="Total", default=0)
    loss: StringProperty(name="Loss", default="")
    progress: FloatProperty(name="Progress", subtype="PERCENTAGE", min=0.0, max=100.0, default=0.0, precision=0)
    last_error: StringProperty(name="Last Error", default="")
    backend: StringProperty(name="Backend", default="Backend: not started")
    doctor_text: StringProperty(name="Backend Check", default="")
    doctor_state: StringProperty(name="Backend Check State", default="")   # '' | running | ok | failed


def fit_inputs(settings: SDSHEAD_PG_settings, model: str) -> controller.FitInputs:
    """The panel's settings as the service's input."""
    stages = tuple(s for s, on in (("shape", settings.stage_shape), ("texture", settings.stage_texture)) if on)
    return controller.FitInputs(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt, model=model, stages=stages,
        shape_steps=settings.shape_steps, texture_steps=settings.texture_steps, seed=settings.seed,
        guidance_scale=settings.guidance_scale, lr=settings.lr, texture_lr=settings.texture_lr,
        l2_weight=settings.l2_weight, weight_clamp=settings.weight_clamp, render_size=settings.render_size,
        texture_size=settings.texture_size, event_every=settings.event_every, texture_every=settings.texture_every,
    )


def publish_status(status: controller.Status) -> None:
    """controller listener: copy the status into the window manager and redraw the sidebars."""
    wm = bpy.context.window_manager
    target = getattr(wm, "sdshead_status", None) if wm is not None else None
    if target is None:
        return
    target.state = status.state
    target.message = status.message
    target.stage = status.stage
    target.iteration = status.iteration
    target.total = status.total
    target.loss = "" if status.loss is None else f"{status.loss:.4g}"
    target.progress = 100.0 * status.progress
    target.last_error = status.last_error
    target.backend = f"Backend: {status.backend}"
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                area.tag_redraw()


CLASSES = (SDSHEAD_PG_settings, SDSHEAD_PG_status)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.sdshead = PointerProperty(type=SDSHEAD_PG_settings)
    bpy.types.WindowManager.sdshead_status = PointerProperty(type=SDSHEAD_PG_status)
    controller.CONTROLLER.listeners.append(publish_status)


def unregister() -> None:
    if publish_status in controller.CONTROLLER.listeners:
        controller.CONTROLLER.listeners.remove(publish_status)
    del bpy.types.WindowManager.sdshead_status
    del bpy.types.Scene.sdshead
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
