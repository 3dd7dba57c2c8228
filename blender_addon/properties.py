"""Panel properties: fit settings per scene (saved with the file) and the run status (per session).

`scene.sdshead` holds what the user types (prompt, steps, ...). `window_manager.sdshead_status`
mirrors controller.Status for drawing; it is not saved and takes no part in undo.
"""
from __future__ import annotations

import struct

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from . import controller, paths

fit_config = paths.shared("fit_config")


# defaults and hard limits come from the backend's FitConfig (the shared fit_config module);
# soft_max is only where a panel slider stops
DEFAULTS = fit_config.FitConfig()
RANGES = fit_config.RANGES
NUMBER_SETTINGS = ("shape_steps", "texture_steps", "seed", "guidance_scale", "lr", "texture_lr", "l2_weight",
                   "weight_clamp", "render_size", "texture_size", "event_every", "texture_every")


def _int(name: str, label: str, description: str, soft_max: int | None = None):
    limits = RANGES[name]
    options = dict(name=label, description=description, default=getattr(DEFAULTS, name), min=int(limits.low))
    if limits.high < 2 ** 31:
        options["max"] = int(limits.high)
    if soft_max is not None:
        options["soft_max"] = soft_max
    return IntProperty(**options)


def _float(name: str, label: str, description: str, soft_max: float, precision: int = 3):
    limits = RANGES[name]
    return FloatProperty(name=label, description=description, default=getattr(DEFAULTS, name),
                         min=limits.low, max=limits.high, soft_max=soft_max, precision=precision)


class SDSHEAD_PG_settings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What the head should look like", default="")
    negative_prompt: StringProperty(name="Negative", description="What the head should not look like", default="")
    stage_shape: BoolProperty(name="Shape", description="Fit the shape-key weights", default="shape" in DEFAULTS.stages)
    stage_texture: BoolProperty(name="Texture", description="Fit the UV texture (after the shape)",
                                default="texture" in DEFAULTS.stages)
    shape_steps: _int("shape_steps", "Steps", "Iterations of the shape stage", soft_max=2000)
    texture_steps: _int("texture_steps", "Texture Steps", "Iterations of the texture stage", soft_max=4000)
    seed: _int("seed", "Seed", "Random seed: same seed, same result")
    guidance_scale: _float("guidance_scale", "Guidance", "Classifier-free guidance scale", soft_max=200.0)
    lr: _float("lr", "Learning Rate", "Adam step size for the weights", soft_max=0.5, precision=4)
    texture_lr: _float("texture_lr", "Texture Rate", "Adam step size for the texture", soft_max=0.5, precision=4)
    l2_weight: _float("l2_weight", "Regularisation", "L2 penalty on the weights (keeps the head plausible)",
                      soft_max=0.1, precision=4)
    weight_clamp: _float("weight_clamp", "Weight Clamp", "Weights stay within +-this many standard deviations",
                         soft_max=10.0)
    render_size: _int("render_size", "Render Size", "Pixel size of the renders fed to the diffusion model",
                      soft_max=1024)
    texture_size: _int("texture_size", "Texture Size", "Pixel size of the fitted UV texture")
    event_every: _int("event_every", "Update Every", "Send the weights to Blender every N iterations", soft_max=1000)
    texture_every: _int("texture_every", "Texture Every", "Send the texture to Blender every N iterations",
                        soft_max=1000)
    vae: EnumProperty(name="VAE", default=DEFAULTS.vae, items=[
        ("full", "Full", "The model's own VAE encoder, as the published SDS methods use"),
        ("tiny", "Tiny", "TAESD (the Tiny VAE preference): the same latents, a step in about 0.4x the time and "
                         "less GPU memory; for speed and 8 GB cards")])
    dtype: EnumProperty(name="Precision", default=DEFAULTS.dtype, items=[
        ("auto", "Auto", "float16 on CUDA, float32 on Apple's MPS and the CPU"),
        ("float32", "float32", "Full precision everywhere"),
        ("float16", "float16", "Half the memory; on MPS too (a CPU refuses it)")])
    key_pattern: StringProperty(name="Key Pattern", default="*",
                                description="Shape keys the Fit / Lock / Off buttons below set: globs, comma-separated "
                                            "(e.g. 'nose*, chin*'; '*' is every key)")


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


def as_typed(value):
    """A float property's value as the decimal the user typed: Blender keeps float32, whose 0.05 is
    0.0500000007; the shortest decimal that is the same float32 is what the panel shows."""
    if not isinstance(value, float):
        return value
    stored = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == stored:
            return candidate
    return value


def fit_inputs(settings: SDSHEAD_PG_settings, model: str, tiny_vae: str = "") -> controller.FitInputs:
    """The panel's settings as the service's input; `tiny_vae` (the preference) goes with VAE Tiny only."""
    stages = [s for s, on in (("shape", settings.stage_shape), ("texture", settings.stage_texture)) if on]
    config = {"stages": stages, "vae": settings.vae, "dtype": settings.dtype,
              **{name: as_typed(getattr(settings, name)) for name in NUMBER_SETTINGS}}
    return controller.FitInputs(prompt=settings.prompt, negative_prompt=settings.negative_prompt, model=model,
                                vae_model=tiny_vae if settings.vae == "tiny" else "", config=config)


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
