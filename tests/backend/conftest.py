"""Backend fixtures: a tiny Stable Diffusion on disk, one torch thread in the test process."""
from __future__ import annotations

import pytest

# the network guard, offline hub settings and one thread per subprocess: ../conftest.py


@pytest.fixture(scope="session")
def tiny_sd_dir():
    """A tiny SD pipeline saved with save_pretrained, loaded like a real model folder.

    Built once per machine into the user cache (about a second to make, plus the imports).
    """
    from sds_backend.tools.tiny_sd import cached_tiny_sd

    return cached_tiny_sd()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tests share two cores with the backend subprocesses they start; a second intra-op thread
    # then spins against them and makes small ops tens of times slower. One thread is steady.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _allocator_as_in_the_cli():
    # the CLI tunes glibc's allocator before it renders; tests that fit in-process run the same way
    from sds_backend.app.allocator import tune_for_reuse

    tune_for_reuse()
