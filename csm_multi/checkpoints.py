"""Checkpoint layouts: read the original CSM layout or transformers' `CsmForConditionalGeneration`
layout into our parameter names, and write both (tests write real-format files from random weights).

Our names are the reference's (`backbone.layers.0.attn.q_proj.weight`, ..., `audio_head`). The
transformers layout renames modules and stores q/k projections permuted for "rotate half" RoPE,
where torchtune rotates interleaved pairs; we undo that permutation. No downloads here: paths in,
tensors out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointFormatError

ORIGINAL = "original"
TRANSFORMERS = "transformers"

# transformers name -> ours, applied in order (module prefixes first, then leaf names)
_HF_TO_OURS: list[tuple[str, str]] = [
    (r"^backbone_model\.layers\.", "backbone.layers."),
    (r"^depth_decoder\.model\.layers\.", "decoder.layers."),
    (r"^backbone_model\.norm\.weight$", "backbone.norm.scale"),
    (r"^depth_decoder\.model\.norm\.weight$", "decoder.norm.scale"),
    (r"^embed_text_tokens\.", "text_embeddings."),
    (r"^backbone_model\.embed_tokens\.embed_audio_tokens\.", "audio_embeddings."),
    (r"^lm_head\.", "codebook0_head."),
    (r"^depth_decoder\.codebooks_head\.weight$", "audio_head"),
    (r"^depth_decoder\.model\.inputs_embeds_projector\.", "projection."),
    (r"\.self_attn\.", ".attn."),
    (r"\.o_proj\.", ".output_proj."),
    (r"\.gate_proj\.", ".w1."),
    (r"\.down_proj\.", ".w2."),
    (r"\.up_proj\.", ".w3."),
    (r"\.input_layernorm\.weight$", ".sa_norm.scale"),
    (r"\.post_attention_layernorm\.weight$", ".mlp_norm.scale"),
]
_OURS_TO_HF: list[tuple[str, str]] = [
    (r"^backbone\.layers\.", "backbone_model.layers."),
    (r"^decoder\.layers\.", "depth_decoder.model.layers."),
    (r"^backbone\.norm\.scale$", "backbone_model.norm.weight"),
    (r"^decoder\.norm\.scale$", "depth_decoder.model.norm.weight"),
    (r"^text_embeddings\.", "embed_text_tokens."),
    (r"^audio_embeddings\.", "backbone_model.embed_tokens.embed_audio_tokens."),
    (r"^codebook0_head\.", "lm_head."),
    (r"^audio_head$", "depth_decoder.codebooks_head.weight"),
    (r"^projection\.", "depth_decoder.model.inputs_embeds_projector."),
    (r"\.attn\.", ".self_attn."),
    (r"\.output_proj\.", ".o_proj."),
    (r"\.w1\.", ".gate_proj."),
    (r"\.w2\.", ".down_proj."),
    (r"\.w3\.", ".up_proj."),
    (r"\.sa_norm\.scale$", ".input_layernorm.weight"),
    (r"\.mlp_norm\.scale$", ".post_attention_layernorm.weight"),
]
# transformers-only keys that carry nothing we need: the codec (we use moshi's Mimi) and the depth
# decoder's copy of the audio embeddings (tied to the backbone's).
_HF_IGNORED = re.compile(r"^(codec_model\.|depth_decoder\.model\.embed_tokens\.)")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _rope_heads(key: str, config: ModelConfig) -> int | None:
    """Number of heads a q/k projection holds, or None for every other tensor."""
    stack = config.backbone if key.startswith("backbone") else config.decoder
    if ".q_proj." in key:
        return stack.num_heads
    if ".k_proj." in key:
        return stack.num_kv_heads
    return None


def _interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """torchtune rotates (x0, x1), (x2, x3)...; transformers rotates (x_i, x_{i+d/2}): permute rows."""
    out_dim, in_dim = w.shape
    return w.reshape(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.reshape(heads, 2, out_dim // heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("backbone_model.", "depth_decoder.")) for k in keys):
        return TRANSFORMERS
    if any(k.startswith("backbone.layers.") for k in keys):
        return ORIGINAL
    raise CheckpointFormatError(
        "unrecognised checkpoint: expected CSM weights in the original layout (backbone.layers.*) "
        "or transformers' CsmForConditionalGeneration layout (backbone_model.*); "
        f"first keys found: {keys[:5]}"
    )


def from_transformers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    ours = {}
    for key, value in state.items():
        if _HF_IGNORED.match(key):
            continue
        new = _rename(key, _HF_TO_OURS)
        heads = _rope_heads(new, config)
        ours[new] = _half_to_interleaved(value, heads) if heads else value
    # The two audio embeddings are tied; a saved file may keep either one of them.
    tied = state.get("depth_decoder.model.embed_tokens.weight")
    if "audio_embeddings.weight" not in ours and tied is not None:
        ours["audio_embeddings.weight"] = tied
    return ours


def to_transformers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    hf = {}
    for key, value in state.items():
        heads = _rope_heads(key, config)
        hf[_rename(key, _OURS_TO_HF)] = _interleaved_to_half(value, heads) if heads else value
    hf["depth_decoder.model.embed_tokens.weight"] = state["audio_embeddings.weight"]
    return hf


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch (.pt/.pth/.bin, loaded weights-only) file."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated files raise many different types
        raise CheckpointFormatError(f"could not read checkpoint {path.name}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path.name} does not hold a state dict")
    return state


def to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Any supported layout -> our names and RoPE convention."""
    return from_transformers(state, config) if detect_layout(state) == TRANSFORMERS else dict(state)


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], preset: str) -> None:
    """Raise CheckpointFormatError naming missing, unexpected or mis-shaped tensors."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {names[:4]}{' ...' if len(names) > 4 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if names
        )
        raise CheckpointFormatError(f"checkpoint does not fit the {preset!r} model preset ({detail})")


# ---- writers (tests and conversion) --------------------------------------------------------
def original_config_json(config: ModelConfig) -> dict:
    """The reference's hub config.json (PyTorchModelHubMixin serialising its ModelArgs)."""
    flavors = {"csm-1b": ("llama-1B", "llama-100M")}
    backbone, decoder = flavors.get(config.name, (f"{config.name}-backbone", f"{config.name}-decoder"))
    return {
        "audio_num_codebooks": config.audio_num_codebooks,
        "audio_vocab_size": config.audio_vocab_size,
        "backbone_flavor": backbone,
        "decoder_flavor": decoder,
        "text_vocab_size": config.text_vocab_size,
    }


def save_original(state: dict[str, torch.Tensor], config: ModelConfig, directory: str | Path, torch_file: bool = False):
    """Write `model.safetensors` + `config.json` (hub layout) or the first release's `ckpt.pt`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if torch_file:
        torch.save(tensors, directory / "ckpt.pt")
        return directory / "ckpt.pt"
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(original_config_json(config), indent=2))
    return directory / "model.safetensors"
