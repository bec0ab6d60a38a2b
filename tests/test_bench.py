"""The benchmark's quick mode runs end to end (so it never rots) and reports consistent figures."""

import json

from csm_multi import bench


def test_quick_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--batch", "1", "2", "--frames", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["engine"], r["batch"]) for r in rows} == {("ours (eager)", 1), ("ours (eager)", 2), ("transformers", 1),
                                                         ("transformers", 2)}
    for r in rows:
        assert r["frames"] == 3
        assert r["ms_per_frame"] > 0
        assert abs(r["rtf"] - r["ms_per_frame"] / 80) < 1e-3
        assert abs(r["frames_per_s"] - r["batch"] * 1000 / r["ms_per_frame"]) / r["frames_per_s"] < 0.01
    assert all(r["ttfa_ms"] > 0 for r in rows if r["engine"].startswith("ours"))
    printed = capsys.readouterr().out
    assert "| ours (eager) | tiny float32 | 1 |" in printed and "speed-up vs transformers" in printed
