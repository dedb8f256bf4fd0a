"""The Train worker's allocator setting (helix_sweep.sweep.worker.keep_freed_memory): a CPU step's
freed multi-MB tensors are reused, not handed back to the kernel and faulted in again next step."""

import subprocess
import sys

import pytest


KEEP_FREED = """
import resource, sys, torch
from helix_sweep.sweep.worker import keep_freed_memory

def faults(grow):  # 6.5 MB temporaries as a step makes them, allocated and freed 20 times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(20):  # each a little larger: glibc's own mmap threshold only follows what was freed
        x = torch.ones(100, 32, 8, 64 + grow + i)
        y = x * 2
        del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults(0)
kept = keep_freed_memory()
faults(20)
print(default, kept, faults(20))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_train_worker_keeps_freed_memory_instead_of_faulting_it_back_in():
    """The Train worker's allocator setting: freed multi-MB tensors are reused, not faulted back in."""
    out = subprocess.run([sys.executable, "-c", KEEP_FREED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    default, kept, after = out.stdout.split()
    assert kept == "True"
    assert int(default) > 20 * 1600  # ~1,600 pages per 6.5 MB tensor, faulted in again each time
    assert int(after) < 1000, (default, after)
