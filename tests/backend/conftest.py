"""Shared fixtures for backend tests: no network, a tiny random Stable Diffusion on disk."""
from __future__ import annotations

import os
import socket

import pytest

# Tests never touch the network: hub libraries stay offline, and any socket connection to a
# non-local address fails loudly instead of hanging on a retry.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Backend subprocesses started by tests (serve, fit) share two cores with the test process:
# one intra-op thread each keeps them from spinning against one another (see _one_torch_thread).
os.environ["OMP_NUM_THREADS"] = "1"

_real_connect = socket.socket.connect


def _local_only_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise RuntimeError(f"test tried to open a network connection to {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _local_only_connect


@pytest.fixture(scope="session")
def tiny_sd_dir():
    """A tiny SD pipeline saved with save_pretrained, loaded like a real model folder.

    Built once per machine into the user cache (a fitted tiny VAE takes a few seconds to make).
    """
    from sds_backend.tiny_sd import cached_tiny_sd

    return cached_tiny_sd()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tests share two cores with the backend subprocesses they start; a second intra-op thread
    # then spins against them and makes small ops tens of times slower. One thread is steady.
    import torch

    torch.set_num_threads(1)
