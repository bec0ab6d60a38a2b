import pytest
import torch

from csm_multi.config import get_preset
from csm_multi.frames import audio_frames, format_text, is_eos, text_frames
from csm_multi.generate import Sampler, iterate_frames
from csm_multi.model import CSM


def test_csm_1b_has_reference_names_and_shapes():
    cfg = get_preset("csm-1b")
    with torch.device("meta"):
        model = CSM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Names and shapes as in the reference checkpoint (SesameAILabs/csm models.py).
    assert shapes["text_embeddings.weight"] == (128_256, 2048)
    assert shapes["audio_embeddings.weight"] == (2051 * 32, 2048)
    assert shapes["projection.weight"] == (1024, 2048)
    assert shapes["codebook0_head.weight"] == (2051, 2048)
    assert shapes["audio_head"] == (31, 1024, 2051)
    assert shapes["backbone.layers.15.attn.q_proj.weight"] == (2048, 2048)
    assert shapes["backbone.layers.15.attn.k_proj.weight"] == (512, 2048)  # 8 KV heads x 64
    assert shapes["backbone.layers.0.mlp.w1.weight"] == (8192, 2048)
    assert shapes["backbone.layers.0.sa_norm.scale"] == (2048,)
    assert shapes["decoder.layers.3.attn.k_proj.weight"] == (256, 1024)  # 2 KV heads x 128
    assert shapes["decoder.layers.3.mlp.w2.weight"] == (1024, 8192)
    assert "backbone.layers.16.attn.q_proj.weight" not in shapes
    assert "decoder.layers.4.attn.q_proj.weight" not in shapes
    assert shapes["backbone.norm.scale"] == (2048,) and shapes["decoder.norm.scale"] == (1024,)
    assert not any("tok_embeddings" in k or k.startswith(("backbone.output", "decoder.output")) for k in shapes)
    n = sum(v.numel() for v in model.parameters())
    assert 1.5e9 < n < 1.7e9, n


def test_text_and_audio_frames():
    tokens, mask = text_frames([128000, 10, 20, 128001], 32)
    assert tokens.shape == mask.shape == (4, 33)
    assert tokens[:, -1].tolist() == [128000, 10, 20, 128001]
    assert mask[:, -1].all() and not mask[:, :-1].any() and not tokens[:, :-1].any()

    codes = torch.randint(1, 2048, (32, 5))
    tokens, mask = audio_frames(codes)
    assert tokens.shape == (6, 33)
    assert torch.equal(tokens[:5, :32], codes.T)
    assert not tokens[5].any(), "the appended EOS frame is all zeros"
    assert mask[:, :32].all() and not mask[:, 32].any()
    assert format_text(3, "Hi.") == "[3]Hi."


def test_is_eos():
    frame = torch.zeros(2, 32, dtype=torch.long)
    frame[1, 7] = 5
    assert is_eos(frame).tolist() == [True, False]


def test_embed_frames_respects_mask(tiny_model):
    tokens = torch.randint(0, 2051, (1, 3, 33))
    mask = torch.zeros(1, 3, 33, dtype=torch.bool)
    out = tiny_model.embed_frames(tokens, mask)
    assert out.shape == (1, 3, 64) and not out.any()
    mask[0, 0, -1] = True
    tokens[0, 0, -1] = 5
    out = tiny_model.embed_frames(tokens, mask)
    assert torch.allclose(out[0, 0], tiny_model.text_embeddings.weight[5])


def _generate(model, seed, frames=6, topk=50):
    tokens, mask = text_frames([128000, 1, 2, 3, 128001], 32)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        return torch.stack([c[0] for c, _ in iterate_frames(model, tokens[None], mask[None],
                                                             Sampler(0.9, topk, gen), frames)])


def test_same_seed_same_codes(tiny_model):
    a, b, c = _generate(tiny_model, 7), _generate(tiny_model, 7), _generate(tiny_model, 8)
    assert a.shape == (6, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((a >= 0) & (a < 2051)).all()


class _ScriptedHead(torch.nn.Module):
    """Codebook-0 head that picks a fixed id per frame: `ids[frame]` (0 = EOS when all codebooks agree)."""

    def __init__(self, ids, vocab):
        super().__init__()
        self.ids, self.vocab, self.calls = ids, vocab, 0
        self.weight = torch.nn.Parameter(torch.zeros(1))  # dtype probe used by backbone_step

    def forward(self, h):
        logits = torch.full((h.size(0), self.vocab), -1e4)
        logits[:, self.ids[min(self.calls, len(self.ids) - 1)]] = 1e4
        self.calls += 1
        return logits


@pytest.mark.parametrize("eos_at", [0, 2])
def test_eos_frame_stops_generation(tiny_config, eos_at):
    model = CSM(tiny_config).init_random_(seed=3).eval()
    ids = [7] * eos_at + [0]
    model.codebook0_head = _ScriptedHead(ids, tiny_config.audio_vocab_size)
    vocab = tiny_config.audio_vocab_size

    def later_codebooks(i, h):  # the later codebooks copy codebook 0's choice of "EOS or not"
        logits = torch.full((h.size(0), vocab), -1e4)
        logits[:, 0 if model.codebook0_head.ids[model.codebook0_head.calls - 1] == 0 else 3] = 1e4
        return logits

    model.codebook_logits = later_codebooks
    tokens, mask = text_frames([128000, 1, 128001], 32)
    with torch.inference_mode():
        frames = list(iterate_frames(model, tokens[None], mask[None], Sampler(1.0, 1), 20))
    assert len(frames) == eos_at, "generation stops at the all-zero frame, which is not yielded"
    assert all(int(f[0][0, 0]) == 7 for f in frames)


def test_batched_rows_match_single_rows(tiny_model):
    """Left-padded batch rows generate the same greedy codes as each prompt alone."""
    prompts = [text_frames([128000, 1, 2, 3, 4, 5, 128001], 32), text_frames([128000, 9, 128001], 32)]
    singles = []
    for t, m in prompts:
        with torch.inference_mode():
            singles.append(torch.stack([c[0] for c, _ in iterate_frames(tiny_model, t[None], m[None],
                                                                        Sampler(1.0, 1), 4)]))
    longest = max(t.size(0) for t, _ in prompts)
    tokens = torch.zeros(2, longest, 33, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    pad = torch.tensor([longest - t.size(0) for t, _ in prompts])
    for row, (t, m) in enumerate(prompts):
        tokens[row, pad[row]:], mask[row, pad[row]:] = t, m
    with torch.inference_mode():
        batch = torch.stack([c for c, _ in iterate_frames(tiny_model, tokens, mask, Sampler(1.0, 1), 4, pad)])
    tiny_model.setup_caches(1)
    for row in range(2):
        assert torch.equal(batch[:, row], singles[row]), row


@pytest.mark.parametrize("topk", [1, 5])
def test_sampler_is_greedy_at_topk_1(topk):
    from csm_multi.sampling import sample_topk

    logits = torch.randn(4, 100)
    ids = torch.cat([sample_topk(logits, topk, 0.7, torch.Generator().manual_seed(i)) for i in range(20)], dim=1)
    top = torch.topk(logits, topk).indices
    assert all(i in top[row] for row in range(4) for i in ids[row].tolist())
    if topk == 1:
        assert (ids == logits.argmax(-1, keepdim=True)).all()


def test_trimmed_attention_gives_the_untrimmed_codes(tiny_config):
    """CPU caches attend over the filled slots only; the codes equal full-window attention's."""
    model = CSM(tiny_config).init_random_(seed=4).eval()
    tokens, mask = text_frames([128000, 3, 1, 4, 1, 5, 128001], 32)
    runs = []
    for trim in (True, False):
        model.setup_caches(1)
        model.trim_kv = trim
        with torch.inference_mode():
            runs.append(torch.stack([c[0] for c, _ in iterate_frames(model, tokens[None], mask[None],
                                                                     Sampler(0.9, 50, torch.Generator().manual_seed(3)), 8)]))
        kv = model.backbone.layers[0].attn.kv_cache
        assert kv.trim is trim and kv.filled == tokens.size(0) + 7
    assert torch.equal(runs[0], runs[1])


def test_per_row_generators_draw_what_each_row_draws_alone():
    from csm_multi.sampling import sample_topk

    logits = torch.randn(3, 500)
    seeds = [5, 6, 7]
    together = sample_topk(logits, 50, 0.9, [torch.Generator().manual_seed(s) for s in seeds])
    alone = torch.cat([sample_topk(logits[i:i + 1], 50, 0.9, torch.Generator().manual_seed(s))
                       for i, s in enumerate(seeds)])
    assert torch.equal(together, alone)
    # one shared generator draws differently for rows after the first (the stream is shared)
    shared = sample_topk(logits, 50, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(shared[:1], alone[:1])
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_topk(logits, 50, 0.9, [torch.Generator(), torch.Generator()])
