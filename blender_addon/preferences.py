"""Add-on preferences: the backend (installed here or named), which model (and tiny VAE), which device."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import backend_env, bridge, paths

ADDON_ID = __package__
ENV_FOLDER = "backend-env"


def environment_dir() -> Path:
    """Where Install Backend puts the backend environment: the extension's user folder (4.2+),
    else a folder in Blender's user configuration; never inside Blender's own Python."""
    if ADDON_ID.startswith("bl_ext.") and hasattr(bpy.utils, "extension_path_user"):
        return Path(bpy.utils.extension_path_user(ADDON_ID, path=ENV_FOLDER, create=True))
    return Path(bpy.utils.user_resource("CONFIG", path="sds_head", create=True)) / ENV_FOLDER


class SDSHEAD_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    backend_python: StringProperty(
        name="Backend Python", subtype="FILE_PATH", default=paths.default_backend_python(),
        description="Interpreter of a backend environment of your own (install.py creates .venv/bin/python); "
                    "empty = the one Install Backend made")
    install_python: StringProperty(
        name="Python for the install", subtype="FILE_PATH", default="",
        description="Python 3.10+ that creates the backend environment; empty = the Python Blender runs "
                    "(Blender's own Python is never changed)")
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
        items=[("auto", "Auto", "CUDA when available, else Apple's MPS, else CPU"), ("cuda", "CUDA", "NVIDIA GPU"),
               ("mps", "MPS", "Apple GPU (float32 unless float16 is chosen)"),
               ("cpu", "CPU", "Slow; fine for tiny test models")])
    timeout: IntProperty(
        name="Timeout (s)", default=300, min=5, soft_max=3600,
        description="A backend that says nothing for this long (start-up included) is treated as hung")

    def draw(self, context):
        from . import setup_operators

        layout = self.layout
        setup_operators.draw_backend_box(layout.box(), self)
        layout.prop(self, "backend_python")
        row = layout.row()
        row.prop(self, "model")
        row.operator("sdshead.download_model", icon="IMPORT")
        setup_operators.draw_download(layout)
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
    install_python: str = ""
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


def backend_python(prefs) -> str:
    """The Backend Python preference, else the environment Install Backend made (when complete)."""
    chosen = prefs.backend_python.strip()
    if chosen:
        return chosen
    try:
        venv = environment_dir()
        return str(paths.venv_python(venv)) if backend_env.state(venv) == "ready" else ""
    except (OSError, ValueError):
        return ""


def backend_settings(prefs, **overrides) -> bridge.BackendSettings:
    timeout = float(prefs.timeout)
    values = dict(python=backend_python(prefs), device=prefs.device, hello_timeout=max(timeout, 30.0),
                  reply_timeout=timeout, stop_timeout=min(timeout, 60.0))
    values.update(overrides)
    return bridge.BackendSettings(**values)


CLASSES = (SDSHEAD_AP_preferences,)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
