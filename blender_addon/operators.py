"""Operators: gather inputs, call a service (scene / controller / bridge), report. Ids share `sdshead.`.

`OperatorBase.execute` turns exceptions into reports: a UserError is shown as is; anything else
is logged with context (Blender and add-on versions, backend state) and reported briefly.
Tests set `OperatorBase.RAISE_EXCEPTIONS = True` to see unexpected exceptions instead.
"""
from __future__ import annotations

import collections
import logging
import os

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty
from bpy_extras.io_utils import ExportHelper

from . import bridge, controller, paths, preferences, properties, roles, scene
from .errors import UserError

log = logging.getLogger(__package__)
CONTROLLER = controller.CONTROLLER
TICK_SECONDS = 0.1
REPORTS: collections.deque = collections.deque(maxlen=50)   # (level, message) of recent reports, newest last


# ---------------------------------------------------------------------------- poll conditions
def poll_idle(context) -> bool:
    return not CONTROLLER.busy


def poll_fit_running(context) -> bool:
    return CONTROLLER.busy


def poll_active_mesh(context) -> bool:
    obj = context.active_object
    return obj is not None and obj.type == "MESH"


def poll_can_reset(context) -> bool:
    return poll_idle(context) and scene.has_snapshot(context.active_object)


def poll_backend_idle(context) -> bool:
    backend = CONTROLLER.backend
    return poll_idle(context) and backend is not None and backend.alive


def _addon_version() -> str:
    from . import bl_info

    return ".".join(str(v) for v in bl_info["version"])


class OperatorBase:
    """Mixin for every operator here: subclasses implement run(context) -> set | None."""

    RAISE_EXCEPTIONS = False
    bl_options = {"REGISTER"}

    def run(self, context):  # pragma: no cover - abstract
        raise NotImplementedError

    def _report(self, level: str, message: str) -> None:
        REPORTS.append((level, message))
        self.report({level}, message)

    def execute(self, context):
        try:
            result = self.run(context)
        except UserError as exc:
            CONTROLLER.record_error(str(exc))
            self._report("ERROR", str(exc))
            return {"CANCELLED"}
        except Exception as exc:
            backend = CONTROLLER.backend.describe() if CONTROLLER.backend else "not started"
            log.exception("%s failed (Blender %s, SDS Head %s, backend: %s, job: %s)", self.bl_idname,
                          bpy.app.version_string, _addon_version(), backend, CONTROLLER.job.id if CONTROLLER.job else None)
            if self.RAISE_EXCEPTIONS:
                raise
            text = f"{self.bl_label} failed unexpectedly: {exc} (details in the system console)"
            CONTROLLER.record_error(text)
            self._report("ERROR", text)
            return {"CANCELLED"}
        return result or {"FINISHED"}


# ---------------------------------------------------------------------------- timer (UI only)
def _tick_timer():
    try:
        busy = CONTROLLER.tick()
    except Exception as exc:
        log.exception("SDS Head update failed")
        CONTROLLER.shutdown("update failed")
        CONTROLLER.record_error(f"Applying an update failed unexpectedly: {exc} (details in the system console)")
        return None
    return TICK_SECONDS if busy else None


def start_ui_timer() -> None:
    """Drain backend updates on the main thread while a fit runs (timers never fire under -b)."""
    if not bpy.app.timers.is_registered(_tick_timer):
        bpy.app.timers.register(_tick_timer, first_interval=TICK_SECONDS)


def stop_ui_timer() -> None:
    for timer in (_tick_timer, _doctor_timer):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)


# ---------------------------------------------------------------------------- operators
class SDSHEAD_OT_create_head(OperatorBase, bpy.types.Operator):
    """Build a head mesh from a morphable-model bundle: one shape key per component, a textured material"""

    bl_idname = "sdshead.create_head"
    bl_label = "Create Default Head"
    bl_options = {"REGISTER", "UNDO"}

    bundle_path: StringProperty(name="Bundle", subtype="FILE_PATH", default="",
                                description="A .npz bundle; empty = the default head in assets/")

    @classmethod
    def poll(cls, context):
        return poll_idle(context) and context.mode == "OBJECT"

    def run(self, context):
        path = self.bundle_path or str(paths.default_bundle_path())
        if not os.path.isfile(path):
            raise UserError(f"Head bundle not found: {path} (the default head is built by "
                            "'python -m sds_backend make-head')")
        bundle = scene.load_bundle(path)
        obj = scene.build_head(bundle, collection=context.collection)
        for other in context.selected_objects:
            other.select_set(False)
        obj.select_set(True)
        context.view_layer.objects.active = obj
        extra = f" and {len(bundle.expr_names)} expression keys" if bundle.expr_names else ""
        self._report("INFO", f"Created '{obj.name}' with {bundle.num_components} shape keys{extra}")


class SDSHEAD_OT_fit(OperatorBase, bpy.types.Operator):
    """Fit the active head's shape keys (and texture) to the prompt; updates arrive live"""

    bl_idname = "sdshead.fit"
    bl_label = "Fit to Prompt"

    @classmethod
    def poll(cls, context):
        return poll_idle(context)

    def run(self, context):
        prefs = preferences.get_preferences(context)
        inputs = properties.fit_inputs(context.scene.sdshead, prefs.model, prefs.tiny_vae)
        settings = preferences.backend_settings(prefs)
        CONTROLLER.start_fit(context.active_object, inputs, settings)
        if not bpy.app.background:
            start_ui_timer()
        self._report("INFO", f"Fitting '{context.active_object.name}' to \"{inputs.prompt.strip()}\"")


class SDSHEAD_OT_stop(OperatorBase, bpy.types.Operator):
    """Stop the fit after its current iteration and keep the current result"""

    bl_idname = "sdshead.stop"
    bl_label = "Stop"

    @classmethod
    def poll(cls, context):
        return poll_fit_running(context)

    def run(self, context):
        CONTROLLER.stop()


class SDSHEAD_OT_reset(OperatorBase, bpy.types.Operator):
    """Restore the shape-key weights and the texture from before the last fit"""

    bl_idname = "sdshead.reset"
    bl_label = "Reset"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return poll_can_reset(context)

    def run(self, context):
        snapshot = scene.restore_snapshot(context.active_object)
        self._report("INFO", f"Restored {len(snapshot.weights)} weights"
                     + (" and the texture" if snapshot.image else "") + " from before the fit")


class SDSHEAD_OT_stop_backend(OperatorBase, bpy.types.Operator):
    """End the backend process and free its memory (the next fit starts it again)"""

    bl_idname = "sdshead.stop_backend"
    bl_label = "Stop Backend"

    @classmethod
    def poll(cls, context):
        return poll_backend_idle(context)

    def run(self, context):
        CONTROLLER.shutdown("backend stopped by the user")


ROLE_ITEMS = [("fit", "Fit", "The fit moves this key (within its slider range on your own rig)"),
              ("locked", "Locked", "The key keeps its value; it is part of the shape the fit sees"),
              ("off", "Off", "The fit ignores the key (an expression, a corrective, a driven or muted key)")]


def poll_head_with_keys(context) -> bool:
    obj = context.active_object
    return poll_idle(context) and obj is not None and obj.type == "MESH" and obj.data.shape_keys is not None


class SDSHEAD_OT_set_key_role(OperatorBase, bpy.types.Operator):
    """Set the role of one shape key"""

    bl_idname = "sdshead.set_key_role"
    bl_label = "Set Key Role"
    bl_options = {"REGISTER", "UNDO", "INTERNAL"}

    key: StringProperty(name="Key")
    role: EnumProperty(name="Role", items=ROLE_ITEMS)

    @classmethod
    def poll(cls, context):
        return poll_head_with_keys(context)

    @classmethod
    def description(cls, context, properties):
        label, meaning = ({item[0]: item[i] for item in ROLE_ITEMS} for i in (1, 2))
        current = roles.role_of(context.active_object, properties.key) if poll_head_with_keys(context) else ""
        return (f"{properties.key} is {label.get(current, 'not a key of this head')}. "
                f"Click to make it {label[properties.role]}: {meaning[properties.role]}")

    def run(self, context):
        obj = context.active_object
        if self.key not in obj.data.shape_keys.key_blocks:
            raise UserError(f"'{obj.name}' has no shape key {self.key!r}")
        roles.set_roles(obj, [self.key], self.role)


class SDSHEAD_OT_set_roles(OperatorBase, bpy.types.Operator):
    """Give every shape key the pattern matches this role"""

    bl_idname = "sdshead.set_roles"
    bl_label = "Set Roles"
    bl_options = {"REGISTER", "UNDO"}

    role: EnumProperty(name="Role", items=ROLE_ITEMS)

    @classmethod
    def poll(cls, context):
        return poll_head_with_keys(context)

    def run(self, context):
        obj = context.active_object
        pattern = context.scene.sdshead.key_pattern
        names = roles.matching(list(roles.roles(obj)), pattern.split(","))
        if not names:
            raise UserError(f"Pattern {pattern!r} matches none of the shape keys of '{obj.name}'")
        roles.set_roles(obj, names, self.role)
        self._report("INFO", f"{len(names)} shape key(s) set to {self.role}")


class SDSHEAD_OT_reset_roles(OperatorBase, bpy.types.Operator):
    """Give every shape key its default role again (expressions, muted and driven keys off, the rest fit)"""

    bl_idname = "sdshead.reset_roles"
    bl_label = "Default Roles"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return poll_head_with_keys(context)

    def run(self, context):
        roles.reset_roles(context.active_object)


class SDSHEAD_OT_clear_error(OperatorBase, bpy.types.Operator):
    """Hide the last error"""

    bl_idname = "sdshead.clear_error"
    bl_label = "Clear Error"

    def run(self, context):
        CONTROLLER.record_error("")


_doctor: bridge.DoctorRun | None = None


def _doctor_publish(run: bridge.DoctorRun) -> None:
    status = bpy.context.window_manager.sdshead_status
    status.doctor_state = "running" if run.ok is None else ("ok" if run.ok else "failed")
    status.doctor_text = run.text
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            area.tag_redraw()


def _doctor_timer():
    if _doctor is None:
        return None
    if _doctor.running:
        return 0.5
    _doctor_publish(_doctor)
    return None


class SDSHEAD_OT_check_backend(OperatorBase, bpy.types.Operator):
    """Run the backend's doctor (device, versions, can the model load) and show its answer"""

    bl_idname = "sdshead.check_backend"
    bl_label = "Check Backend"

    wait: BoolProperty(name="Wait", default=False, options={"HIDDEN", "SKIP_SAVE"},
                       description="Block until the answer is there (scripts and tests)")

    @classmethod
    def poll(cls, context):
        return _doctor is None or not _doctor.running

    def run(self, context):
        global _doctor
        prefs = preferences.get_preferences(context)
        run = bridge.DoctorRun(preferences.backend_python(prefs), prefs.model or None, prefs.device)
        try:
            run.start()
        except bridge.ConfigError as exc:
            raise UserError(str(exc)) from None
        _doctor = run
        if self.wait or bpy.app.background:
            run.join()
            _doctor_publish(run)
            self._report("INFO" if run.ok else "ERROR", run.text.splitlines()[0] if run.text else "no answer")
        else:
            _doctor_publish(run)
            bpy.app.timers.register(_doctor_timer, first_interval=0.5)


class _ExportBase(OperatorBase):
    @classmethod
    def poll(cls, context):
        return poll_active_mesh(context)

    def run(self, context):
        obj = context.active_object
        path = self.export(obj, bpy.path.abspath(self.filepath))
        modifiers = f" (modifiers not applied: {len(obj.modifiers)})" if len(obj.modifiers) else ""
        keys = len(obj.data.shape_keys.key_blocks) - 1 if obj.data.shape_keys else 0
        self._report("INFO", f"Exported '{obj.name}' with {keys} shape keys to {path}{modifiers}")


class SDSHEAD_OT_export_gltf(_ExportBase, bpy.types.Operator, ExportHelper):
    """Export the head as binary glTF with its shape keys and the embedded texture"""

    bl_idname = "sdshead.export_gltf"
    bl_label = "Export glTF"
    filename_ext = ".glb"
    filter_glob: StringProperty(default="*.glb", options={"HIDDEN"})

    def export(self, obj, path):
        return scene.export_gltf(obj, path)


class SDSHEAD_OT_export_fbx(_ExportBase, bpy.types.Operator, ExportHelper):
    """Export the head as FBX with its shape keys and the embedded texture"""

    bl_idname = "sdshead.export_fbx"
    bl_label = "Export FBX"
    filename_ext = ".fbx"
    filter_glob: StringProperty(default="*.fbx", options={"HIDDEN"})

    def export(self, obj, path):
        return scene.export_fbx(obj, path)


CLASSES = (
    SDSHEAD_OT_create_head, SDSHEAD_OT_fit, SDSHEAD_OT_stop, SDSHEAD_OT_reset, SDSHEAD_OT_stop_backend,
    SDSHEAD_OT_clear_error, SDSHEAD_OT_check_backend, SDSHEAD_OT_export_gltf, SDSHEAD_OT_export_fbx,
    SDSHEAD_OT_set_key_role, SDSHEAD_OT_set_roles, SDSHEAD_OT_reset_roles,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    stop_ui_timer()
    if _doctor is not None:
        _doctor.cancel()      # a doctor still loading the model must not outlive the add-on
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
