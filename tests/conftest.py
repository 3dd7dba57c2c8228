"""Guards shared by both suites (stdlib only: loaded in .venv and in .venv-bpy).

Tests never touch the network: hub libraries stay offline, and any socket connection to a
non-local address fails loudly instead of hanging on a retry. Backend subprocesses started by
tests share two cores with the test process (and Blender): one intra-op torch thread each keeps
them from spinning against one another, which otherwise makes small ops tens of times slower.
"""
from __future__ import annotations

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

_real_connect = socket.socket.connect


def _local_only_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise RuntimeError(f"test tried to open a network connection to {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _local_only_connect
