"""Registers the bpy layer: properties, preferences, operators, panel, handlers."""
from __future__ import annotations

import bpy

from . import controller, operators, panel, preferences, properties, setup_operators

_MODULES = (properties, preferences, operators, setup_operators, panel)


@bpy.app.handlers.persistent
def _on_load_pre(*_args):
    """Another file replaces the scene: a running fit has nothing left to update."""
    if controller.CONTROLLER.busy:
        controller.CONTROLLER.shutdown("another file was loaded")


def register() -> None:
    for module in _MODULES:
        module.register()
    bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    controller.CONTROLLER.shutdown("the add-on was disabled")
    for handler in [h for h in bpy.app.handlers.load_pre if getattr(h, "__name__", "") == "_on_load_pre"
                    and getattr(h, "__module__", "") == __name__]:
        bpy.app.handlers.load_pre.remove(handler)
    for module in reversed(_MODULES):
        module.unregister()
