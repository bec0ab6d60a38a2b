"""The CUDA-graph fast path gives the same codes as the plain eager path (GPU only; skipped on CPU)."""

import pytest
import torch

from csm_multi import SamplingConfig
from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import get_preset
from csm_multi.engine import Engine
from csm_multi.frames import text_frames
from csm_multi.generate import FrameGraph, Sampler, iterate_frames
from csm_multi.model import CSM
from csm_multi.text import ByteTokenizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
PROMPT = [128000, 58, 15, 60, 9906, 1070, 13, 128001]


@pytest.fixture(scope="module")
def gpu_model():
    return CSM(get_preset("tiny")).init_random_(seed=1).to("cuda").eval()


def _codes(model, sampler, frames, graph=None, batch=1):
    tokens, mask = text_frames(PROMPT, 32)
    tokens, mask = tokens[None].expand(batch, -1, -1).cuda(), mask[None].expand(batch, -1, -1).cuda()
    with torch.inference_mode():
        return torch.stack([c for c, _ in iterate_frames(model, tokens, mask, sampler, frames, graph=graph)])


@cuda
@pytest.mark.parametrize("topk", [1, 50])
def test_graph_replay_matches_eager_codes(gpu_model, topk):
    gen = torch.Generator(device="cuda")
    sampler = Sampler(0.9, topk, gen, num_codes=2048)
    with torch.inference_mode():
        graph = FrameGraph(gpu_model, 1, sampler)
    gen.manual_seed(5)
    eager = _codes(gpu_model, sampler, 12)
    gen.manual_seed(5)
    fast = _codes(gpu_model, sampler, 12, graph)
    assert eager.shape == fast.shape == (12, 1, 32)
    assert torch.equal(eager, fast)
    gen.manual_seed(5)  # the same graph replays again after reseeding
    assert torch.equal(_codes(gpu_model, sampler, 12, graph), eager)


@cuda
def test_fused_layers_in_the_graph_match_eager_and_torchtune(gpu_model):
    """fused.py's layers captured in the frame graph: the same codes as eager fused frames, and as
    torchtune's layers (fp32 tiny model; greedy, so rounding cannot flip a sample)."""
    import copy

    from csm_multi.fused import fuse_layers

    fused = fuse_layers(copy.deepcopy(gpu_model))
    gen = torch.Generator(device="cuda")
    sampler = Sampler(0.9, 1, gen, num_codes=2048)
    with torch.inference_mode():
        graph = FrameGraph(fused, 1, sampler)
    eager, fast, ref = _codes(fused, sampler, 12), _codes(fused, sampler, 12, graph), _codes(gpu_model, sampler, 12)
    assert eager.shape == (12, 1, 32)
    assert torch.equal(eager, fast) and torch.equal(eager, ref)


@cuda
def test_engine_fast_and_plain_agree(gpu_model):
    codec = MimiCodec(build_mimi(None, device="cuda"))
    fast = Engine(gpu_model, ByteTokenizer(), codec, watermark=False, fast=True)
    plain = Engine(gpu_model, ByteTokenizer(), codec, watermark=False, fast=False)
    sampling = SamplingConfig(seed=9, max_audio_length_ms=800)
    a, b = fast.generate("Hello there.", 0, sampling=sampling), plain.generate("Hello there.", 0, sampling=sampling)
    assert torch.equal(a.codes, b.codes)
    greedy = SamplingConfig(topk=1, seed=0, max_audio_length_ms=400)
    reqs = [("A longer first line here.", 0, []), ("Short.", 1, [])]
    for x, y in zip(fast.generate_batch(reqs, greedy), plain.generate_batch(reqs, greedy)):
        assert torch.equal(x.codes, y.codes)
    # switching batch sizes recaptures instead of replaying a stale graph
    assert torch.equal(fast.generate("Hello there.", 0, sampling=sampling).codes, a.codes)


@cuda
def test_bench_peak_memory_leaves_out_the_other_resident_model(gpu_model):
    """The benchmark keeps ours and transformers' models on the GPU together; each row's peak is its own."""
    from csm_multi import bench

    other = torch.nn.Linear(1024, 1024, device="cuda")  # 4 MiB of weights held by "the other engine"
    held = bench._bytes_on(other, torch.device("cuda"))
    assert held == (1024 * 1024 + 1024) * 4
    alone = bench.bench_ours(gpu_model, torch.device("cuda"), 1, 3).peak_mem_mb
    less = bench.bench_ours(gpu_model, torch.device("cuda"), 1, 3, held=held).peak_mem_mb
    assert alone - less == pytest.approx(held / 2**20, abs=0.5)
