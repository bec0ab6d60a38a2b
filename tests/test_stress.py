"""Load: 20 gradio_client visitors at once against the app (tiny preset, real queue settings).

Every call completes or gets a clear "queue is full" answer; no visitor sees another's voices; the
studio's LRU of open libraries stays at its size. Figures (latency, RSS) are printed by
`python -m csm_multi.stress`, never asserted here.
"""

import pytest

pytest.importorskip("gradio_client")
from csm_multi import stress

CLIENTS, LIBRARIES = 20, 8  # more visitors than open libraries, so the LRU must evict


@pytest.mark.slow
def test_twenty_visitors_at_once(tmp_path):
    r = stress.run(clients=CLIENTS, requests=1, line_s=1, clip_s=1.2, timeout_s=120, deadline_s=300,
                   libraries_in_memory=LIBRARIES, workdir=tmp_path)
    print(stress.format_report(r))
    assert r["hung_clients"] == 0
    assert {k: r["errors"][k] for k in ("failed", "timeout", "mixed")} == {"failed": 0, "timeout": 0, "mixed": 0}, \
        r["error_samples"]
    # the scheduler's queue (64 places) and the page's concurrency are sized for this: nobody is refused
    assert r["errors"]["busy"] == 0 and r["errors"]["gave_up"] == 0, r["error_samples"]
    assert r["alone_s"] > 0 and r["audio_s"] > 0 and r["max_batch"] is None
    ep = r["endpoints"]
    for name in ("connect", "add_profile", "list_profiles", "status"):  # each visitor: an answer per step
        assert ep[name]["ok"] + ep[name].get("gave_up", 0) == CLIENTS, (name, ep[name])
    assert ep["render_script"]["ok"] + ep["render_script"].get("gave_up", 0) == ep["add_profile"]["ok"]
    assert ep["add_profile"]["ok"] > 0 and ep["render_script"]["ok"] > 0
    assert r["statuses"] == ep["status"]["ok"]
    assert r["libraries"] == {"max_open": LIBRARIES, "limit": LIBRARIES}  # full, never above its size
    assert r["profile_cache"]["max_size"] <= r["profile_cache"]["limit"] == 32


def test_main_prints_and_writes_json(tmp_path, monkeypatch, capsys):
    fake = {"clients": 1, "requests_per_client": 1, "line_s": 1.0, "wall_s": 2.0, "completed_requests": 4,
            "requests_per_s": 2.0, "hung_clients": 0,
            "endpoints": {e: {"ok": 1, "p50_s": 0.1, "p95_s": 0.2, "max_s": 0.3} for e in stress.ENDPOINTS},
            "errors": {"busy": 1, "gave_up": 0, "failed": 0, "timeout": 0, "mixed": 0},
            "error_samples": {"busy": "render_script: Queue is full! Please try again."},
            "server_rss_mb": {"after_start": 900, "peak": 1000}, "libraries": {"max_open": 1, "limit": 64},
            "profile_cache": {"max_size": 1, "limit": 32}, "statuses": 1}
    seen = {}
    monkeypatch.setattr(stress, "run", lambda *a, **k: seen.update(args=a, kwargs=k) or fake)
    out = tmp_path / "r.json"
    stress.main(["--clients", "3", "--requests", "2", "--libraries-in-memory", "4", "--json", str(out)])
    assert seen["args"][:2] == (3, 2) and seen["kwargs"] == {"libraries_in_memory": 4}
    text = capsys.readouterr().out
    assert "2.00 requests/s" in text and "busy (queue full) 1" in text and "1000 MB peak" in text
    assert out.read_text().startswith("{") and '"peak": 1000' in out.read_text()


def test_compare_runs_batched_and_serial_in_one_run_and_prints_the_ratios(tmp_path, monkeypatch, capsys):
    def fake_run(*args, max_batch=None, **kwargs):
        wall = 10.0 if max_batch == 8 else 25.0
        return {"clients": 8, "requests_per_client": 1, "line_s": 1.0, "wall_s": wall, "completed_requests": 32,
                "requests_per_s": 32 / wall, "hung_clients": 0, "max_batch": max_batch, "alone_s": 2.5,
                "audio_s": 8.0, "audio_s_per_s": 8.0 / wall,
                "endpoints": {e: {"ok": 8, "p50_s": wall / 2, "p95_s": wall, "max_s": wall} for e in stress.ENDPOINTS},
                "errors": {"busy": 0, "gave_up": 0, "failed": 0, "timeout": 0, "mixed": 0}, "error_samples": {},
                "server_rss_mb": {"after_start": 900, "peak": 1000}, "libraries": {"max_open": 8, "limit": 64},
                "profile_cache": {"max_size": 1, "limit": 32}, "statuses": 8}

    calls = []
    monkeypatch.setattr(stress, "run", lambda *a, **k: calls.append(k.get("max_batch")) or fake_run(*a, **k))
    out = tmp_path / "c.json"
    report = stress.main(["--clients", "8", "--compare", "--json", str(out)])
    assert calls == [8, 1]
    assert report["ratios"]["wall_speedup"] == 2.5 and report["ratios"]["audio_throughput_gain"] == 2.5
    assert report["ratios"]["batched_wall_over_alone"] == 4.0 and report["ratios"]["serial_wall_over_alone"] == 10.0
    text = capsys.readouterr().out
    assert "--max-batch 8: 10.0 s" in text and "--max-batch 1: 25.0 s" in text and "wall 2.5x faster" in text
    assert '"serial"' in out.read_text()
