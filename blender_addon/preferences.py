"""Add-on preferences: which backend Python runs the fit, which model (and tiny VAE), which device."""
from __future__ import annotations

from dataclasses import dataclass

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import bridge, paths

ADDON_ID = __package__


class SDSHEAD_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    backend_python: StringProperty(
        name="Backend Python", subtype="FILE_PATH", default=paths.default_backend_python(),
        description="Interpreter of the backend environment (install.py creates .venv/bin/python); "
                    "Blender's own Python cannot run the backend")
    model: StringProperty(
        name="Model", default="",
        description="Stable Diffusion hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or local folder; "
                    "empty = the backend's default")
    tiny_vae: StringProperty(
        name="Tiny VAE", default="",
        description="AutoencoderTiny hub id or local folder used when a fit's VAE is Tiny; "
                    "empty = the backend's default (madebyollin/taesd)")
    device: EnumProperty(
        name="Device", default="auto",
        items=[("auto", "Auto", "CUDA when available, else CPU"), ("cuda", "CUDA", "NVIDIA GPU"),
               ("cpu", "CPU", "Slow; fine for tiny test models")])
    timeout: IntProperty(
        name="Timeout (s)", default=300, min=5, soft_max=3600,
        description="A backend that says nothing for this long (start-up included) is treated as hung")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "backend_python")
        layout.prop(self, "model")
        layout.prop(self, "tiny_vae")
        row = layout.row()
        row.prop(self, "device")
        row.prop(self, "timeout")
        layout.operator("sdshead.check_backend", icon="CHECKMARK")
        status = getattr(context.window_manager, "sdshead_status", None)
        if status is not None and status.doctor_state:
            box = layout.box()
            if status.doctor_state == "running":
                box.label(text="Checking the backend...", icon="SORTTIME")
            else:
                icon = "CHECKMARK" if status.doctor_state == "ok" else "ERROR"
                for i, line in enumerate(status.doctor_text.splitlines()[:40] or [""]):
                    box.label(text=line, icon=icon if i == 0 else "BLANK1")


@dataclass
class DefaultPreferences:
    """Preferences when the add-on is registered without addon_utils (no entry in the user prefs)."""

    backend_python: str = paths.default_backend_python()
    model: str = ""
    tiny_vae: str = ""
    device: str = "auto"
    timeout: int = 300


def get_preferences(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    if addon is None or addon.preferences is None:
        return DefaultPreferences()
    return addon.preferences


def backend_settings(prefs, **overrides) -> bridge.BackendSettings:
    timeout = float(prefs.timeout)
    values = dict(python=prefs.backend_python, device=prefs.device, hello_timeout=max(timeout, 30.0),
                  reply_timeout=timeout, stop_timeout=min(timeout, 60.0))
    values.update(overrides)
    return bridge.BackendSettings(**values)


CLASSES = (SDSHEAD_AP_preferences,)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
