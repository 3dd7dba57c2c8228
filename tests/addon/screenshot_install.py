"""Screenshots of the artist's install path in a real Blender window (docs/install_*.png).

    xvfb-run -a -s "-screen 0 1280x900x24" blender --enable-event-simulate --factory-startup \\
        -P tests/addon/screenshot_install.py -- --zip dist/sds_head-X-legacy.zip --out docs \\
        [--model TINY_SD_DIR --vae-model TINY_SD_DIR/tiny_vae]

Run it with BLENDER_USER_CONFIG / BLENDER_USER_SCRIPTS pointing at empty folders: it installs the
zip as a user would (Preferences > Add-ons > Install), shows the add-on's preferences with the
backend missing, clicks Install Backend and shoots while it runs and when it is done, then
Download Model. Timers fire in UI mode, so this script only schedules steps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import addon_utils
import bpy

argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
parser = argparse.ArgumentParser()
parser.add_argument("--zip", type=Path, required=True)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--model", default="")
parser.add_argument("--vae-model", default="")
args = parser.parse_args(argv)
bpy.context.preferences.view.show_splash = False
state = {"step": "install-zip", "t0": time.monotonic()}


def log(text: str) -> None:
    print(f"[screenshot] {text}", flush=True)


def main_area():
    window = bpy.context.window_manager.windows[0]
    area = max(window.screen.areas, key=lambda a: a.width * a.height)
    return window, area


def shoot(name: str) -> None:
    window, area = main_area()
    region = next(r for r in area.regions if r.type == "WINDOW")
    args.out.mkdir(parents=True, exist_ok=True)
    with bpy.context.temp_override(window=window, area=area, region=region):
        bpy.ops.screen.screenshot_area(filepath=str((args.out / name).resolve()))
    log(f"saved {args.out / name}")


def show_preferences() -> None:
    window, area = main_area()
    area.type = "PREFERENCES"
    window.event_simulate(type="MOUSEMOVE", value="NOTHING", x=2, y=2)    # no tooltip in the shots
    bpy.context.preferences.active_section = "ADDONS"
    bpy.context.window_manager.addon_search = "SDS"
    for module in addon_utils.modules():
        if module.__name__ == "sds_head":
            addon_utils.module_bl_info(module)["show_expanded"] = True


def step():
    phase = state["step"]
    if phase != "install-zip":
        from sds_head import setup_operators
    if phase == "install-zip":
        bpy.ops.preferences.addon_install(filepath=str(args.zip.resolve()))
        addon_utils.enable("sds_head", default_set=True)
        prefs = bpy.context.preferences.addons["sds_head"].preferences
        prefs.model, prefs.tiny_vae, prefs.device = args.model, args.vae_model, "cpu"
        bpy.context.preferences.view.ui_scale = 1.0
        show_preferences()
        state["step"] = "shoot-missing"
        return 1.0
    if phase == "shoot-missing":
        shoot("install_1_addon.png")
        bpy.ops.sdshead.install_backend()
        state["step"] = "wait-progress"
        return 0.3
    if phase == "wait-progress":
        run = setup_operators._install
        if run.running and run.step.startswith("install torch"):
            state["step"] = "shoot-progress"
            return 0.6
        return 0.1
    if phase == "shoot-progress":
        shoot("install_2_progress.png")
        state["step"] = "wait-done"
        return 0.5
    if phase == "wait-done":
        run = setup_operators._install
        if run.running:
            return 0.5
        log(f"install: {run.message}")
        bpy.ops.sdshead.download_model()
        state["step"] = "wait-download"
        return 0.5
    if phase == "wait-download":
        run = setup_operators._download
        if run.running:
            return 0.5
        log(f"download: {run.message}")
        state["step"] = "shoot-ready"
        return 0.8
    if phase == "shoot-ready":
        shoot("install_3_ready.png")
        bpy.ops.wm.quit_blender()
    return None


def guarded_step():
    try:
        result = step()
    except Exception:
        import traceback

        traceback.print_exc()
        bpy.ops.wm.quit_blender()
        return None
    if time.monotonic() - state["t0"] > 600:
        log("gave up after 600 s")
        bpy.ops.wm.quit_blender()
        return None
    return result


bpy.app.timers.register(guarded_step, first_interval=1.0)
