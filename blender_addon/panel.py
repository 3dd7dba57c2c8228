"""Sidebar panel "SDS Head" in the 3D viewport (N panel). Draws properties and status; no logic."""
from __future__ import annotations

import textwrap

import bpy

from . import controller, preferences, roles, scene, setup_operators

CONTROLLER = controller.CONTROLLER
ROLE_ICONS = {"fit": "SHAPEKEY_DATA", "locked": "LOCKED", "off": "HIDE_ON"}


def _wrapped(layout, text: str, width: int, icon: str = "NONE", max_lines: int = 14) -> None:
    lines: list[str] = []
    for paragraph in text.splitlines():
        lines.extend(textwrap.wrap(paragraph, width) or [""])
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + ["..."]
    column = layout.column(align=True)
    column.scale_y = 0.8
    for i, line in enumerate(lines):
        column.label(text=line, icon=icon if i == 0 else "BLANK1")


def _chars(context) -> int:
    region = context.region
    width = region.width if region is not None else 300
    return max(20, int(width / (6.5 * context.preferences.system.ui_scale)) - 4)


class SDSHEAD_PT_main(bpy.types.Panel):
    bl_idname = "SDSHEAD_PT_main"
    bl_label = "SDS Head"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "SDS Head"

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdshead
        status = context.window_manager.sdshead_status
        busy = CONTROLLER.busy

        # no backend yet (a packaged add-on before Install Backend), or one being installed
        if setup_operators.busy() or not preferences.backend_python(preferences.get_preferences(context)):
            box = layout.box()
            setup_operators.draw_setup_summary(box)

        # head
        box = layout.box()
        obj = context.active_object
        if obj is not None and obj.type == "MESH" and obj.data.shape_keys is not None:
            names = scene.component_names(obj) if len(obj.data.shape_keys.key_blocks) > 1 else []
            box.label(text=f"{obj.name}: {len(names)} shape keys to fit", icon="MESH_MONKEY")
        elif obj is not None and obj.type == "MESH":
            box.label(text=f"{obj.name}: no shape keys", icon="ERROR")
        else:
            box.label(text="Select a head mesh, or:", icon="INFO")
        box.operator("sdshead.create_head", icon="ADD")

        # prompt + main settings
        column = layout.column()
        column.enabled = not busy
        column.label(text="Prompt")
        column.prop(settings, "prompt", text="")
        column.label(text="Negative prompt")
        column.prop(settings, "negative_prompt", text="")
        row = column.row(align=True)
        row.prop(settings, "stage_shape", toggle=True, icon="SHAPEKEY_DATA")
        row.prop(settings, "stage_texture", toggle=True, icon="TEXTURE")
        sub = column.column(align=True)
        sub.prop(settings, "shape_steps")
        sub.prop(settings, "texture_steps")
        sub = column.column(align=True)
        sub.prop(settings, "seed")
        sub.prop(settings, "guidance_scale")
        sub.prop(settings, "lr")
        sub.prop(settings, "l2_weight")

        # run
        row = layout.row()
        row.scale_y = 1.5
        row.operator("sdshead.fit", icon="PLAY")
        row = layout.row(align=True)
        row.operator("sdshead.stop", icon="PAUSE")
        row.operator("sdshead.reset", icon="LOOP_BACK")

        # progress
        box = layout.box()
        col = box.column(align=True)
        state = status.state
        icon = {"failed": "ERROR", "done": "CHECKMARK", "stopped": "PAUSE", "idle": "INFO"}.get(state, "SORTTIME")
        col.label(text=(status.message or state).capitalize(), icon=icon)
        if status.loss:
            col.label(text=f"Loss {status.loss}", icon="BLANK1")
        progress_text = f"{status.stage.capitalize()} {status.iteration} / {status.total}" if status.total else "Progress"
        if hasattr(col, "progress"):  # Blender 4.0+
            col.progress(factor=status.progress / 100.0, type="BAR", text=progress_text)
        else:
            sub = col.row()
            sub.enabled = False
            sub.prop(status, "progress", text=progress_text, slider=True)
        col.label(text=status.backend, icon="CONSOLE")  # "Backend: pid 1234, cpu"

        if status.last_error:
            box = layout.box()
            header = box.row()
            header.label(text="Last error", icon="ERROR")
            header.operator("sdshead.clear_error", text="", icon="X", emboss=False)
            _wrapped(box, status.last_error, _chars(context))

        # export
        row = layout.row(align=True)
        row.operator("sdshead.export_fbx", text="FBX", icon="EXPORT")
        row.operator("sdshead.export_gltf", text="glTF", icon="EXPORT")


class SDSHEAD_UL_keys(bpy.types.UIList):
    """The head's shape keys (not the reference key), each with its value and its role."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        obj = context.active_object
        role = roles.role_of(obj, item.name)
        split = layout.split(factor=0.5)      # rig key names are long: half a narrow sidebar is theirs
        split.label(text=item.name)
        row = split.row(align=True)
        row.prop(item, "value", text="", emboss=role != "off")
        button = row.row(align=True)
        button.enabled = not CONTROLLER.busy
        # one button per key: it shows the role and a click moves to the next (fit, locked, off)
        op = button.operator("sdshead.set_key_role", text="", icon=ROLE_ICONS[role])
        op.key, op.role = item.name, roles.ROLES[(roles.ROLES.index(role) + 1) % len(roles.ROLES)]

    def filter_items(self, context, data, propname):
        blocks = getattr(data, propname)
        flags = bpy.types.UI_UL_list.filter_items_by_name(self.filter_name, self.bitflag_filter_item, blocks, "name") \
            if self.filter_name else [self.bitflag_filter_item] * len(blocks)
        reference = data.reference_key.name
        return [0 if kb.name == reference else flag for kb, flag in zip(blocks, flags)], []


class SDSHEAD_PT_keys(bpy.types.Panel):
    """Which shape keys the fit moves (Fit), keeps at their value (Locked) or ignores (Off)."""

    bl_label = "Shape Keys"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "SDS Head"
    bl_parent_id = "SDSHEAD_PT_main"

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        return obj is not None and obj.type == "MESH" and obj.data.shape_keys is not None

    def draw(self, context):
        layout = self.layout
        obj = context.active_object
        keys = obj.data.shape_keys
        counts = {role: 0 for role in roles.ROLES}
        for role in roles.roles(obj).values():
            counts[role] += 1
        layout.label(text=f"Fit {counts['fit']}, locked {counts['locked']}, off {counts['off']}")
        layout.template_list("SDSHEAD_UL_keys", "", keys, "key_blocks", obj, "active_shape_key_index", rows=6)
        column = layout.column(align=True)
        column.enabled = not CONTROLLER.busy
        column.prop(context.scene.sdshead, "key_pattern", text="Pattern")
        row = column.row(align=True)
        for choice, label in (("fit", "Fit"), ("locked", "Lock"), ("off", "Off")):
            row.operator("sdshead.set_roles", text=label, icon=ROLE_ICONS[choice]).role = choice
        column.operator("sdshead.reset_roles", icon="LOOP_BACK")


class SDSHEAD_PT_advanced(bpy.types.Panel):
    bl_label = "Advanced"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "SDS Head"
    bl_parent_id = "SDSHEAD_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        settings = context.scene.sdshead
        layout = self.layout
        layout.use_property_split = True
        column = layout.column()
        column.enabled = not CONTROLLER.busy
        column.prop(settings, "vae")
        column.prop(settings, "dtype")
        for name in ("texture_lr", "weight_clamp", "render_size", "texture_size", "event_every", "texture_every"):
            column.prop(settings, name)
        self.layout.operator("sdshead.stop_backend", icon="CANCEL")


CLASSES = (SDSHEAD_UL_keys, SDSHEAD_PT_main, SDSHEAD_PT_keys, SDSHEAD_PT_advanced)

register, unregister = bpy.utils.register_classes_factory(CLASSES)
