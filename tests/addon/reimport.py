"""Re-import an exported head in a fresh Blender and report its shape keys and images (add-on e2e tests)."""
from __future__ import annotations

import json
import subprocess
import textwrap

from conftest import BLENDER

IMPORT_SCRIPT = textwrap.dedent('''
    import json, sys
    try:
        import numpy
        if not hasattr(numpy, "bool"):
            numpy.bool = bool  # Blender 3.4's glTF importer with numpy >= 1.24
    except ImportError:
        pass
    import bpy
    path = sys.argv[sys.argv.index("--") + 1]
    bpy.ops.wm.read_factory_settings(use_empty=True)
    if path.endswith(".glb"):
        bpy.ops.import_scene.gltf(filepath=path)
    elif path.endswith(".fbx"):
        bpy.ops.import_scene.fbx(filepath=path)
    else:
        bpy.ops.wm.open_mainfile(filepath=path)
    meshes = [o for o in bpy.data.objects if o.type == "MESH" and o.data.shape_keys is not None]
    obj = meshes[0]
    keys = {kb.name: kb.value for kb in obj.data.shape_keys.key_blocks[1:]}
    sliders = {kb.name: [kb.slider_min, kb.slider_max] for kb in obj.data.shape_keys.key_blocks[1:]}
    muted = [kb.name for kb in obj.data.shape_keys.key_blocks if kb.mute]
    images = []
    for slot in obj.material_slots:
        tree = slot.material.node_tree if slot.material else None
        for node in (tree.nodes if tree else []):
            image = getattr(node, "image", None)
            if image is not None and image.size[0] > 0:
                px = [0.0] * (image.size[0] * image.size[1] * image.channels)
                image.pixels.foreach_get(px)
                images.append({"size": list(image.size), "channels": image.channels, "head": px[:64],
                               "packed": image.packed_file is not None})
    print("RESULT " + json.dumps({"meshes": len(meshes), "keys": keys, "sliders": sliders, "muted": muted, "images": images,
                                  "blender": bpy.app.version_string}))
''')


def reimport(path, env, python=None) -> dict:
    """{meshes, keys: {name: value}, sliders: {name: [min, max]}, muted, images, blender} of the file at `path` opened or imported in a fresh Blender
    (Debian's, or `python` = the bpy wheel's interpreter)."""
    script = path.parent.parent / "import_check.py"
    script.write_text(IMPORT_SCRIPT)
    if python:
        command = [python, str(script), "--", str(path)]
    else:
        command = [BLENDER, "-b", "--factory-startup", "--python-exit-code", "1", "-P", str(script), "--", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
