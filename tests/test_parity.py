"""Our CSM against transformers' CsmForConditionalGeneration holding the same random weights
(converted between layouts): fp32 logits match tightly and greedy codes are identical."""

import pytest
import torch

from csm_multi.frames import text_frames
from csm_multi.generate import Sampler, iterate_frames
from csm_multi.hf_compat import hf_model

PROMPT = [128000, 58, 15, 60, 9906, 1070, 13, 128001]  # "[0]Hello there." shaped ids


@pytest.fixture(scope="module")
def pair(tiny_model, tiny_config):
    return tiny_model, hf_model(tiny_model.state_dict(), tiny_config, small_codec=True)


@torch.inference_mode()
def test_backbone_and_decoder_logits_match(pair):
    ours, hf = pair
    tokens, mask = text_frames(PROMPT, 32)
    ours.setup_caches(1)
    ours.reset_caches()
    pos = torch.arange(len(PROMPT)).unsqueeze(0)
    last_h = ours.backbone_step(tokens[None], mask[None], pos)
    c0_ours = ours.codebook0_head(last_h)

    out = hf(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    c0_hf = out.logits[:, -1]
    torch.testing.assert_close(c0_ours, c0_hf, rtol=1e-4, atol=1e-4)

    # Depth decoder, teacher-forced on a fixed codebook sequence.
    codes = torch.randint(1, 2048, (1, 32), generator=torch.Generator().manual_seed(0))
    ours.decoder.reset_caches()
    h = torch.cat([last_h.unsqueeze(1), torch.cat([ours.embed_audio(i, codes[:, i:i + 1]) for i in range(31)], 1)], 1)
    dpos = torch.arange(32).unsqueeze(0)
    dec = ours.decoder(ours.projection(h), input_pos=dpos, mask=ours.decoder_causal_mask[dpos])
    ours_logits = torch.stack([dec[:, i] @ ours.audio_head[i - 1] for i in range(1, 32)], dim=1)

    hf_in = torch.nn.functional.pad(codes[:, :31], (1, 0))
    hf_logits = hf.depth_decoder(input_ids=hf_in, backbone_last_hidden_state=last_h).logits
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_greedy_codes_identical_for_several_frames(pair):
    ours, hf = pair
    n = 6
    tokens, mask = text_frames(PROMPT, 32)
    ours_codes = torch.stack([c[0] for c, _ in iterate_frames(ours, tokens[None], mask[None], Sampler(1.0, 1), n)])
    hf_codes = hf.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False,
                           depth_decoder_do_sample=False)
    assert hf_codes.shape == (1, n, 32), hf_codes.shape
    assert torch.equal(ours_codes, hf_codes[0, -n:]), (ours_codes[:, :6], hf_codes[0, -n:, :6])
