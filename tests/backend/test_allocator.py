"""The allocator tuning the CLI applies: freed memory stays mapped, so the next step reuses it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A fresh process per setting (the tuning is process-wide and cannot be undone). Each cycle
# allocates four 20 MiB buffers, touches them and frees them, as a fit step does with its
# activations: with glibc's defaults the freed top of the heap is trimmed back to the OS and the
# next cycle faults its pages in again; tuned, the next cycle reuses them.
_MEASURE = """
import json, resource, sys
import numpy as np
from sds_backend.app.allocator import tune_for_reuse
tuned = tune_for_reuse() if sys.argv[1] == "tuned" else None
def faults_of_one_cycle():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.empty(20 << 20, np.uint8) for _ in range(4)]
    for block in blocks:
        block.fill(1)
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
faults_of_one_cycle()
print(json.dumps({"tuned": tuned, "again": tune_for_reuse() if tuned else None,
                  "faults": sorted(faults_of_one_cycle() for _ in range(6))[3]}))
"""


def _faults(setting: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", _MEASURE, setting], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_tuned_allocator_reuses_freed_memory_across_steps():
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned["tuned"] and tuned["again"]               # applied, and idempotent
    # 80 MiB touched per cycle: with the defaults it is faulted in again every cycle (about 2000
    # faults here, huge pages included); tuned, the median cycle faults almost nothing
    assert default["faults"] > 500, default
    assert tuned["faults"] < default["faults"] / 10, (default, tuned)
