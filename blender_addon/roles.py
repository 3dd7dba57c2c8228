"""Key roles: which shape keys a fit drives (fit), keeps at their value (locked) or ignores (off).

The roles a user chose are kept on the object (custom property `sdshead_roles`, JSON
{key: role}); every other key has its default role:

* a head made by Create Default Head (or from any bundle: it records its components) fits its
  components; its other keys (the ARKit expressions) are off;
* any other mesh: muted keys, keys a driver sets, and keys named like facial expressions (ARKit's
  52 blendshapes in any spelling, visemes, words such as smile or blink) are off; the rest fit.

A fit then sends the fit and locked keys as components (locked ones keep their values, bit for
bit), the fit ones as the keys to move and, on a user's rig, each fitted key's slider range as
its bounds; off keys are not part of the shape the fit sees. No bpy import: objects come in.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass

ROLES = ("fit", "locked", "off")
PROP_ROLES = "sdshead_roles"
PROP_COMPONENTS = "sdshead_components"   # set by scene.build_head: the bundle's component names

ARKIT_BLENDSHAPES = (
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight",
    "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen",
    "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight",
    "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight", "tongueOut",
)
# words that name an expression, a viseme or a corrective rather than an identity shape
EXPRESSION_WORDS = ("smile", "frown", "blink", "wink", "sneer", "pucker", "grin", "kiss", "pout", "snarl",
                    "viseme", "phoneme", "expression", "emotion", "happy", "angry", "surprise", "disgust",
                    "fear", "sad", "jawopen", "mouthopen", "eyeclose", "eyesclosed", "corrective", "tongue")
_SIDE = re.compile(r"[._\s-]+(l|r)$", re.IGNORECASE)
_VISEME = re.compile(r"^(v_|vrc\.v_|viseme_?)", re.IGNORECASE)


def _normalised(name: str) -> str:
    """lower case letters and digits only, with a trailing _L/_R (or .L, " R") spelt left/right."""
    side = _SIDE.search(name)
    if side and len(name) > len(side.group(0)):
        name = name[:side.start()] + ("left" if side.group(1).lower() == "l" else "right")
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ARKIT = {_normalised(name) for name in ARKIT_BLENDSHAPES}


def is_expression_name(name: str) -> bool:
    """Whether a shape key's name says it is a facial expression (ARKit, a viseme, smile, blink...)."""
    normalised = _normalised(name)
    return (normalised in _ARKIT or bool(_VISEME.match(name))
            or any(word in normalised for word in EXPRESSION_WORDS))


def driven_keys(obj) -> set[str]:
    """Names of the shape keys whose value a driver sets."""
    animation = getattr(obj.data.shape_keys, "animation_data", None)
    found = set()
    for curve in (animation.drivers if animation is not None else ()):
        match = re.fullmatch(r'key_blocks\["(.+)"\]\.value', curve.data_path)
        if match:
            found.add(match.group(1).replace('\\"', '"'))
    return found


def built_head_components(obj) -> list[str] | None:
    """The components a head built from a bundle recorded, when all its keys are still there."""
    stored = obj.get(PROP_COMPONENTS)
    blocks = obj.data.shape_keys.key_blocks
    try:
        names = json.loads(stored) if isinstance(stored, str) else None
    except json.JSONDecodeError:
        return None
    if isinstance(names, list) and names and all(isinstance(n, str) and n in blocks for n in names):
        return names
    return None


def _default_role(kb, components: set[str] | None, driven: set[str]) -> str:
    if components is not None:
        return "fit" if kb.name in components else "off"
    return "off" if kb.mute or kb.name in driven or is_expression_name(kb.name) else "fit"


def default_roles(obj) -> dict[str, str]:
    """Every key but the reference key -> its default role (see the module docstring)."""
    keys = obj.data.shape_keys
    components, driven = built_head_components(obj), driven_keys(obj)
    components = None if components is None else set(components)
    return {kb.name: _default_role(kb, components, driven) for kb in keys.key_blocks
            if kb.name != keys.reference_key.name}


def stored_roles(obj) -> dict[str, str]:
    try:
        stored = json.loads(obj.get(PROP_ROLES, "{}"))
    except (json.JSONDecodeError, TypeError):
        return {}
    return {k: v for k, v in stored.items() if isinstance(k, str) and v in ROLES} if isinstance(stored, dict) else {}


def roles(obj) -> dict[str, str]:
    """Every key but the reference key -> its role, in the keys' order: the user's choice, else the default."""
    chosen = stored_roles(obj)
    return {name: chosen.get(name, role) for name, role in default_roles(obj).items()}


def set_roles(obj, names, role: str) -> None:
    """Give `names` the role `role` (kept on the object, so it is saved with the file)."""
    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    chosen = stored_roles(obj)
    chosen.update({name: role for name in names})
    obj[PROP_ROLES] = json.dumps(chosen)


def matching(names, patterns) -> list[str]:
    """The names any of the glob patterns matches (case-insensitive), in their order."""
    patterns = [p.strip().lower() for p in patterns if p.strip()]
    return [name for name in names if any(fnmatch.fnmatchcase(name.lower(), p) for p in patterns)]


def with_patterns(current: dict[str, str], keys: list[str] | None, lock: list[str] | None) -> dict[str, str]:
    """Headless --keys / --lock on top of the object's roles: the keys `keys` matches fit and the
    other fitted ones are locked; then the keys `lock` matches are locked."""
    result = dict(current)
    if keys:
        chosen = set(matching(current, keys))
        if not chosen:
            raise ValueError(f"--keys {','.join(keys)}: matches none of the shape keys")
        result = {name: "fit" if name in chosen else ("locked" if role == "fit" else role)
                  for name, role in result.items()}
    if lock:
        locked = set(matching(current, lock))
        if not locked:
            raise ValueError(f"--lock {','.join(lock)}: matches none of the shape keys")
        result = {name: "locked" if name in locked else role for name, role in result.items()}
    return result


@dataclass(frozen=True)
class FitPlan:
    """What a fit of this head sends: the bundle's components (fit and locked keys, in key order),
    the keys to move, and per fitted key its slider range (None: the bundle's sigma prior)."""

    components: list[str]
    fit: list[str]
    bounds: dict[str, list[float]] | None
    built_head: bool


def plan(obj, key_roles: dict[str, str]) -> FitPlan:
    components = [name for name, role in key_roles.items() if role != "off"]
    fit = [name for name in components if key_roles[name] == "fit"]
    built = built_head_components(obj) is not None
    bounds = None
    if not built:
        blocks = obj.data.shape_keys.key_blocks
        bounds = {name: [float(blocks[name].slider_min), float(blocks[name].slider_max)] for name in fit}
    return FitPlan(components, fit, bounds, built)


def role_of(obj, key_name: str) -> str:
    """One key's role, without working out every key's (the panel's list draws row by row)."""
    chosen = stored_roles(obj).get(key_name)
    if chosen is not None:
        return chosen
    components = built_head_components(obj)
    return _default_role(obj.data.shape_keys.key_blocks[key_name], None if components is None else set(components),
                         driven_keys(obj))


def reset_roles(obj) -> None:
    """Forget the user's choices: every key gets its default role again."""
    if PROP_ROLES in obj:
        del obj[PROP_ROLES]
