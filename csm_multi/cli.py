"""Command line: `python -m csm_multi say "Hello." -o hello.wav` (and friends).

Parses arguments, calls the core, prints results; errors become one readable line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .config import SamplingConfig
from .errors import CsmError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="auto", help="csm-1b, tiny (offline, random) or auto (default)")
    p.add_argument("--checkpoint", help="local checkpoint file/dir or hub repo instead of sesame/csm-1b")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-watermark", action="store_true", help="explicitly disable the audio watermark")


def _build(args):
    from .loaders import build_engine

    return build_engine(args.model, checkpoint=args.checkpoint, device=args.device, watermark=not args.no_watermark)


def cmd_say(args) -> int:
    from .audio import load_audio, save_audio
    from .frames import Segment

    engine = _build(args)
    context = []
    for item in args.context or []:
        path, _, transcript = item.partition("=")
        if not transcript:
            raise CsmError(f"--context {item!r}: write it as PATH=TRANSCRIPT")
        context.append(Segment(speaker=args.speaker, text=transcript, audio=load_audio(path)))
    sampling = SamplingConfig(temperature=args.temperature, topk=args.topk, seed=args.seed,
                              max_audio_length_ms=args.max_ms)
    t0 = time.perf_counter()
    utt = engine.generate(args.text, args.speaker, context, sampling)
    took = time.perf_counter() - t0
    out = save_audio(args.output, utt.audio)
    mark = "watermarked" if utt.watermarked else "NOT watermarked"
    print(f"{out}: {utt.duration_s:.2f} s of audio in {took:.1f} s, seed {utt.seed}, {mark}")
    return 0


def cmd_info(args) -> int:
    engine = _build(args)
    for key, value in vars(engine.info).items():
        print(f"{key:10} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m csm_multi", description="Multi-speaker CSM-1B speech.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    say = sub.add_parser("say", help="speak one line of text to a WAV file")
    say.add_argument("text")
    say.add_argument("-o", "--output", default="out.wav")
    say.add_argument("--speaker", type=int, default=0)
    say.add_argument("--context", action="append", metavar="PATH=TRANSCRIPT",
                     help="a reference clip of the same speaker and its transcript (repeatable)")
    say.add_argument("--temperature", type=float, default=0.9)
    say.add_argument("--topk", type=int, default=50)
    say.add_argument("--seed", type=int)
    say.add_argument("--max-ms", type=float, default=10_000)
    _engine_args(say)
    say.set_defaults(func=cmd_say)

    info = sub.add_parser("info", help="load the model and print what was loaded")
    _engine_args(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (CsmError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
