"""dist.launch_local: a rank that dies without reporting fails the launch at once, not after its timeout."""
from __future__ import annotations

import time

import pytest


def test_a_rank_killed_before_it_reports_fails_the_launch_within_seconds():
    from megatron_matpo.dist import launch_local
    from tests.dist_checks import die_on_rank_1

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"lost ranks \(exit codes: \[None, 3\], ranks gone without a result \[1\]\)"):
        launch_local(die_on_rank_1, 2, timeout_s=1800)
    assert time.monotonic() - t0 < 120  # spawn and imports; the timeout is 30 min
