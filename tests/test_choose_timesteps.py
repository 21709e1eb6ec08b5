"""scripts/choose_timesteps.py: the ranking rule (ties, the FD cap and its fallback) and the cap's parsing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import choose_timesteps as ct  # noqa: E402


def _rows(*pairs):
    return [{"timesteps": [i], "overall": o, "fd_shapes": f} for i, (o, f) in enumerate(pairs)]


def test_rank_best_overall_then_fd_within_tie():
    rows = _rows((0.90, 15.0), (0.905, 14.0), (0.85, 10.0))
    assert ct.rank(rows, 0.0)["timesteps"] == [1]  # strict: best overall
    assert ct.rank(rows, 0.01)["timesteps"] == [1]  # 0.90 ties 0.905 but has the higher FD
    assert ct.rank(rows, 0.06)["timesteps"] == [2]  # all tie: lowest FD


def test_ranking_is_rank_applied_to_what_is_left():
    rows = _rows((0.93, 14.2), (0.925, 13.6), (0.91, 13.1), (0.80, 9.0))
    order = [r["timesteps"][0] for r in ct.ranking(rows, 0.01)]
    assert order == [1, 0, 2, 3]  # 0.925 ties 0.93 with lower FD; then 0.93; then 0.91; then 0.80
    assert sorted(order) == [0, 1, 2, 3]


def test_first_within_cap_checks_lazily_in_order():
    rows = _rows((0.93, 1.0), (0.92, 1.0), (0.91, 1.0))
    full = {0: 14.2, 1: 13.9, 2: 13.0}
    seen = []

    def fd(row):
        seen.append(row["timesteps"][0])
        return full[row["timesteps"][0]]

    win, checks = ct.first_within_cap(rows, fd, 14.0)
    assert win["timesteps"] == [1] and seen == [0, 1]  # stops at the first within the cap (inclusive below)
    assert [c["fd_shapes_full"] for c in checks] == [14.2, 13.9]
    seen.clear()
    win, checks = ct.first_within_cap(rows, fd, 13.9)
    assert win["timesteps"] == [1] and seen == [0, 1]  # the cap is inclusive
    seen.clear()
    win, checks = ct.first_within_cap(rows, fd, 12.0)
    assert win["timesteps"] == [2] and seen == [0, 1, 2]  # none within: the lowest full FD
    assert len(checks) == 3


def test_parse_fd_ratios():
    assert ct.parse_fd_ratios(None) == {}
    assert ct.parse_fd_ratios("") == {}
    assert ct.parse_fd_ratios("2=1.1, 4=1.25") == {2: 1.1, 4: 1.25}
    for bad in ("2:1.1", "x=1.1", "2=", "0=1.1", "2=-1", "2=nan", "2=inf"):
        with pytest.raises(ValueError, match="STEPS=RATIO"):
            ct.parse_fd_ratios(bad)


def test_bad_cap_is_a_usage_error_not_a_trace(capsys):
    with pytest.raises(SystemExit) as e:
        ct.main(["--max-fd-ratio", "2:1.1"])
    assert e.value.code == 2
    assert "STEPS=RATIO" in capsys.readouterr().err
