"""silentcipher's 44.1 kHz watermark, computed faster on CPU: the same marks and the same readings.

One job: given a built silentcipher model (`watermark.load_silentcipher` or `build_random_silentcipher`),
mark audio and read marks as silentcipher's own `encode_wav` / `decode_wav` do, to float rounding
(measured: within 3e-7 of its audio at full scale, the same decoded symbols), in less time. It reads
the model's weights once and never calls its modules, so it leaves their batch-norm running statistics alone
(silentcipher's own calls update them; in training mode that never changes an output), and it keeps
no state between calls: its STFT is a pure function, so unlike silentcipher's process-wide STFT
singleton it needs no lock, and several threads may mark and read at once.

What it computes is exactly silentcipher's network, including what is easy to miss: silentcipher never
calls `.eval()`, so every BatchNorm2d normalises with the statistics (mean, biased variance, eps) of the
current input over all 2049 STFT rows, also the rows above the 1024-row message band whose output is
zeroed at the end. So no row can be skipped: rows above the band change the band's output through
those statistics (zeroing rows above 12 kHz moves the audio by ~1e-5 on speech and ~5e-4 on noise
resampled from 24 kHz, far beyond 1e-6), and the work is the full-band network's.

Where the time goes instead:
- Exact algebra: each layer's two convolutions (signal and sigmoid gate) are one convolution with both
  kernel sets; the carrier decoder's 64 input channels that are 32 copies of the carrier and 32 of the
  message become 2 channels (the kernels summed over the copies); 1x1 and one-input-channel layers are
  single matrix products; gating and batch norm run in place, with per-channel sums of h and h^2
  instead of `var_mean`.
- Winograd convolution: the 3x3 layers with 32 or more channels in and out (~95 % of the work) go
  through PyTorch's bundled NNPACK (`torch._nnpack_spatial_convolution`, F(6x6, 3x3) tiles), about 2x
  fewer operations than oneDNN's direct convolution on this project's CPUs. Alone it is not accurate
  enough: its rounding grows with a tile's largest input, and STFT magnitudes are heavy-tailed (on loud
  speech it moves the audio by ~1.1e-6). So each input is split exactly into a part clipped to 16
  standard deviations per channel, which NNPACK convolves, and the rest, nonzero on ~1-3 % of the
  rows of speech, convolved directly there (`FastMark._winograd`): as accurate as the direct one.
  Where NNPACK is missing or fails, it falls back to `torch.nn.functional.conv2d`
  (`FastMark(model, winograd=False)` forces that).

Not covered (callers use silentcipher for these): the phase search (`phase_shift_decoding=True`),
multi-channel input, rates other than 44.1 kHz, and models other than the 44.1k architecture
(`FastMark.supports`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import omp

SR = 44_100
# Batch norm runs as h * scale + (beta - mean * scale) from one-pass sums, E[h^2] - mean^2: both cancel
# where a channel's mean dwarfs its spread. Where some channel's |mean| exceeds this many standard
# deviations, the layer's output is first centred in place and its sums taken again.
_CENTRE_ABOVE_MEAN_OVER_STD = 2.0
# The Winograd route's split (FastMark._winograd): inputs beyond this many standard deviations from
# their channel's mean are convolved directly; above this share of rows holding some, the whole layer is.
_CLIP_SPREADS = 16.0
_MAX_SPLIT_SHARE = 0.3
# NNPACK calls cover at most _NNPACK_MAX_FRAMES STFT frames (~10 s), longer clips go in even chunks of
# at most _NNPACK_FRAMES (32 whole 6-wide tiles): see _nnpack.
_NNPACK_MAX_FRAMES, _NNPACK_FRAMES = 224, 192
_FAILED = {"messages": [], "confidences": [], "error": "Could not find message", "status": False}

_nnpack_lock = threading.Lock()
_nnpack_ok: bool | None = None  # None: not probed yet


def nnpack_usable() -> bool:
    """Whether PyTorch's NNPACK runs here and agrees with `conv2d` on a small case (probed once).

    NNPACK must be initialised (`torch._nnpack_available()`) before its first convolution, and its
    thread pool is created, unguarded, by that first convolution (sized by torch's thread count then):
    the probe does both, under a lock, so that concurrent callers later find them done.
    """
    global _nnpack_ok
    with _nnpack_lock:
        if _nnpack_ok is None:
            _nnpack_ok = _probe_nnpack()
        return _nnpack_ok


def _probe_nnpack() -> bool:
    try:
        if not torch._nnpack_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(1, 8, 11, 7, generator=g), torch.randn(16, 8, 3, 3, generator=g), torch.randn(16)
        with torch.inference_mode():
            want = F.conv2d(x, w, b, padding=1)
        got = _on_nnpack_thread(x, w, b, [1, 1])
        return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))
    except (AttributeError, RuntimeError):  # a removed private op, not built with NNPACK, an old CPU
        return False


@dataclass(frozen=True)
class _Gated:
    """One silentcipher `Layer` (conv * sigmoid(gate), then batch norm), its two convolutions fused."""

    weight: torch.Tensor  # (2 * out, in, k, k): the signal kernels, then the gate kernels
    bias: torch.Tensor  # (2 * out,)
    gamma: torch.Tensor  # batch-norm scale and shift, (out,)
    beta: torch.Tensor
    eps: float
    rows: torch.Tensor  # the kernels as k one-row kernels, (k * 2 * out, in, 1, k): block a is kernel row a

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] // 2

    @classmethod
    def make(cls, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
             eps: float) -> _Gated:
        out2, in_c, k, _ = weight.shape
        rows = weight.permute(2, 0, 1, 3).reshape(k * out2, in_c, 1, k).contiguous()
        return cls(weight.contiguous(), bias, gamma, beta, eps, rows)

    @classmethod
    def of(cls, layer) -> _Gated:
        conv, gate, bn = layer.conv, layer.gate, layer.bn
        if conv.kernel_size != gate.kernel_size or conv.stride != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] \
                or conv.padding != (conv.kernel_size[0] // 2,) * 2 or not bn.affine:
            raise ValueError("not a silentcipher gated layer")
        return cls.make(_take(torch.cat([conv.weight, gate.weight])), _take(torch.cat([conv.bias, gate.bias])),
                        _take(bn.weight), _take(bn.bias), float(bn.eps))


def _nnpack(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """NNPACK's 3x3 convolution of x (1, C, H, W), zero "same" padding, run on NNPACK's own thread.

    PyTorch keeps NNPACK's workspace per calling thread, as large as the largest call it ever needed
    (~1.8x that call's output), until the thread ends: called from a server's worker threads it would
    pile up, one per thread. So every call goes to one dedicated thread (NNPACK serialises concurrent
    calls on its thread pool anyway: nothing is lost), and clips over `_NNPACK_MAX_FRAMES` frames go in
    chunks of at most `_NNPACK_FRAMES`, which bound that one workspace at ~0.7 GB (a minute of audio
    whole would need ~3.6 GB), for one more copy of such a clip's layer input and output (measured on
    10 s: 0.39 s per second of audio in chunks of 96 frames, 0.25 s whole)."""
    width = x.shape[3]
    if width <= _NNPACK_MAX_FRAMES:
        return _on_nnpack_thread(x, weight, bias, [1, 1])
    chunks = -(-width // _NNPACK_FRAMES)
    step = -(-width // (chunks * 6)) * 6  # even chunks of whole 6-wide tiles: no tile wasted but the last's
    padded = F.pad(x, (1, 1))  # the zero columns at both ends; inside, each chunk reads its neighbours'
    out = torch.empty(1, weight.shape[0], x.shape[2], width, dtype=x.dtype)
    for start in range(0, width, step):
        stop = min(width, start + step)
        out[..., start:stop] = _on_nnpack_thread(padded[..., start:stop + 2], weight, bias, [1, 0])
    return out


_nnpack_thread: tuple[int, object] | None = None  # (pid, a one-thread executor), started by the first call
_nnpack_thread_lock = threading.Lock()


def _on_nnpack_thread(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: list[int]) -> torch.Tensor:
    global _nnpack_thread
    with _nnpack_thread_lock:
        if _nnpack_thread is None or _nnpack_thread[0] != os.getpid():  # a forked child has no such thread
            from concurrent.futures import ThreadPoolExecutor

            _nnpack_thread = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmark-nnpack"))
        executor = _nnpack_thread[1]
    return executor.submit(_nnpack_call, x, weight, bias, padding).result()


@omp.released
def _nnpack_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: list[int]) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: its output is updated in place by callers outside it too
        return torch._nnpack_spatial_convolution(x, weight, bias, padding, [1, 1])


def _take(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy of a parameter, detached from the model."""
    return t.detach().to(device="cpu", dtype=torch.float32).clone()


class FastMark:
    """silentcipher's 44.1 kHz marker and decoder with the weights of `model`, computed faster.

    `encode_wav` and `decode_wav` take what silentcipher's methods of those names take (mono, 44.1 kHz,
    numpy or torch) and give the same answers (see the module docstring for how, and for what is not
    covered). Stateless after construction: safe to call from several threads at once.
    """

    def __init__(self, model, winograd: bool = True):
        if not self.supports(model):
            raise ValueError("FastMark needs a silentcipher 44.1k model (utterance-level, negative-only messages, "
                             "one message decoder)")
        cfg = model.config
        self.config = cfg
        self.model = model  # kept for the phase search, which silentcipher does itself
        self.n_fft, self.hop = int(cfg.N_FFT), int(cfg.HOP_LENGTH)
        self.band = int(cfg.message_band_size)
        self.message_len, self.message_dim = int(cfg.message_len), int(cfg.message_dim)
        self.average_energy = model.average_energy_VCTK
        self.window = torch.hann_window(self.n_fft)
        self.winograd = bool(winograd) and nnpack_usable()
        with torch.no_grad():
            self.enc = [_Gated.of(layer) for layer in model.enc_c.main]
            dec = [_Gated.of(layer) for layer in model.dec_c.main]
            # The carrier decoder's input is [encoder (c), carrier x c, message x c]: a convolution over c
            # identical channels is one over a single channel with the kernels summed over the c.
            first, c = dec[0], self.enc[-1].out_channels
            w = first.weight
            if w.shape[1] != 3 * c:
                raise ValueError("unexpected carrier-decoder input width")
            folded = torch.cat([w[:, :c], w[:, c:2 * c].sum(1, keepdim=True), w[:, 2 * c:].sum(1, keepdim=True)], 1)
            self.dec = [_Gated.make(folded, first.bias, first.gamma, first.beta, first.eps), *dec[1:]]
            self.msg_weight = _take(model.enc_c.linear.weight)  # (band, message_dim)
            self.msg_bias = _take(model.enc_c.linear.bias)
            decoder = model.dec_m[0]
            self.reader = [_Gated.of(m) for m in decoder.main if not isinstance(m, torch.nn.Dropout)]
            self.read_weight = _take(decoder.linear.weight)  # (1, band)
            self.read_bias = _take(decoder.linear.bias)

    @classmethod
    def for_model(cls, model, winograd: bool = True) -> FastMark | None:
        """A FastMark on `model`'s weights, or None where it does not compute that model exactly (see
        `supports`; then the model's own calls are the way)."""
        if not cls.supports(model):
            return None
        try:
            return cls(model, winograd)
        except (ValueError, AttributeError, TypeError):  # layers not shaped as silentcipher's
            return None

    @staticmethod
    def supports(model) -> bool:
        """Whether `model` is a silentcipher model this class computes exactly: the 44.1k layout
        (utterance-level normalisation, negative-only messages, one message decoder, dropout 0), on the
        CPU (the only device it is measured on; elsewhere silentcipher's own calls are the way)."""
        try:
            cfg = model.config
            enc, dec, readers = model.enc_c, model.dec_c, model.dec_m
            flags = (cfg.ensure_negative_message, not cfg.ensure_constrained_message, cfg.utterance_level_normalization,
                     not cfg.frame_level_normalization, not cfg.no_normalization)
            on_cpu = all(p.device.type == "cpu" for m in (enc, dec, *readers) for p in m.parameters())
            return (on_cpu and all(bool(f) for f in flags) and int(cfg.n_messages) == 1 and len(readers) == 1
                    and len(enc.main) >= 1 and len(dec.main) >= 2 and float(model.average_energy_VCTK) > 0
                    and all(m.p == 0 for m in readers[0].main if isinstance(m, torch.nn.Dropout))
                    and readers[0].message_band_size == cfg.message_band_size == dec.message_band_size
                    and cfg.N_FFT // 2 + 1 > cfg.message_band_size)
        except (AttributeError, TypeError, ValueError, StopIteration):
            return False

    # --- the STFT, stateless --------------------------------------------------------------------

    def _stft(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(magnitude, phase), each (2049, frames), of `y` (S,) zero-padded by 1..n_fft samples to a
        whole number of windows, as silentcipher's STFT.transform computes them."""
        y = F.pad(y[None], (0, self.n_fft - y.numel() % self.n_fft))
        spec = torch.stft(y, self.n_fft, self.hop, self.n_fft, window=self.window, return_complex=True)[0]
        re, im = spec.real, spec.imag
        return torch.sqrt(re * re + im * im), torch.atan2(im, re)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor, length: int) -> torch.Tensor:
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec[None], self.n_fft, self.hop, self.n_fft, window=self.window)[0, :length]

    # --- the network ------------------------------------------------------------------------------

    def _conv(self, x: torch.Tensor, layer: _Gated, centre: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """`layer`'s fused convolution of x (1, C_in, H, W) contiguous, "same" padding, by the cheapest
        route that keeps float32 accuracy; `centre` and `spread` (C_in,) say where each channel's values
        lie (mean and standard deviation), for the Winograd route's split (see `_winograd`). May change
        x (callers pass a tensor they no longer need)."""
        weight, bias = layer.weight, layer.bias
        out_c, in_c, k, _ = weight.shape
        if k == 1 or in_c == 1:  # a 1x1 kernel, or one input channel: one matrix product (oneDNN is slow here)
            cols = x.reshape(in_c, -1) if k == 1 else F.unfold(x, k, padding=k // 2)[0]
            return torch.addmm(bias[:, None], weight.reshape(out_c, -1), cols).view(1, out_c, *x.shape[2:])
        if self.winograd and k == 3 and min(in_c, out_c) >= 32:
            out = self._winograd(x, layer, centre, spread)
            if out is not None:
                return out
        return F.conv2d(x, weight, bias, padding=k // 2)

    @staticmethod
    def _winograd(x: torch.Tensor, layer: _Gated, centre: torch.Tensor, spread: torch.Tensor):
        """`layer`'s 3x3 convolution by NNPACK's Winograd tiles, as accurate as the direct one. Clips x
        in place (callers pass a tensor they no longer need).

        Winograd's rounding error in a tile grows with the largest input in it, and STFT magnitudes are
        heavy-tailed (a harmonic's peak stands ~100 standard deviations out): on loud speech NNPACK alone
        moves the audio by ~1.1e-6. So the input is split, exactly, x = clip(x) + rest, where clip keeps
        each channel within `_CLIP_SPREADS` standard deviations of its mean; conv(clip(x)) goes to
        NNPACK, and conv(rest) is computed directly on the few rows where rest is nonzero (~1-3 % of
        the rows of speech), one kernel row at a time, and added to the output rows each one reaches.
        None, x unchanged, when too many rows stand out for that to pay or NNPACK fails (e.g. no memory
        for its workspace): the caller convolves directly."""
        out_c = layer.weight.shape[0]
        height, width = x.shape[2:]
        margin = _CLIP_SPREADS * spread + 1e-4 * (centre.abs() + spread.max())  # a constant channel: no clip
        low, high = (centre - margin)[:, None], (centre + margin)[:, None]
        planes = x[0]  # (C_in, H, W), a view
        least, most = planes.amin(dim=2), planes.amax(dim=2)  # per channel and row (twice as fast as aminmax)
        rows = ((least < low) | (most > high)).any(dim=0).nonzero().squeeze(1)  # rows with a value to clip
        if rows.numel() > _MAX_SPLIT_SHARE * height:
            return None
        if rows.numel():
            rest = planes.index_select(1, rows)  # (C_in, rows, W), a copy
            kept = torch.clamp(rest, low[:, :, None], high[:, :, None])
            planes.index_copy_(1, rows, kept)  # x is now clip(x)
        try:
            out = _nnpack(x, layer.weight, layer.bias)
        except RuntimeError:
            if rows.numel():
                planes.index_copy_(1, rows, rest)  # x as it was
            return None
        if rows.numel():
            rest.sub_(kept)
            reach = F.conv2d(rest[None], layer.rows, None, padding=(0, 1))[0].view(3, out_c, rows.numel(), width)
            for a in range(3):  # through kernel row a, input row r reaches output row r - a + 1
                target = rows - (a - 1)
                inside = (target >= 0) & (target < height)
                part = reach[a] if bool(inside.all()) else reach[a][:, inside]
                out[0].index_add_(1, target[inside], part)
        return out

    def _gated(self, layer: _Gated, x: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor):
        """One gated layer, conv(x) * sigmoid(gate(x)) then training-mode batch norm, on x (1, C_in, H, W)
        whose channels have means `centre` and standard deviations `spread`. Returns (h, centre', spread'):
        the output, a view of the fused convolution's output (its first half) computed in place, and its
        channels' means and standard deviations (batch norm's beta and about |gamma|)."""
        z = self._conv(x, layer, centre, spread)
        c = layer.out_channels
        h, gate = z[:, :c], z[:, c:]
        h.mul_(gate.sigmoid_())
        flat, spare = h.reshape(c, -1), gate.reshape(c, -1)  # views: both halves are contiguous
        n = flat.shape[1]
        mean = flat.sum(1).double() / n
        var = torch.mul(flat, flat, out=spare).sum(1).double() / n - mean * mean  # the spare half: no allocation
        if bool((mean * mean > _CENTRE_ABOVE_MEAN_OVER_STD**2 * var).any()):
            # h * scale + (beta - mean * scale) would cancel: centre first, and take the variance again
            flat.sub_(mean.float()[:, None])
            mean = flat.sum(1).double() / n
            var = torch.mul(flat, flat, out=spare).sum(1).double() / n - mean * mean
        var = var.clamp(min=0)
        scale = layer.gamma.double() / torch.sqrt(var + layer.eps)
        shift = layer.beta.double() - mean * scale
        flat.mul_(scale.float()[:, None]).add_(shift.float()[:, None])
        return h, layer.beta, (scale.abs() * torch.sqrt(var)).float()

    @staticmethod
    def _spread(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, standard deviation) of x (1, C, H, W), float32."""
        std, mean = torch.std_mean(x, dim=(0, 2, 3), unbiased=False)
        return mean, std

    def _message_rows(self, symbols: list[int], frames: int) -> torch.Tensor:
        """The message encoder's output, (1, 1, 2049, frames): frame j carries symbol j mod 21 (the last one
        the end symbol), embedded by the linear layer of its one-hot vector into the band rows."""
        index = torch.tensor([symbols[j % self.message_len] for j in range(frames)])
        rows = self.msg_weight[:, index] + self.msg_bias[:, None]  # one-hot times the weights, plus the bias
        return F.pad(rows, (0, 0, 0, self.n_fft // 2 + 1 - self.band))[None, None]

    def _symbols(self, message: Sequence[int]) -> list[int]:
        """The 5-byte `message` as silentcipher embeds it: 2-bit symbols shifted to 1..4, then the end symbol 0."""
        message = [int(v) for v in message]
        bits = "".join(f"{v:08b}" for v in message)
        symbols = [int(bits[i:i + 2], 2) + 1 for i in range(0, len(bits) - 1, 2)]
        if len(symbols) != self.message_len - 1:
            raise ValueError(f"a message is {(self.message_len - 1) * 2 // 8} bytes, got {message!r}")
        return [*symbols, 0]

    def _mark(self, carrier: torch.Tensor, symbols: list[int], message_sdr: float) -> torch.Tensor:
        """The (negative) STFT-magnitude mark for `carrier` (2049, frames): silentcipher's encoder and
        carrier decoder, then its per-frame and utterance-level scaling."""
        c = carrier[None, None]
        h, centre, spread = c, *self._spread(c)
        for layer in self.enc:
            h, centre, spread = self._gated(layer, h, centre, spread)
        extra = torch.cat([c, self._message_rows(symbols, c.shape[-1])], 1)
        more = self._spread(extra)
        h = torch.cat([h, extra], 1)  # [encoder output, carrier, message]
        centre, spread = torch.cat([centre, more[0]]), torch.cat([spread, more[1]])
        for layer in self.dec:
            h, centre, spread = self._gated(layer, h, centre, spread)
        h = h[0, 0].abs()
        h[self.band:] = 0
        h = h / torch.mean(h**2, dim=0, keepdim=True) ** 0.5 / (10 ** (message_sdr / 20))
        return h * torch.mean(carrier**2) ** 0.5

    def _logits(self, carrier: torch.Tensor) -> torch.Tensor:
        """The message decoder's output (symbols, frames) for `carrier` (2049, frames)."""
        h = carrier[None, None, :self.band].contiguous()
        centre, spread = self._spread(h)
        for layer in self.reader:
            h, centre, spread = self._gated(layer, h, centre, spread)
        h = h[0]  # (symbols, band, frames)
        return (self.read_weight @ h).squeeze(1) + self.read_bias

    # --- silentcipher's entry points -----------------------------------------------------------------

    def _mono_44k(self, y, orig_sr: int) -> np.ndarray:
        if int(orig_sr) != SR:
            raise ValueError(f"FastMark works at {SR} Hz; resample first (got {orig_sr} Hz)")
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"FastMark takes mono audio of shape (S,), got {y.shape}")
        return y.astype(np.float32, copy=False)

    @torch.inference_mode()
    def encode_wav(self, y, orig_sr: int, message_list: Sequence[int], message_sdr: float | None = None,
                   calc_sdr: bool = True) -> tuple[np.ndarray, float]:
        """(marked audio, SDR in dB or 0) for mono `y` at 44.1 kHz, as silentcipher's `encode_wav`:
        `message_list` is the 5 bytes, `message_sdr` the mark's strength (default: the model's).
        Silent input (power 0) comes back unchanged, SDR 0."""
        y = self._mono_44k(y, orig_sr)
        message_sdr = self.config.message_sdr if message_sdr is None else message_sdr
        symbols = self._symbols(message_list)
        power = np.mean(y**2)  # numpy's float32 mean, as silentcipher's (the same rounding)
        if power == 0:
            return y.copy(), 0
        scaled = torch.from_numpy(y * np.sqrt(self.average_energy / power))
        carrier, phase = self._stft(scaled)
        reconstructed = torch.relu(carrier - self._mark(carrier, symbols, message_sdr))
        out = self._istft(reconstructed, phase, y.shape[0]).cpu().numpy()
        out = out * np.sqrt(power / self.average_energy)
        return out, (_sdr(y, out) if calc_sdr else 0)

    @torch.inference_mode()
    def decode_wav(self, y, orig_sr: int, phase_shift_decoding=False) -> dict:
        """{"messages": [[5 ints]], "confidences": [float], "status": bool} for mono `y` at 44.1 kHz, as
        silentcipher's `decode_wav` gives (also its failure answer, with "error", when nothing reads).
        The phase search (`phase_shift_decoding`) is silentcipher's own, under the lock its STFT needs."""
        if phase_shift_decoding and phase_shift_decoding != "false":
            from .watermark import _SILENTCIPHER_LOCK

            with _SILENTCIPHER_LOCK:
                return self.model.decode_wav(self._mono_44k(y, orig_sr), SR, phase_shift_decoding)
        symbols = self.symbols(y, orig_sr)
        return dict(_FAILED) if symbols is None else self._read(symbols)

    @torch.inference_mode()
    def symbols(self, y, orig_sr: int = SR) -> np.ndarray | None:
        """The decoder's symbol (0..4) for each STFT frame of mono `y` at 44.1 kHz (the argmax that
        `decode_wav` votes on), or None for silent input (silentcipher reads nothing from it)."""
        y = self._mono_44k(y, orig_sr)
        power = np.mean(y**2)
        if power == 0:  # silentcipher divides by it, and reads nothing from the NaNs
            return None
        scaled = torch.from_numpy(y * np.sqrt(self.average_energy / power))
        carrier, _ = self._stft(scaled)
        return torch.argmax(self._logits(carrier), dim=0).cpu().numpy()

    def _read(self, symbols: np.ndarray) -> dict:
        """silentcipher's reading of per-frame symbols: whole messages only, the most common symbol at
        each position (ties: the smallest), rotated to start after the first end symbol; confidence is
        the share of frames agreeing with it. No end symbol, or a read that does not form 2-bit symbols
        (an end symbol inside the message), is silentcipher's failure answer."""
        n = self.message_len
        grid = symbols[:symbols.shape[0] // n * n].reshape(-1, n)
        if grid.shape[0] == 0:
            return dict(_FAILED)
        counts = (grid[:, :, None] == np.arange(self.message_dim)).sum(0)  # (position, symbol)
        voted = counts.argmax(1)  # the first (smallest) of the most common
        confidence = float(np.mean((grid == voted[None]).astype(np.float32)))
        ends = np.flatnonzero(voted == 0)
        if ends.size == 0:
            return dict(_FAILED)
        end = int(ends[0])
        values = np.concatenate([voted[end + 1:], voted[:end]]) - 1
        bits = "".join(format(int(v), "02b") for v in values)
        try:
            message = [int(bits[i:i + 8], 2) for i in range(0, len(bits) // 8 * 8, 8)]
        except ValueError:  # a "-1" (an end symbol inside the message) in the bit string
            return dict(_FAILED)
        return {"messages": [message], "confidences": [confidence], "status": True}


def _sdr(orig: np.ndarray, marked: np.ndarray) -> float:
    """silentcipher's SDR (dB) of `marked` against `orig`."""
    return float(20 * np.log10(np.mean(orig**2) ** 0.5 / np.mean((orig - marked) ** 2) ** 0.5))


# --- measuring it against silentcipher ----------------------------------------------------------------

def silentcipher_decode(model, y: np.ndarray) -> tuple[dict, np.ndarray]:
    """silentcipher's own `decode_wav` answer for mono `y` (44.1 kHz, no phase search), under its lock,
    and the per-frame symbols its decoder voted on (caught on the way out of its message decoder)."""
    from .watermark import _SILENTCIPHER_LOCK

    seen = []
    hook = model.dec_m[0].register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    try:
        with _SILENTCIPHER_LOCK:
            answer = model.decode_wav(np.asarray(y, dtype=np.float32), SR, False)
    finally:
        hook.remove()
    return answer, torch.argmax(seen[0][0, 0], dim=0).numpy()


def speech_like(seconds: float, seed: int = 0, level: float = 0.5) -> np.ndarray:
    """A speech-like test signal as CSM makes it: 24 kHz (a gliding 140 Hz voice, 40 harmonics, a
    syllable-rate envelope, a little noise) resampled to 44.1 kHz as `Watermarker` does; peak `level`."""
    import torchaudio.functional as AF

    n = int(seconds * 24_000)
    t = np.arange(n) / 24_000
    phase = 2 * np.pi * np.cumsum(140 + 25 * np.sin(2 * np.pi * 0.6 * t)) / 24_000
    voice = sum(np.sin(k * phase) / k for k in range(1, 41)) * (0.55 + 0.45 * np.sin(2 * np.pi * 3.1 * t)) ** 2
    voice = voice + 0.01 * np.random.default_rng(seed).standard_normal(n)
    voice = level * voice / np.abs(voice).max()
    return AF.resample(torch.from_numpy(voice.astype(np.float32)), 24_000, SR).numpy()


def bench(seconds: Sequence[float] = (2, 5, 10), rounds: int = 3, seed: int = 0, warm_up: bool = True,
          log=print) -> dict:
    """Times silentcipher's `encode_wav` / `decode_wav` and FastMark's on the same random-weight 44.1k
    model and the same speech-like inputs, in interleaved rounds (the order alternating, so that a noisy
    machine's slow spells fall on both), and checks they agree: the marked audio's largest difference,
    the decoded answers (marked and unmarked), the per-frame symbols. Times are seconds per second of
    audio: wall clock (the figure the targets are about) and this process's CPU time (all its threads)."""
    from .watermark import _SILENTCIPHER_LOCK, CSM_1B_GH_WATERMARK, MESSAGE_SDR_DB, build_random_silentcipher

    model = build_random_silentcipher(seed=seed)
    fast = FastMark(model)
    key = list(CSM_1B_GH_WATERMARK)

    def reference_apply(y):
        with _SILENTCIPHER_LOCK:
            return model.encode_wav(y, SR, key, message_sdr=MESSAGE_SDR_DB, calc_sdr=False)[0]

    def reference_verify(y):
        with _SILENTCIPHER_LOCK:
            return model.decode_wav(y, SR, False)

    calls = {"silentcipher_apply": reference_apply,
             "fast_apply": lambda y: fast.encode_wav(y, SR, key, message_sdr=MESSAGE_SDR_DB, calc_sdr=False)[0],
             "silentcipher_verify": reference_verify, "fast_verify": lambda y: fast.decode_wav(y, SR)}
    if warm_up:  # one untimed call each (one-off set-up: oneDNN primitives, NNPACK's pool, allocations)
        warm = speech_like(1.0, seed)  # a whole message (0.84 s): no warning from silentcipher's empty vote
        for call in calls.values():
            call(warm)
    load_before = _load()
    rows = []
    for length in seconds:
        y = speech_like(length, seed)
        marked = reference_apply(y)  # what both decoders read
        wall: dict[str, list[float]] = {name: [] for name in calls}
        cpu: dict[str, list[float]] = {name: [] for name in calls}
        out: dict[str, object] = {}
        for r in range(rounds):
            for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
                source = marked if name.endswith("verify") else y
                start, start_cpu = time.perf_counter(), time.process_time()
                out[name] = calls[name](source)
                wall[name].append((time.perf_counter() - start) / length)
                cpu[name].append((time.process_time() - start_cpu) / length)
        agree = fast.symbols(marked) == silentcipher_decode(model, marked)[1]
        row = {"seconds": length, "frames": int(agree.size),
               "max_abs_deviation": float(np.abs(out["fast_apply"] - out["silentcipher_apply"]).max()),
               "peak": float(np.abs(y).max()), "mark_rms": float(np.sqrt(np.mean((marked - y) ** 2))),
               "decode_same": out["fast_verify"] == out["silentcipher_verify"],
               "symbols_same": float(agree.mean()),
               "unmarked_decode_same": fast.decode_wav(y, SR) == reference_verify(y)}
        for task in ("apply", "verify"):
            entry = {}
            for who in ("silentcipher", "fast"):
                w, c = sorted(wall[f"{who}_{task}"]), sorted(cpu[f"{who}_{task}"])
                entry[f"{who}_s_per_s"] = {"min": w[0], "median": w[len(w) // 2]}
                entry[f"{who}_cpu_s_per_s"] = {"min": c[0], "median": c[len(c) // 2]}
            entry["speedup_median"] = entry["silentcipher_s_per_s"]["median"] / entry["fast_s_per_s"]["median"]
            entry["speedup_min"] = entry["silentcipher_s_per_s"]["min"] / entry["fast_s_per_s"]["min"]
            entry["speedup_cpu_min"] = entry["silentcipher_cpu_s_per_s"]["min"] / entry["fast_cpu_s_per_s"]["min"]
            row[task] = entry
        rows.append(row)
        log(f"{length:>5} s  apply {row['apply']['silentcipher_s_per_s']['median']:.3f} -> "
            f"{row['apply']['fast_s_per_s']['median']:.3f} s/s ({row['apply']['speedup_median']:.2f}x)  "
            f"verify {row['verify']['silentcipher_s_per_s']['median']:.3f} -> "
            f"{row['verify']['fast_s_per_s']['median']:.3f} s/s ({row['verify']['speedup_median']:.2f}x)  "
            f"max |dev| {row['max_abs_deviation']:.2e}  decode same {row['decode_same']}  "
            f"symbols same {row['symbols_same']:.3f}")
    fast_median = {task: [r[task]["fast_s_per_s"]["median"] for r in rows] for task in ("apply", "verify")}
    return {
        "what": "silentcipher 1.0.5 encode_wav/decode_wav vs csm_multi.fastmark.FastMark, same model and inputs",
        "model": f"build_random_silentcipher(seed={seed}): random weights, the published 44.1k architecture",
        "input": "speech_like(): 24 kHz harmonics resampled to 44.1 kHz, peak 0.5",
        "message_sdr": MESSAGE_SDR_DB, "rounds": rounds, "interleaved": True, "winograd": fast.winograd,
        "machine": {**_machine(), "load_average_before": load_before, "load_average_after": _load()},
        "targets_s_per_s": {"apply": 0.1, "verify": 0.2},
        "fast_median_s_per_s_range": {task: [min(v), max(v)] for task, v in fast_median.items()},
        "targets_met": {"apply": max(fast_median["apply"]) <= 0.1, "verify": max(fast_median["verify"]) <= 0.2},
        "rows": rows,
    }


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _machine() -> dict:
    from .machine import cpu_name

    return {"platform": platform.platform(), "cpu": cpu_name(platform.processor()), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csm_multi.fastmark", description=__doc__.split("\n")[0])
    parser.add_argument("--bench", action="store_true", help="time silentcipher against FastMark (random weights)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[2, 5, 10], help="clip lengths (default 2 5 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per length (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="the random model's seed")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)  # before FastMark's first NNPACK call, which sizes its pool
    result = bench(args.seconds, max(1, args.rounds), args.seed)
    print(json.dumps({k: result[k] for k in ("fast_median_s_per_s_range", "targets_met")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
