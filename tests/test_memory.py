"""service.memory: a freed big allocation goes back to the OS after the trim."""

import sys

import pytest

from service.memory import release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_returns_freed_small_blocks_to_the_os() -> None:
    # many small objects land in the heap (below the mmap threshold), where free() keeps them
    blocks = [bytearray(4096) for _ in range(60_000)]  # ~240 MB
    keep = blocks[-1]  # the heap top stays in use: only a trim can give back the pages under it
    held = _rss_mb()
    del blocks
    before = _rss_mb()
    assert release_freed_memory()
    after = _rss_mb()
    assert keep is not None and held - after > 150, (held, before, after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_without_collect_still_trims() -> None:
    blocks = [bytearray(4096) for _ in range(60_000)]
    keep = blocks[-1]
    held = _rss_mb()
    del blocks  # no cycle: freed by refcount, no collection needed
    assert release_freed_memory(collect=False)
    assert keep is not None and held - _rss_mb() > 150
