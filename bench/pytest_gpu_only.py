"""pytest plugin for bench/gpu_checks.sh: keeps only the tests that need a CUDA GPU.

    PYTHONPATH=bench python -m pytest -p pytest_gpu_only -m "" tests/...

A test is kept when one of its skip/skipif markers names CUDA or a GPU (in its reason or
condition string), e.g. `@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a
CUDA GPU")`, or when it carries a `gpu`/`cuda` marker. New GPU tests written that way are picked
up without editing the script. The others are deselected (reported as such by pytest).
"""

from __future__ import annotations

import re

GPU_WORDS = re.compile(r"\bcuda\b|\bgpus?\b", re.IGNORECASE)


def needs_gpu(item) -> bool:
    if item.get_closest_marker("gpu") or item.get_closest_marker("cuda"):
        return True
    for name in ("skipif", "skip"):
        for mark in item.iter_markers(name):
            texts = [str(mark.kwargs.get("reason", ""))] + [a for a in mark.args if isinstance(a, str)]
            if any(GPU_WORDS.search(t) for t in texts):
                return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_gpu(item)]
    drop = [item for item in items if not needs_gpu(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
