"""The CSM network: embeddings, Llama-3.2 backbone, depth decoder, heads and KV caches.

Parameter names and shapes are those of the reference `Model` (SesameAILabs/csm), so its
checkpoints load as they are. Built on torchtune's Llama 3.2 blocks as the reference is. No
sampling loop, no I/O, no tokenizer here: `generate.py` drives these methods.

Shapes: B batch, S positions, K codebooks, V vocab, Db / Dd backbone / decoder width.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.modules.kv_cache import KVCache

from .config import LlamaConfig, ModelConfig


def _llama(cfg: LlamaConfig) -> TransformerDecoder:
    """A torchtune Llama 3.2 stack without token embedding and output head (CSM brings its own)."""
    model = llama3_2(
        vocab_size=1,  # replaced below; CSM embeds frames itself
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        embed_dim=cfg.embed_dim,
        max_seq_len=cfg.max_seq_len,
        intermediate_dim=cfg.intermediate_dim,
        attn_dropout=0.0,
        norm_eps=cfg.norm_eps,
        rope_base=cfg.rope_base,
        scale_factor=cfg.rope_scale_factor,
    )
    model.tok_embeddings = nn.Identity()
    model.output = nn.Identity()
    return model


class StaticKVCache(KVCache):
    """torchtune's KV cache without host syncs, so a whole frame can be captured in a CUDA graph.

    Departure from torchtune: its `update` asserts on a device tensor and its `reset` reads
    `cache_pos[0].item()`; each forces a device->host sync (~140 per frame). Same buffers and
    semantics here; bounds are the caller's job (the Engine checks the window before generating).

    With `trim` on (CPU), attention sees only the slots filled so far, counted on the host
    (`filled`), instead of all max_seq_len slots: torchtune expands K/V from the KV heads to all
    heads before attention, so a full 2048-slot cache is copied at every step. Masked slots get
    zero weight, so the values attended to are the same either way.
    """

    trim = False
    filled = 0
    # Row mode (the scheduler's continuous batching, see `CSM.use_rows`): the step uses cache rows
    # `rows` only, each row writing its new positions at its own slots `row_pos` (B', S), and
    # attention sees the first `visible` slots (None: all). None: the whole batch, shared positions.
    rows: slice | None = None
    row_pos: torch.Tensor | None = None
    visible: int | None = None

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.k_cache, self.v_cache
        if self.rows is not None:
            k_cache, v_cache = k_cache[self.rows], v_cache[self.rows]  # views: writes go through
        if self.row_pos is not None:
            rows = torch.arange(k_val.shape[0], device=k_val.device).unsqueeze(1)
            k_cache[rows, :, self.row_pos] = k_val.transpose(1, 2)  # (B', S, H, D) at each row's own slots
            v_cache[rows, :, self.row_pos] = v_val.transpose(1, 2)
            if self.visible is None:
                return k_cache, v_cache
            return k_cache[:, :, : self.visible], v_cache[:, :, : self.visible]
        positions = self.cache_pos[: k_val.shape[2]]
        k_cache.index_copy_(2, positions, k_val)
        v_cache.index_copy_(2, positions, v_val)
        self.cache_pos.add_(k_val.shape[2])
        self.filled += k_val.shape[2]
        if self.trim:
            return k_cache[:, :, : self.filled], v_cache[:, :, : self.filled]
        return k_cache, v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
        torch.arange(self.cache_pos.numel(), out=self.cache_pos)
        self.filled = 0


class CSM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        db, dd = config.backbone.embed_dim, config.decoder.embed_dim
        k, v = config.audio_num_codebooks, config.audio_vocab_size
        self.backbone = _llama(config.backbone)
        self.decoder = _llama(config.decoder)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, db)
        self.audio_embeddings = nn.Embedding(v * k, db)  # codebook i uses rows [i*V, (i+1)*V)
        self.projection = nn.Linear(db, dd, bias=False)
        self.codebook0_head = nn.Linear(db, v, bias=False)
        self.audio_head = nn.Parameter(torch.empty(k - 1, dd, v))  # heads for codebooks 1..K-1
        self.register_buffer("_codebook_offsets", torch.arange(k) * v, persistent=False)
        self._cache_batch_size: int | None = None
        self.cache_version = 0  # bumped whenever caches are reallocated (captured graphs go stale)
        self.quantization = "none"  # "int8" or "int4" after quant.quantize
        self.codebook_heads: nn.ModuleList | None = None  # audio_head as int8/int4 or packed Linears (CPU)
        self.fused = False  # True after fused.fuse_layers (CPU by default; CUDA with bench --fuse)
        self.packed = False  # True after fused.pack_linears (CPU float32: oneDNN products)

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_random_(self, seed: int = 0, std: float = 0.02) -> CSM:
        """Random weights (for tests and the offline preset): N(0, std) matrices, unit norms."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith(".scale"):  # RMSNorm gains
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def compile_steps(self, mode: str = "default") -> CSM:
        """torch.compile the backbone and decoder steps (fuses norms, RoPE, SiLU; fewer kernels).

        Optional: the CUDA-graph fast path works without it (ZeroGPU has no torch.compile).
        Compiled steps are still captured into the per-frame CUDA graph by FrameGraph.
        """
        self.backbone_step = torch.compile(self.backbone_step, mode=mode, dynamic=False)
        self.decoder_step = torch.compile(self.decoder_step, mode=mode, dynamic=False)
        return self

    # ---- caches ---------------------------------------------------------------------------
    def setup_caches(self, batch_size: int) -> None:
        """Allocate static KV caches for `batch_size` rows (idempotent for the same size)."""
        if self._cache_batch_size == batch_size:
            return
        self.drop_caches()  # free the old set before allocating the new one
        p = next(self.parameters())
        dtype = self.audio_head.dtype  # float even when the linear layers are quantized
        k = self.config.audio_num_codebooks
        for stack, length in ((self.backbone, self.config.max_seq_len), (self.decoder, k)):
            stack.decoder_max_cache_seq_len = length
            for layer in stack.layers:
                attn = layer.attn
                with p.device:
                    attn.kv_cache = StaticKVCache(batch_size, length, attn.num_kv_heads, attn.head_dim, dtype)
                attn.cache_enabled = True
        self.register_buffer("backbone_causal_mask", _causal(self.config.max_seq_len, p.device), persistent=False)
        self.register_buffer("decoder_causal_mask", _causal(k, p.device), persistent=False)
        positions = torch.arange(k, device=p.device).unsqueeze(0).expand(batch_size, k).contiguous()
        self.register_buffer("decoder_positions", positions, persistent=False)
        self._cache_batch_size = batch_size
        self.cache_version += 1
        # Trim on CPU, where the copies cost ~10% of a frame. CUDA keeps fixed shapes: the graph
        # replays full-length attention and eager frames must match it exactly.
        self.trim_kv = p.device.type == "cpu"

    def drop_caches(self) -> None:
        """Free the KV caches (the next generation allocates them again)."""
        for stack in (self.backbone, self.decoder):
            for layer in stack.layers:
                layer.attn.kv_cache = None
                layer.attn.cache_enabled = False
        if self._cache_batch_size is not None:
            self.cache_version += 1
        self._cache_batch_size = None

    @property
    def trim_kv(self) -> bool:
        """Whether attention sees only the filled cache slots (see StaticKVCache); False before caches exist."""
        return bool(self._kv_caches()) and self._kv_caches()[0].trim

    @trim_kv.setter
    def trim_kv(self, on: bool) -> None:
        for kv in self._kv_caches():
            kv.trim = on

    def _kv_caches(self) -> list[StaticKVCache]:
        return [layer.attn.kv_cache for stack in (self.backbone, self.decoder) for layer in stack.layers
                if isinstance(layer.attn.kv_cache, StaticKVCache)]

    def _visible(self, stack: TransformerDecoder, new: int) -> int | None:
        """Cache slots attention sees after adding `new` positions (None: all of them)."""
        kv = stack.layers[0].attn.kv_cache
        if kv.row_pos is not None:
            return kv.visible
        return kv.filled + new if kv.trim else None

    def use_rows(self, rows: slice | None, input_pos: torch.Tensor | None = None, visible: int | None = None) -> None:
        """Row mode for the next steps (the scheduler): backbone and decoder use only cache rows `rows`
        (a slice of the batch set up by `setup_caches`); the backbone writes row b's new positions at
        its own slots `input_pos[b]` and attends to the first `visible` slots (None: all; set it to the
        largest end position on CPU, where caches are trimmed). `use_rows(None)`: back to whole-batch mode.
        """
        for layer in self.backbone.layers:
            kv = layer.attn.kv_cache
            kv.rows, kv.row_pos = rows, input_pos
            kv.visible = visible if kv.trim else None
        for layer in self.decoder.layers:
            layer.attn.kv_cache.rows = rows

    @torch.no_grad()
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` backbone cache slots of row `src` into row `dst` (the scheduler
        compacts its rows when one leaves)."""
        for layer in self.backbone.layers:
            kv = layer.attn.kv_cache
            kv.k_cache[dst, :, :length] = kv.k_cache[src, :, :length]
            kv.v_cache[dst, :, :length] = kv.v_cache[src, :, :length]

    def reset_caches(self) -> None:
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    def skip_positions(self, n: int) -> None:
        """After `reset_caches`: the backbone's first `n` slots already hold a prompt's state (copied
        in by a `prefix.PrefixCache`), so the next step writes from position `n` on."""
        for layer in self.backbone.layers:
            kv = layer.attn.kv_cache
            kv.cache_pos.add_(n)
            kv.filled += n

    # ---- embeddings -----------------------------------------------------------------------
    def embed_frames(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Frames (B, S, K+1) + mask (B, S, K+1) -> summed embeddings (B, S, Db)."""
        audio = self.audio_embeddings(tokens[..., :-1] + self._codebook_offsets)  # (B, S, K, Db)
        text = self.text_embeddings(tokens[..., -1:])  # (B, S, 1, Db)
        embeds = torch.cat([audio, text], dim=-2)
        return (embeds * mask.unsqueeze(-1).to(embeds.dtype)).sum(dim=2)

    def embed_audio(self, codebook: int, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, 1) of one codebook -> (B, 1, Db)."""
        return self.audio_embeddings(codes + codebook * self.config.audio_vocab_size)

    # ---- forward steps --------------------------------------------------------------------
    def backbone_step(
        self, tokens: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run S new frames through the backbone; return the last position's hidden state (B, Db).

        `key_valid` (B, max_seq_len) marks the cache slots a row may attend to (False for left
        padding of batched prompts of unequal length).
        """
        h = self.embed_frames(tokens, mask)
        attn_mask = self.backbone_causal_mask[input_pos][..., : self._visible(self.backbone, tokens.size(1))]
        if key_valid is not None:
            key_valid = key_valid[:, : attn_mask.size(-1)]
            # Padding positions attend to themselves only, so no row is fully masked (NaN).
            own = torch.nn.functional.one_hot(input_pos, attn_mask.size(-1)).bool()
            attn_mask = (attn_mask & key_valid.unsqueeze(1)) | own
        h = self.backbone(h, input_pos=input_pos, mask=attn_mask)
        return h[:, -1, :].to(self.audio_head.dtype)

    def decoder_step(self, h: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Decoder inputs (B, S, Db) at positions (B, S) -> last hidden state (B, Dd)."""
        attn_mask = self.decoder_causal_mask[input_pos][..., : self._visible(self.decoder, h.size(1))]
        out = self.decoder(self.projection(h), input_pos=input_pos, mask=attn_mask)
        return out[:, -1, :].to(self.audio_head.dtype)

    def codebook_logits(self, codebook: int, decoder_h: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of codebook `codebook` >= 1 from the decoder's hidden state (B, Dd)."""
        if self.codebook_heads is not None:
            return self.codebook_heads[codebook - 1](decoder_h)
        return decoder_h @ self.audio_head[codebook - 1]


def _causal(n: int, device: torch.device) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
