"""Screenshot of the SDS Head panel during a real fit, in a real Blender window (docs/panel.png).

    xvfb-run -a -s "-screen 0 1500x1150x24" blender --enable-event-simulate --factory-startup \\
        -P tests/addon/screenshot_panel.py -- --out docs/panel.png --model TINY_SD_DIR [--lock "*ear*"]

In UI mode bpy.app.timers fire, so this script only schedules steps: set up the scene, open the
sidebar on the "SDS Head" tab (Ctrl+wheel over the sidebar, simulated: Blender 3.4 has no API for
the active tab; with `--tabs 0` the panels move into the first tab instead, so Blender can run
without --enable-event-simulate, which keeps its event loop spinning), start the fit with the
panel's operator, wait until it is well under way, save the screenshot, stop the fit and quit.
The add-on comes from this repository.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import bpy

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import addon_utils  # noqa: E402

argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
parser.add_argument("--prompt", default="an old sea captain, big nose")
parser.add_argument("--at", type=float, default=0.35, help="fraction of the fit at which to shoot")
parser.add_argument("--tabs", type=int, default=3,
                    help="Ctrl+wheel steps from the first sidebar tab to ours; 0: show ours in the first tab")
parser.add_argument("--shape-only", action="store_true", help="no texture stage")
parser.add_argument("--steps", type=int, default=60, help="iterations per stage")
parser.add_argument("--widen", type=int, default=0, help="pixels to widen the sidebar by (needs simulated events)")
parser.add_argument("--lock", default="", help="lock the shape keys matching this glob (the list shows the roles)")
args = parser.parse_args(argv)
bpy.context.preferences.view.show_splash = False  # before Blender opens the splash, after this script

state = {"step": "setup", "t0": time.monotonic()}


def log(text: str) -> None:
    print(f"[screenshot] {text}", flush=True)


def view3d():
    window = bpy.context.window_manager.windows[0]
    area = max((a for a in window.screen.areas if a.type == "VIEW_3D"), key=lambda a: a.width * a.height)
    region = next(r for r in area.regions if r.type == "WINDOW")
    sidebar = next(r for r in area.regions if r.type == "UI")
    return window, area, region, sidebar


def setup() -> None:
    module = addon_utils.enable("blender_addon", default_set=True)
    assert module is not None
    if args.tabs == 0:
        from blender_addon import panel

        for cls in reversed(panel.CLASSES):
            bpy.utils.unregister_class(cls)
        for cls in panel.CLASSES:
            cls.bl_category = "Item"
            bpy.utils.register_class(cls)
    prefs = bpy.context.preferences.addons["blender_addon"].preferences
    prefs.backend_python, prefs.model, prefs.device = args.python, args.model, "cpu"
    window, area, region, sidebar = view3d()
    with bpy.context.temp_override(window=window, area=area, region=region):
        for obj in list(bpy.data.objects):
            bpy.data.objects.remove(obj)
        bpy.ops.sdshead.create_head()
        head = bpy.context.active_object
        if args.lock:
            from blender_addon import roles

            names = [kb.name for kb in head.data.shape_keys.key_blocks[1:]]
            roles.set_roles(head, roles.matching(names, [args.lock]), "locked")
        space = area.spaces.active
        space.show_region_ui = True
        space.shading.type = "SOLID"
        space.shading.color_type = "TEXTURE"
        space.overlay.show_floor = False
        space.overlay.show_axis_x = space.overlay.show_axis_y = False
        bpy.ops.view3d.view_axis(type="FRONT")
        bpy.ops.view3d.view_selected()
    for other in window.screen.areas:  # the properties editor shows the shape keys moving
        if other.type == "PROPERTIES":
            other.spaces.active.context = "DATA"
    settings = bpy.context.scene.sdshead
    settings.prompt = args.prompt
    settings.negative_prompt = "blurry, deformed"
    settings.stage_shape, settings.stage_texture = True, not args.shape_only
    settings.shape_steps = settings.texture_steps = args.steps
    settings.render_size, settings.texture_size = 64, 256
    settings.event_every, settings.texture_every = 1, max(1, min(5, args.steps // 4))
    bpy.context.preferences.view.ui_scale = 1.0
    log(f"head '{head.name}' ready")


def switch_tab() -> None:
    if args.tabs == 0:
        return
    window, area, region, sidebar = view3d()
    x, y = sidebar.x + sidebar.width - 8, sidebar.y + sidebar.height // 2  # over the tab strip
    window.event_simulate(type="MOUSEMOVE", value="NOTHING", x=x, y=y)
    for _ in range(args.tabs):
        window.event_simulate(type="WHEELDOWNMOUSE", value="PRESS", x=x, y=y, ctrl=True)


def widen(phase: str) -> None:
    """Drag the sidebar's left edge, as a user does to read long key names (one phase per timer tick,
    so that Blender sees the press on its edge before the drag)."""
    window, area, region, sidebar = view3d()
    edge, y = sidebar.x + 2, sidebar.y + sidebar.height // 3
    if phase == "press":
        window.event_simulate(type="MOUSEMOVE", value="NOTHING", x=edge, y=y)
        window.event_simulate(type="LEFTMOUSE", value="PRESS", x=edge, y=y)
    elif phase == "drag":
        for step in range(1, 11):
            window.event_simulate(type="MOUSEMOVE", value="NOTHING", x=edge - args.widen * step // 10, y=y)
    else:
        window.event_simulate(type="LEFTMOUSE", value="RELEASE", x=edge - args.widen, y=y)


def start_fit() -> None:
    window, area, region, sidebar = view3d()
    with bpy.context.temp_override(window=window, area=area, region=sidebar):
        result = bpy.ops.sdshead.fit()
    log(f"fit: {result}")


def shoot() -> None:
    window, area, region, sidebar = view3d()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with bpy.context.temp_override(window=window, area=area, region=region):
        bpy.ops.screen.screenshot(filepath=str(args.out.resolve()))
    log(f"saved {args.out}")


def step():
    from blender_addon.controller import CONTROLLER

    phase = state["step"]
    if phase == "setup":
        setup()
        state["step"] = "tab"
        return 1.0
    if phase == "tab":
        switch_tab()
        state["step"] = "widen-press" if args.widen else "fit"
        return 1.0
    if phase.startswith("widen-"):
        widen(phase[len("widen-"):])
        state["step"] = {"widen-press": "widen-drag", "widen-drag": "widen-release"}.get(phase, "fit")
        return 0.3
    if phase == "fit":
        start_fit()
        state["step"] = "wait"
        return 0.5
    if phase == "wait":
        status = CONTROLLER.status
        if status.state == "failed" or not CONTROLLER.busy and status.state != "running":
            log(f"fit ended before the shot: {status.state} {status.last_error}")   # a fast machine
            state["step"] = "shoot"
            return 0.6
        if status.total and status.iteration >= args.at * status.total and (status.textures_applied or args.shape_only):
            state["step"] = "shoot"
            return 0.6  # let the viewport and the panel redraw with this update
        return 0.2
    if phase == "shoot":
        shoot()
        window, area, region, sidebar = view3d()
        if CONTROLLER.busy:
            try:
                with bpy.context.temp_override(window=window, area=area, region=sidebar):
                    bpy.ops.sdshead.stop()
            except RuntimeError as exc:     # the fit ended in between: Stop's poll refuses, nothing to stop
                log(f"stop: {exc}")
        state["step"] = "quit"
        return 1.0
    if phase == "quit":
        if CONTROLLER.busy and time.monotonic() - state["t0"] < 600:
            return 0.2
        status = CONTROLLER.status
        log(f"final state: {status.state} updates {status.updates_applied} textures {status.textures_applied} "
            f"{status.message} {status.last_error}")
        bpy.ops.wm.quit_blender()
    return None


def guarded_step():
    """A timer that raises is dropped and Blender would wait forever: report and quit instead."""
    try:
        return step()
    except Exception:
        import traceback

        log("FAILED in step " + state["step"] + "\n" + traceback.format_exc())
        bpy.ops.wm.quit_blender()
        return None


bpy.app.timers.register(guarded_step, first_interval=1.0)
