"""Gradio UI over the csm_multi core: build_demo(engine) and main(). No model code here.

    python app.py                 # csm-1b when the hub is reachable (HF_TOKEN), else the offline tiny preset
    python app.py --model tiny    # random weights, offline
"""

from __future__ import annotations

import argparse
import html
import logging
import os

import numpy as np

from csm_multi import CsmError, Engine, SamplingConfig, build_engine

log = logging.getLogger("csm_multi.app")


def _int16(audio) -> np.ndarray:
    """Gradio peak-normalises float audio; int16 keeps the real level."""
    return (audio.clamp(-1, 1).numpy() * 32767).astype(np.int16)


def status_markdown(engine: Engine) -> str:
    i = engine.info
    lines = [f"**Model:** {html.escape(i.model)}", f"**Device:** {i.device} ({i.dtype})",
             f"**Tokenizer:** {html.escape(i.tokenizer)}", f"**Codec:** {html.escape(i.codec)}",
             f"**Watermark:** {html.escape(i.watermark)}"]
    if i.untrained:
        lines.insert(0, "### ⚠️ Offline demo: random untrained weights — the output is noise, not speech.")
    return "  \n".join(lines)


def build_demo(engine: Engine):
    import gradio as gr

    def say(text: str, speaker: int, temperature: float, topk: int, seed: float | None, max_s: float):
        if not text or not text.strip():
            raise gr.Error("Write some text to speak first.")
        try:
            sampling = SamplingConfig(temperature=temperature, topk=int(topk),
                                      seed=None if seed in (None, "") else int(seed), max_audio_length_ms=max_s * 1000)
            utt = engine.generate(text.strip(), int(speaker), (), sampling)
        except (CsmError, ValueError) as e:
            raise gr.Error(str(e)) from None
        note = f"{utt.duration_s:.2f} s, seed {utt.seed}, {'watermarked' if utt.watermarked else 'NOT watermarked'}"
        return (utt.sample_rate, _int16(utt.audio)), note

    with gr.Blocks(title="csm-multi") as demo:
        gr.Markdown("# csm-multi — multi-speaker speech with CSM-1B")
        gr.Markdown(status_markdown(engine))
        with gr.Tab("Quick"):
            text = gr.Textbox(label="Text", value="Hello! This is a quick test of the conversational speech model.")
            with gr.Row():
                speaker = gr.Number(label="Speaker id", value=0, precision=0, minimum=0, maximum=9)
                temperature = gr.Slider(0.1, 1.5, value=0.9, step=0.05, label="Temperature")
                topk = gr.Slider(1, 100, value=50, step=1, label="Top-k")
                seed = gr.Number(label="Seed (empty = random)", value=None, precision=0)
                max_s = gr.Slider(1, 30, value=10, step=1, label="Max seconds")
            go = gr.Button("Speak", variant="primary")
            audio = gr.Audio(label="Output", type="numpy")
            info = gr.Markdown()
            go.click(say, [text, speaker, temperature, topk, seed, max_s], [audio, info], api_name="say")
    return demo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("CSM_MODEL", "auto"), help="csm-1b, tiny or auto")
    p.add_argument("--checkpoint", default=os.environ.get("CSM_CHECKPOINT"))
    p.add_argument("--device", default=os.environ.get("CSM_DEVICE"))
    p.add_argument("--host", default=os.environ.get("CSM_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("CSM_PORT", "7860")))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine = build_engine(args.model, checkpoint=args.checkpoint, device=args.device)
    for note in engine.info.notes:
        log.warning(note)
    build_demo(engine).queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                                 share=args.share)


if __name__ == "__main__":
    main()
