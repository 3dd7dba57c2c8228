"""Install Backend, Update, Remove, Cancel and Download Model: the bpy layer over backend_env.py.

Each runs in the background (backend_env.StepRun); a timer redraws the preferences and the
sidebar while one runs, so the step, the progress and at the end the one-line outcome show
there. Only one install or download runs at a time.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import bpy

from . import backend_env, controller, paths, preferences
from .errors import UserError
from .operators import OperatorBase

_install: backend_env.InstallRun | None = None
_download: backend_env.DownloadRun | None = None

STATE_TEXT = {
    "missing": ("Backend not installed", "ERROR"),
    "incomplete": ("Backend install did not finish: Repair installs it again", "ERROR"),
    "outdated": ("Backend made for another version of SDS Head: Update it", "ERROR"),
    "broken": ("Backend environment is broken (its Python is gone): Repair it", "ERROR"),
    "ready": ("Backend installed", "CHECKMARK"),
}


def current_state() -> str:
    try:
        return backend_env.state(preferences.environment_dir())
    except (OSError, ValueError):
        return "missing"


def install_python(prefs) -> str:
    """The Python that creates the environment: the preference, else the one Blender runs."""
    return os.path.expanduser(prefs.install_python.strip()) or sys.executable


def busy() -> bool:
    return any(run is not None and run.running for run in (_install, _download))


def _redraw_timer():
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("PREFERENCES", "VIEW_3D"):
                area.tag_redraw()
    return 0.5 if busy() else None


def _watch(run: backend_env.StepRun, wait: bool) -> None:
    if wait or bpy.app.background:
        run.join()
    elif not bpy.app.timers.is_registered(_redraw_timer):
        bpy.app.timers.register(_redraw_timer, first_interval=0.2)


def _draw_run(layout, run: backend_env.StepRun | None, detail: str = "") -> None:
    if run is None:
        return
    if run.running:
        text = f"{run.step} ({run.progress * 100:.0f}%)" + (f", {detail}" if detail else "")
        layout.label(text=text, icon="SORTTIME")
        layout.operator("sdshead.cancel_setup", icon="CANCEL")
    elif run.message:
        layout.label(text=run.message, icon="CHECKMARK" if run.ok else "ERROR")
        if not run.ok:
            layout.label(text=f"Log: {run.log_path}", icon="TEXT")


def draw_backend_box(box, prefs) -> None:
    """The Backend section of the preferences (also used by the sidebar when there is no backend)."""
    if _install is not None and _install.running:
        box.label(text=f"Installing the backend into {_install.venv}", icon="IMPORT")
        _draw_run(box, _install)
        return
    state = current_state()
    text, icon = STATE_TEXT[state]
    box.label(text=text if not prefs.backend_python.strip() else "Using the Backend Python below", icon=icon)
    row = box.row()
    if state == "ready":
        row.operator("sdshead.install_backend", text="Update Backend", icon="FILE_REFRESH").fresh = True
        row.operator("sdshead.remove_backend", icon="TRASH")
    else:
        label = {"missing": "Install Backend", "outdated": "Update Backend"}.get(state, "Repair Backend")
        row.operator("sdshead.install_backend", text=label, icon="IMPORT").fresh = state != "missing"
        if state != "missing":
            row.operator("sdshead.remove_backend", icon="TRASH")
    box.prop(prefs, "install_python")
    _draw_run(box, _install)


def draw_setup_summary(layout) -> None:
    """The sidebar's line about the backend: install progress, or the button that starts it."""
    if _install is not None and (_install.running or not _install.ok):
        _draw_run(layout, _install)
    if _download is not None and _download.running:
        draw_download(layout)
    if busy():
        return
    state = current_state()
    if not (_install is not None and not _install.ok and state == "missing"):
        text, icon = STATE_TEXT[state]
        layout.label(text=text, icon=icon)
        layout.operator("sdshead.install_backend", icon="IMPORT").fresh = state != "missing"


def draw_download(layout) -> None:
    _draw_run(layout, _download, _download.size_text if _download is not None else "")


class SDSHEAD_OT_install_backend(OperatorBase, bpy.types.Operator):
    """Create the backend environment (torch, diffusers, the backend) in the add-on's user folder"""

    bl_idname = "sdshead.install_backend"
    bl_label = "Install Backend"

    fresh: bpy.props.BoolProperty(name="Fresh", default=False, options={"SKIP_SAVE"},
                                  description="Delete the environment first (update, repair)")
    wait: bpy.props.BoolProperty(name="Wait", default=False, options={"HIDDEN", "SKIP_SAVE"},
                                 description="Block until the install has ended (scripts and tests)")

    @classmethod
    def poll(cls, context):
        return not busy() and not controller.CONTROLLER.busy

    def run(self, context):
        global _install
        prefs = preferences.get_preferences(context)
        venv = preferences.environment_dir()
        if not self.fresh and backend_env.state(venv) == "ready":
            self._report("INFO", f"the backend is already installed in {venv}")
            return
        if self.fresh:
            controller.CONTROLLER.shutdown("the backend is being reinstalled")
        python = install_python(prefs)
        if not Path(python).is_file():
            raise UserError(f"Python for the install not found: {python}")
        try:
            _install = backend_env.InstallRun(python, venv, fresh=self.fresh).start()
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
        _watch(_install, self.wait)
        if not _install.running:
            self._report("INFO" if _install.ok else "ERROR", _install.message)


class SDSHEAD_OT_remove_backend(OperatorBase, bpy.types.Operator):
    """Delete the backend environment Install Backend made (the model cache is kept)"""

    bl_idname = "sdshead.remove_backend"
    bl_label = "Remove Backend"

    @classmethod
    def poll(cls, context):
        return not busy() and not controller.CONTROLLER.busy

    def run(self, context):
        controller.CONTROLLER.shutdown("the backend was removed")
        venv = preferences.environment_dir()
        try:
            backend_env.remove(venv)
        except OSError as exc:
            raise UserError(f"cannot remove {venv}: {exc}") from None
        self._report("INFO", f"removed {venv}")


class SDSHEAD_OT_cancel_setup(OperatorBase, bpy.types.Operator):
    """Stop the install or download now (a half-made environment is removed)"""

    bl_idname = "sdshead.cancel_setup"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return busy()

    def run(self, context):
        for run in (_install, _download):
            if run is not None and run.running:
                run.cancel()


class SDSHEAD_OT_download_model(OperatorBase, bpy.types.Operator):
    """Download the model (and the tiny VAE) into the Hugging Face cache, so the first fit starts at once"""

    bl_idname = "sdshead.download_model"
    bl_label = "Download Model"

    wait: bpy.props.BoolProperty(name="Wait", default=False, options={"HIDDEN", "SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return not busy()

    def run(self, context):
        global _download
        prefs = preferences.get_preferences(context)
        python = preferences.backend_python(prefs)
        if not python:
            raise UserError("install the backend first (Install Backend above)")
        tiny_vae = prefs.tiny_vae.strip() or paths.shared("inputs").default_tiny_vae_id()
        _download = backend_env.DownloadRun(python, prefs.model.strip(), tiny_vae,
                                            preferences.environment_dir().parent / "download.log").start()
        _watch(_download, self.wait)
        if not _download.running:
            self._report("INFO" if _download.ok else "ERROR", _download.message)


CLASSES = (SDSHEAD_OT_install_backend, SDSHEAD_OT_remove_backend, SDSHEAD_OT_cancel_setup,
           SDSHEAD_OT_download_model)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for run in (_install, _download):
        if run is not None and run.running:
            run.cancel()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
