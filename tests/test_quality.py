"""The CPU-mode quality guard (quality.py): its metrics, its verdict rule, and that teacher forcing
feeds the models exactly what generation would. Tiny preset, a few seconds."""

from __future__ import annotations

import json

import pytest
import torch

from csm_multi import quality
from csm_multi.bench import _random_model
from csm_multi.generate import generate_frame, next_frame_input
from csm_multi.quality import compare, default_eligible, teacher_forced_logits, teacher_inputs, verdict

FRAMES = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny preset's ops are too small to share between threads (and slower so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`python -m csm_multi.quality --quick`, its JSON read back."""
    folder = tmp_path_factory.mktemp("quality")
    path = folder / "quality.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSM_INT4_CACHE", str(folder / "int4"))  # int4, when quant.MODES has it, caches its weights
        assert quality.main(["--quick", "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def teacher(tiny_config):
    return teacher_inputs(tiny_config, FRAMES, seed=0)


def _rows(result):
    return {r["mode"]: r for r in result["rows"]}


def test_quick_run_has_bf16_and_int8_rows_with_metrics_in_range(quick):
    assert quick["preset"] == "tiny" and quick["frames"] == quality.QUICK_FRAMES and quick["machine"]["device"] == "cpu"
    rows = _rows(quick)
    assert {"fp32", "bf16", "none", "int8"} <= set(rows)
    for mode in ("bf16", "none", "int8"):
        r = rows[mode]
        for key in ("backbone_rel_err_median", "backbone_rel_err_max", "decoder_rel_err_median", "decoder_rel_err_max"):
            assert r[key] >= 0
        assert r["backbone_rel_err_median"] <= r["backbone_rel_err_max"]
        for key in ("backbone_topk_overlap", "decoder_topk_overlap", "backbone_greedy_agreement",
                    "decoder_greedy_agreement"):
            assert 0 <= r[key] <= 1
        assert r["verdict"] in ("reference", quality.DEFAULT_VERDICT, quality.OPT_IN)
    assert rows["bf16"]["backbone_rel_err_median"] > 0  # bf16 rounding shows: the bar is not zero
    assert rows["bf16"]["backbone_err_vs_bf16"] == pytest.approx(1.0)
    # The served fp32 path (fused, oneDNN) differs from the reference by float rounding only.
    assert rows["none"]["decoder_rel_err_max"] < 1e-4 and rows["none"]["verdict"] == quality.DEFAULT_VERDICT
    table = quality.table(quick)
    assert table.count("\n") == len(quick["rows"]) + 1 and "int8" in table


def test_fp32_against_itself_is_exact(quick, teacher, tiny_config):
    ref = _rows(quick)["fp32"]
    for key in ("backbone_rel_err_median", "backbone_rel_err_max", "decoder_rel_err_median", "decoder_rel_err_max"):
        assert ref[key] == 0
    for key in ("backbone_topk_overlap", "decoder_topk_overlap", "backbone_greedy_agreement", "decoder_greedy_agreement"):
        assert ref[key] == 1
    # and measured, not just compared with itself: two builds from one seed give the same logits
    a = teacher_forced_logits(_random_model(tiny_config, 3), *teacher)
    b = teacher_forced_logits(_random_model(tiny_config, 3), *teacher)
    m = compare(a, b)
    assert m["backbone_rel_err_max"] == 0 and m["decoder_rel_err_max"] == 0
    assert m["backbone_topk_overlap"] == 1 and m["decoder_greedy_agreement"] == 1


def test_perturbed_weights_move_the_logits_more(teacher, tiny_config):
    ref = teacher_forced_logits(_random_model(tiny_config, 0), *teacher)

    def perturbed(std):
        model = _random_model(tiny_config, 0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * std)
        return compare(ref, teacher_forced_logits(model, *teacher))

    small, large = perturbed(0.001), perturbed(0.01)  # the weights are N(0, 0.02)
    for key in ("backbone_rel_err_median", "decoder_rel_err_median"):
        assert 0 < small[key] < large[key]
    assert large["decoder_topk_overlap"] < small["decoder_topk_overlap"] <= 1


def test_teacher_forcing_feeds_what_generation_would(teacher, tiny_config):
    """The logits equal those `generate_frame` computes when its sampler returns the teacher codes."""
    tokens, mask, codes = teacher
    model = _random_model(tiny_config, 0)
    seen, queue = [], [c.view(1, 1) for c in codes.flatten()]

    def sample(logits):
        seen.append(logits[0, : quality.NUM_CODES].clone())
        return queue.pop(0)

    model.setup_caches(1)
    model.reset_caches()
    step, step_mask, pos = tokens[None], mask[None], torch.arange(tokens.shape[0]).unsqueeze(0)
    with torch.inference_mode():
        for t in range(FRAMES):
            assert torch.equal(generate_frame(model, step, step_mask, pos, sample), codes[t : t + 1])
            step, step_mask = next_frame_input(codes[t : t + 1])
            pos = pos[:, -1:] + 1
    generated = torch.stack(seen).view(FRAMES, tiny_config.audio_num_codebooks, -1)
    torch.testing.assert_close(teacher_forced_logits(model, tokens, mask, codes), generated, rtol=0, atol=0)


def test_teacher_codes_are_seeded_and_never_eos(tiny_config):
    *_, codes = teacher_inputs(tiny_config, 50, seed=5)
    assert codes.shape == (50, tiny_config.audio_num_codebooks)
    assert codes.min() >= 1 and codes.max() < quality.NUM_CODES
    assert torch.equal(codes, teacher_inputs(tiny_config, 50, seed=5)[2])
    assert not torch.equal(codes, teacher_inputs(tiny_config, 50, seed=6)[2])
    with pytest.raises(ValueError):
        teacher_inputs(tiny_config, tiny_config.max_seq_len, seed=0)


def test_verdict_rule_is_within_twice_bf16():
    bf16 = {"backbone_rel_err_median": 0.017, "decoder_rel_err_median": 0.02}

    def mode(backbone, decoder):
        return {"backbone_rel_err_median": backbone, "decoder_rel_err_median": decoder}

    assert default_eligible(mode(0.034, 0.04), bf16)  # exactly 2x on both: still eligible
    assert default_eligible(mode(0.01, 0.001), bf16)
    assert not default_eligible(mode(0.118, 0.02), bf16)  # the int8 figure, 11.8% vs 1.7%
    assert not default_eligible(mode(0.02, 0.041), bf16)  # the decoder alone can rule a mode out
    assert default_eligible(mode(0.05, 0.05), bf16, factor=3.0)
    assert verdict(mode(0.03, 0.03), bf16) == quality.DEFAULT_VERDICT
    assert verdict(mode(0.2, 0.03), bf16) == quality.OPT_IN


def test_compare_counts_topk_overlap_and_agreement_by_hand():
    ref = torch.zeros(2, 3, 100)
    ref[..., :50] = torch.arange(50, 0, -1).float()  # top 50: ids 0..49, argmax 0
    other = ref.clone()
    other[1, 0, 0], other[1, 0, 60] = -1.0, 100.0  # frame 1, codebook 0: id 0 leaves the top 50, 60 comes in first
    m = compare(ref, other)
    assert m["backbone_greedy_agreement"] == 0.5 and m["decoder_greedy_agreement"] == 1
    assert m["backbone_topk_overlap"] == pytest.approx((1 + 49 / 50) / 2) and m["decoder_topk_overlap"] == 1
    assert m["backbone_rel_err_max"] > 0 and m["backbone_rel_err_first"] == 0 and m["decoder_rel_err_max"] == 0


def test_a_mode_without_its_backend_is_skipped_with_the_reason(monkeypatch):
    from csm_multi import quant

    real = quant.quantize

    def quantize(model, mode="int8"):
        if mode == "int4":
            raise ImportError("no int4 kernels here")
        return real(model, mode)

    monkeypatch.setattr(quant, "MODES", ("none", "int8", "int4"))
    monkeypatch.setattr(quant, "quantize", quantize)
    result = quality.run("tiny", 2, modes=["int4"], threads=1, log=lambda line: None)
    rows = _rows(result)
    assert set(rows) == {"fp32", "bf16", "int4"}
    assert rows["int4"]["skipped"] == "ImportError: no int4 kernels here"
    assert "skipped: ImportError" in quality.table(result)
    with pytest.raises(ValueError, match="unknown mode"):
        quality.run("tiny", 2, modes=["int3"], log=lambda line: None)


def test_a_later_run_adds_its_mode_rows_to_a_report(quick):
    extra = json.loads(json.dumps(quick))
    int8 = next(r for r in extra["rows"] if r["mode"] == "int8")
    extra["rows"] = [r for r in extra["rows"] if r["mode"] in ("fp32", "bf16")]
    extra["rows"] += [{**int8, "mode": "int9", "label": "int9 (fused, quant.quantize)"}, {**int8, "verdict": "x"}]
    merged = quality.merge(quick, extra)
    assert [r["mode"] for r in merged["rows"]] == [r["mode"] for r in quick["rows"]] + ["int9"]
    assert _rows(merged)["int8"]["verdict"] == "x"  # a mode in both: the later row wins
    assert merged["added_runs"][0]["modes"] == ["int9", "int8"]
    with pytest.raises(ValueError, match="frames"):
        quality.merge(quick, {**extra, "frames": 99})
    bf16 = next(r for r in extra["rows"] if r["mode"] == "bf16")
    bf16["decoder_rel_err_median"] *= 1.01
    with pytest.raises(ValueError, match="bf16 rows differ"):
        quality.merge(quick, extra)


def test_add_to_rewrites_the_report_and_keeps_the_run(quick, tmp_path):
    report, run_only = tmp_path / "report.json", tmp_path / "run.json"
    report.write_text(json.dumps({**quick, "rows": [r for r in quick["rows"] if r["mode"] != "int8"]}))
    assert quality.main(["--quick", "--modes", "int8", "--json", str(run_only), "--add-to", str(report)]) == 0
    merged, alone = json.loads(report.read_text()), json.loads(run_only.read_text())
    assert [r["mode"] for r in alone["rows"]] == ["fp32", "bf16", "int8"]
    assert [r["mode"] for r in merged["rows"]][-1] == "int8" and len(merged["rows"]) == len(quick["rows"])
    assert _rows(merged)["int8"]["decoder_rel_err_median"] == _rows(quick)["int8"]["decoder_rel_err_median"]
