"""Load: 20 gradio_client visitors at once against the app (tiny preset, real queue settings), each
saving a voice and rendering a 2-line script with it.

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
    assert r["lines"] == 2  # every render answered "Done: 2 lines" (another answer counts as failed)
    ep = r["endpoints"]
    for name in ("connect", "add_profile", "list_profiles", "status"):  # each visitor: an answer per step
        assert ep[name]["ok"] + ep[name].get("gave_up", 0) == CLIENTS, (name, ep[name])
    assert ep["render_script"]["ok"] + ep["render_script"].get("gave_up", 0) == ep["add_profile"]["ok"]
    assert ep["add_profile"]["ok"] > 0 and ep["render_script"]["ok"] > 0
    assert r["statuses"] == ep["status"]["ok"]
    assert r["libraries"] == {"max_open": LIBRARIES, "limit": LIBRARIES}  # full, never above its size
    assert r["profile_cache"]["max_size"] <= r["profile_cache"]["limit"] == 32


@pytest.mark.slow
def test_one_line_renders_count_as_done(tmp_path):
    """With --lines 1 the app answers "Done: 1 line, ..." (singular): every render used to count as failed
    ("unexpected answer"), and the audio throughput came out as None."""
    r = stress.run(clients=2, requests=1, line_s=1, clip_s=1.2, timeout_s=120, deadline_s=300, workdir=tmp_path,
                   lines=1)
    assert r["lines"] == 1 and r["errors"]["failed"] == 0, r["error_samples"]
    assert r["endpoints"]["render_script"]["ok"] == 2 and r["audio_s"] > 0


def test_main_prints_and_writes_json(tmp_path, monkeypatch, capsys):
    fake = {"clients": 1, "requests_per_client": 1, "lines": 2, "line_s": 1.0, "wall_s": 2.0, "completed_requests": 4,
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
    assert seen["args"][:2] == (3, 2) and seen["kwargs"] == {
        "libraries_in_memory": 4, "engine": {"model": "tiny", "quantize": None, "watermark": False}, "lines": 2}
    text = capsys.readouterr().out
    assert "2.00 requests/s" in text and "busy (queue full) 1" in text and "1000 MB peak" in text
    assert "render(s) of 2 lines <= 1 s, tiny, " in text
    assert out.read_text().startswith("{") and '"peak": 1000' in out.read_text()
    fake["engine"] = stress._engine_label({"model": "csm-1b-random", "quantize": "int8", "watermark": True})
    stress.main(["--clients", "3", "--model", "csm-1b-random", "--quantize", "int8", "--watermark"])
    assert seen["kwargs"]["engine"] == {"model": "csm-1b-random", "quantize": "int8", "watermark": True}
    assert "render(s) of 2 lines <= 1 s, csm-1b-random int8, watermark on, " in capsys.readouterr().out
    stress.main(["--clients", "3", "--lines", "1"])
    assert seen["kwargs"]["lines"] == 1
    with pytest.raises(SystemExit):
        stress.main(["--lines", "0"])
    assert "--lines must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_a_visitors_script_has_its_lines_in_its_voice():
    assert stress.script("Voice 3", 0, 2) == "Voice 3: Line 1 of render 0.\nVoice 3: Line 2 of render 0."
    assert stress.script("A", 1, 1) == "A: Line 1 of render 1."


def test_app_server_passes_the_engine_flags(tmp_path):
    """What AppServer starts app.py with: tiny without the watermark unless told otherwise."""
    plain = stress.AppServer(tmp_path / "p", tmp_path / "t", "--max-batch", "2")
    assert (plain.model, plain.extra_args) == ("tiny", ("--no-watermark", "--max-batch", "2"))
    big = stress.AppServer(tmp_path / "p", tmp_path / "t", model="csm-1b-random", quantize="int8", watermark=True)
    assert (big.model, big.extra_args) == ("csm-1b-random", ("--quantize", "int8"))


def test_compare_visits_two_apps_in_turn_and_reports_median_ratios(tmp_path, monkeypatch, capsys):
    order, engines = [], []

    class FakeServer:
        def __init__(self, profiles, tmp, *args, **engine):
            self.batch = int(args[args.index("--max-batch") + 1])
            engines.append(engine)
            self.url = f"http://fake-{self.batch}/"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    def fake_visit(server, clip, clients, requests, line_s, timeout_s, deadline_s, retries=5, tag="", lines=2):
        order.append((server.batch, tag, lines))
        phase = (4.0 if server.batch == 8 else 10.0) + (1.0 if tag == "r1" else 0.0)
        return {"clients": clients, "requests_per_client": 1, "line_s": 1.0, "wall_s": phase + 2,
                "completed_requests": 32, "requests_per_s": 1.0, "hung_clients": 0, "alone_s": 1.0, "audio_s": 8.0,
                "render_wall_s": phase, "audio_s_per_s": 8.0 / phase,
                "endpoints": {e: {"ok": 8, "p50_s": phase / 2, "p95_s": phase, "max_s": phase} for e in stress.ENDPOINTS},
                "errors": {"busy": 0, "gave_up": 0, "failed": 0, "timeout": 0, "mixed": 0}, "error_samples": {},
                "server_rss_mb": {"after_start": 900, "peak": 1000}, "libraries": {"max_open": 8, "limit": 64},
                "profile_cache": {"max_size": 1, "limit": 32}, "statuses": 8}

    monkeypatch.setattr(stress, "AppServer", FakeServer)
    monkeypatch.setattr(stress, "visit", fake_visit)
    out = tmp_path / "c.json"
    report = stress.main(["--clients", "8", "--compare", "--rounds", "2", "--model", "csm-1b-random",
                          "--quantize", "int8", "--json", str(out)])
    assert order == [(8, "r0", 2), (1, "r0", 2), (8, "r1", 2), (1, "r1", 2)]  # interleaved, fresh libraries per round
    assert engines == [{"model": "csm-1b-random", "quantize": "int8", "watermark": False}] * 2  # both apps alike
    assert report["batched"][0]["engine"] == {"model": "csm-1b-random", "quantize": "int8", "watermark": False}
    assert [p["render_phase_speedup"] for p in report["per_round"]] == [2.5, 2.2]
    assert report["ratios"]["render_phase_speedup"] == 2.35  # the median of the rounds
    assert report["ratios"]["batched_renders_over_alone"] == 4.5 and report["ratios"]["serial_renders_over_alone"] == 10.5
    text = capsys.readouterr().out
    assert "median of 2 interleaved rounds: renders done 2.35x sooner" in text
    assert '"per_round"' in out.read_text()
