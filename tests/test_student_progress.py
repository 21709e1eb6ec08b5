"""scripts/student_progress.py: the log-linear fit against closed forms, and the script end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import student_progress  # noqa: E402


def test_fit_recovers_an_exact_log_line_and_refuses_too_few_points():
    n = np.array([1e4, 3e4, 1e5, 7e5])
    a, b = student_progress.fit_log2(n, 0.2 + 0.03 * np.log2(n))
    assert a == pytest.approx(0.2, abs=1e-12) and b == pytest.approx(0.03, abs=1e-13)
    # two points: the line through them
    a2, b2 = student_progress.fit_log2([2.0, 8.0], [1.0, 2.0])
    assert (a2, b2) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError):
        student_progress.fit_log2([5.0, 5.0], [0.1, 0.2])


def test_script_extrapolates_to_the_target_and_draws(tmp_path, capsys):
    pts = [{"label": f"p{i}", "samples": s, "overall": 0.1 + 0.05 * np.log2(s / 1000), "fd_shapes": 10.0,
            "group": "g", "fit": True} for i, s in enumerate([1000, 4000, 16000])]
    pts.append({"label": "off", "samples": 2000, "overall": 0.9, "group": "h", "fit": False})  # not fitted
    man = tmp_path / "m.json"
    man.write_text(json.dumps({"teacher_overall": 0.3, "points": pts}))
    assert student_progress.main(["--manifest", str(man), "--out", str(tmp_path / "p.png")]) == 0
    res = json.loads(capsys.readouterr().out.split("wrote")[0])
    assert res["points_fitted"] == 3 and res["slope_per_doubling"] == pytest.approx(0.05)
    assert res["samples_at_target_extrapolated"] == pytest.approx(16000.0, rel=1e-9)  # 0.1 + 0.05 * 4 = 0.3
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert student_progress.main(["--manifest", str(tmp_path / "none.json")]) == 2
