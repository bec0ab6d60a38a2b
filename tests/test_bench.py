"""The benchmark's quick mode runs end to end (so it never rots) and reports consistent figures."""

import dataclasses
import json

import pytest

from csm_multi import bench


def test_quick_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--batch", "1", "2", "--frames", "3", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    engines = ("ours (eager)", "weight products only (floor)", "transformers")  # tiny: nothing to pack
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in engines for b in (1, 2)}
    rows = [r for r in rows if r["engine"] != engines[1]]
    for r in rows:
        assert r["frames"] == 3
        assert r["ms_per_frame"] > 0
        assert abs(r["rtf"] - r["ms_per_frame"] / 80) < 1e-3
        assert abs(r["frames_per_s"] - r["batch"] * 1000 / r["ms_per_frame"]) / r["frames_per_s"] < 0.01
        assert len(r["ms_rounds"]) == 2 and r["ms_per_frame"] == min(r["ms_rounds"])  # lower median of two
    assert all(r["ttfa_ms"] > 0 for r in rows if r["engine"].startswith("ours"))
    printed = capsys.readouterr().out
    assert "| ours (eager) | tiny float32 | 1 |" in printed and "speed-up vs transformers" in printed


def test_rounds_interleave_settings_and_keep_medians():
    calls = []

    def timer(engine, times):
        times = iter(times)

        def t():
            calls.append(engine)
            return bench.Row(engine, "s", 1, 4, next(times), 0, 0, 0, None, None)
        return t

    sched = bench._Rounds(3)
    hf, ours = ("transformers", "none", 1), ("ours", "none", 1)
    sched.phase({hf: timer("transformers", [30, 10, 20]), ours: timer("ours", [5, 10, 8])})
    assert calls == ["transformers", "ours"] * 3  # in turn, round after round
    sched.phase({hf: timer("transformers", [15, 25, 35])})  # a later phase adds rounds
    ours_row, hf_row = sched.rows()  # transformers' rows come last
    assert (ours_row.engine, ours_row.ms_per_frame, ours_row.ms_rounds) == ("ours", 8, [5, 10, 8])
    assert (hf_row.engine, hf_row.ms_per_frame, hf_row.ms_rounds) == ("transformers", 20, [30, 10, 20, 15, 25, 35])
    # speed-ups pair each of our rounds with transformers' round beside it, not with its median
    assert ours_row.speedup_rounds == ours_row.speedup_same_setting_rounds == [6.0, 1.0, 2.5]
    result = {"preset": "p", "dtype": "float32", "rows": [dataclasses.asdict(r) for r in (ours_row, hf_row)]}
    assert "| ours | s | 1 | 8 | " in bench.table(result) and "| 2.50x | 2.50x |" in bench.table(result)


def test_int8_rows_compare_like_with_like(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--frames", "2", "--quantize", "int8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    engines = ("ours (eager)", "weight products only (floor)", "transformers")
    assert {(r["engine"], r["setting"]) for r in rows} == {
        (engine, f"tiny {setting}") for engine in engines for setting in ("float32", "int8 weights")}


def test_floor_makes_every_weight_product_of_a_frame_once(tiny_model):
    """bench_products calls exactly the products a generated frame calls, float and int8."""
    import copy

    import torch

    from csm_multi.fused import fuse_layers, pack_linears
    from csm_multi.generate import Sampler, generate_frame
    from csm_multi.quant import quantize

    def count(model, run):
        calls = []
        mods = [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
        hooks = [m.register_forward_hook(lambda m, i, o: calls.append(id(m))) for m in mods]
        logits = model.codebook_logits
        model.codebook_logits = lambda i, h: calls.append(("head", i)) or logits(i, h)
        try:
            run()
        finally:
            for h in hooks:
                h.remove()
            del model.codebook_logits
        return sorted(map(str, calls))

    fused = fuse_layers(copy.deepcopy(tiny_model))
    packed = pack_linears(fuse_layers(copy.deepcopy(tiny_model)), min_elements=0)
    assert packed.packed
    for model in (tiny_model, fused, quantize(copy.deepcopy(fused)), packed):
        tokens = torch.zeros(1, 1, model.config.frame_width, dtype=torch.long)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        model.drop_caches()  # fresh caches, whatever mode earlier tests made them in
        with torch.inference_mode():
            model.setup_caches(1)
            model.reset_caches()
            frame = count(model, lambda: generate_frame(model, tokens, mask, torch.zeros(1, 1, dtype=torch.long),
                                                        Sampler(0.9, 5, torch.Generator().manual_seed(0))))
            floor = count(model, lambda: bench.bench_products(model, 1, repeats=1))
        model.drop_caches()
        assert len(frame) > model.config.audio_num_codebooks
        assert floor == sorted(frame + frame)  # a warm-up pass and one timed pass


def test_transformers_int8_codebook_heads_match_its_float_heads():
    import torch
    from transformers.models.csm.modeling_csm import CsmCodebooksHead

    torch.manual_seed(0)
    ref = CsmCodebooksHead(hidden_size=64, num_codebooks=5, vocab_size=96)
    torch.nn.init.normal_(ref.weight, std=0.1)
    q = bench._Int8CodebooksHead(ref.weight.detach())
    h = torch.randn(2, 3, 64)
    idx = torch.tensor([2, 3, 4])  # the depth decoder asks for codebooks 2..4 at positions 0..2
    with torch.no_grad():
        want, got = ref(h, idx), q(h, idx)
    assert got.shape == want.shape == (2, 3, 96)
    assert float((got - want).norm() / want.norm()) < 0.03


def test_quick_serving_benchmark_runs_and_its_figures_agree(tmp_path, capsys):
    from csm_multi import serve_bench

    out = tmp_path / "serve.json"
    result = serve_bench.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    [row] = result["rows"]
    assert row["concurrent"] == 4 and row["frames"] == 6 and row["audio_s"] == 4 * 6 * 0.08
    assert abs(row["serial_audio_s_per_s"] - row["audio_s"] / row["serial_s"]) < 1e-2
    assert abs(row["concurrent_audio_s_per_s"] - row["audio_s"] / row["concurrent_s"]) < 1e-2
    assert row["ttfa_alone_ms"] > 0 and row["ttfa_joining_ms"] > 0
    assert max(result["scheduler"]["batch_sizes"]) > 1  # the "at once" runs really shared steps
    assert "| 4 | 6 |" in capsys.readouterr().out


def test_quick_end_to_end_benchmark_times_every_stage_of_every_line(tmp_path, capsys):
    """`python -m csm_multi.e2e --quick`: each case renders the 4-line script; the stages of ours add
    up to the total, every line has a time to first audio, the prefix cache leaves the same frames to
    generate, and transformers is timed for the same prompt sizes and frame counts."""
    from csm_multi import e2e

    out = tmp_path / "e2e.json"
    assert e2e.main(["--quick", "--line-s", "0.4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "| transformers |" in capsys.readouterr().out
    cases = result["modes"]["fp32"]
    assert set(cases) == {"ours, prefix cache", "ours, no prefix cache", "ours, fast mode (4 lines batched)",
                          "transformers"}
    cached, full = cases["ours, prefix cache"], cases["ours, no prefix cache"]
    for case in (cached, full):
        assert len(case["ttfa_s"]) == len(case["lines"]) == result["script_lines"] == 4
        assert abs(sum(case["stages_s"].values()) - case["total_s"]) < 0.01
        assert all(v >= 0 for v in case["stages_s"].values())
        assert case["stages_s"]["watermark"] > 0  # the watermark is on and timed
        assert case["audio_s"] == 4 * 0.4 and case["frames"] == [5, 5, 5, 5]
    # both render the same prompts (same sizes) and the later lines' prompts grow with the dialogue
    assert cached["prompt_positions"] == full["prompt_positions"]
    assert cached["prompt_positions"][3] > cached["prompt_positions"][0]
    assert cases["transformers"]["audio_s"] == full["audio_s"]
    assert cases["transformers"]["stages_s"]["generate"] > 0
    assert len(cached["speedup_vs_transformers_rounds"]) == 1


def test_overlap_case_times_the_watermark_beside_the_next_line_and_in_turn(tmp_path, capsys):
    """`python -m csm_multi.e2e --quick --overlap`: each way (serial, beside it on 1 or 2 threads) is
    timed once per round, and the ratios are serial over each overlapped way, per round."""
    from csm_multi import e2e

    out = tmp_path / "e2e.json"
    assert e2e.main(["--quick", "--line-s", "0.4", "--no-transformers", "--no-fast", "--overlap",
                     "--json", str(out)]) == 0
    overlap = json.loads(out.read_text())["modes"]["fp32"]["overlap"]
    assert set(overlap["seconds_rounds"]) == set(e2e.OVERLAP_WAYS)
    assert all(len(t) == 1 and t[0] > 0 for t in overlap["seconds_rounds"].values())
    serial = overlap["seconds_rounds"]["serial"][0]
    for way, ratio in overlap["serial_over_overlapped_rounds"].items():
        assert ratio == [round(serial / overlap["seconds_rounds"][way][0], 3)]
    assert overlap["frames"] == 5 and overlap["audio_s"] == 0.4
    assert "watermark beside line i+1's generation, serial / overlapped per round" in capsys.readouterr().out


@pytest.mark.slow
def test_end_to_end_benchmark_through_the_app(tmp_path):
    """`python -m csm_multi.e2e --quick --app-only`: the same 4-line script rendered by a visitor of the
    real app (a subprocess, gradio_client): two voices saved, a warm-up render, then a timed one. The
    page's shortest line (1 s plus the 0.8 s allowance: 22 frames, random weights never end early) is
    asked for, as --quick's 0.8 s lines are shorter."""
    from csm_multi import e2e

    out = tmp_path / "e2e-app.json"
    assert e2e.main(["--quick", "--app-only", "--json", str(out)]) == 0
    case = json.loads(out.read_text())["modes"]["fp32"]
    assert set(case) == {e2e.APP_CASE}
    app = case[e2e.APP_CASE]
    assert app["max_line_s_asked"] == 1.0 and len(app["total_rounds_s"]) == 1
    assert app["audio_s"] == pytest.approx(4 * 22 * 0.08, abs=0.05)  # the page says it to 0.1 s
    assert app["rtf"] == round(app["total_s"] / app["audio_s"], 3) and app["server_peak_rss_mb"] > 0
