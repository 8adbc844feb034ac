"""Transparent huge pages for XLA:CPU's host buffers, switched on by re-executing the job.

Every XLA:CPU execution allocates its temporaries afresh (hundreds of MB for a training step of the
tiny config) and glibc serves such sizes with new `mmap`s, so each step touches every page of them
for the first time: ~150,000 minor page faults and ~0.45 s of kernel time per step on the CI-size
machine, 20% of the step's CPU time. glibc's tunable `glibc.malloc.hugetlb=1` makes malloc advise
transparent huge pages for those maps: 2 MB pages, ~1,000 faults per step, steps ~10% faster
(README, "Training"). Tunables are read only when a process starts, hence the re-exec by the
training entry points (`experiments.run`, where it happens before JAX is imported and costs
~0.1 s; `bench_train` and `fp8_vs_bf16`). It is skipped when GLIBC_TUNABLES is already set (set
it to anything, even empty, to opt out) and off Linux; glibc older than 2.35 ignores the tunable.
"""

from __future__ import annotations

import os
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'


def reexec_with_huge_pages(module: str) -> None:
  """Re-runs `python -m <module> <same args>` with GLIBC_TUNABLES set, unless already set."""
  if not sys.platform.startswith('linux') or 'GLIBC_TUNABLES' in os.environ:
    return
  os.environ['GLIBC_TUNABLES'] = TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, '-m', module, *sys.argv[1:]])
