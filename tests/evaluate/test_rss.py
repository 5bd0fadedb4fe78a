"""bench's memory figure is the process's resident set size (psutil), as the kernel reports it."""

import os
from pathlib import Path

import pytest

from llmprune.evaluate.bench import _rss


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux /proc")
def test_rss_is_the_resident_set_size():
    before = _rss()
    block = bytearray(64 * 2**20)  # touched: resident
    statm = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    after = _rss()
    assert abs(after - statm) < 8 * 2**20 and after - before >= 60 * 2**20
    del block
