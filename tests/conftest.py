"""Shared fixtures: the tiny preset, built once per session, on CPU, with no downloads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

from csm_multi.config import get_preset  # noqa: E402
from csm_multi.model import CSM  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return CSM(tiny_config).init_random_(seed=1).eval()


@pytest.fixture(scope="module")
def running_app(tmp_path_factory, tiny_model):
    """The Gradio app on the tiny preset (watermark off) on 127.0.0.1: yields (url, studio)."""
    from csm_multi.codec import MimiCodec, build_mimi
    from csm_multi.engine import Engine, EngineInfo
    from csm_multi.studio import Studio
    from csm_multi.text import ByteTokenizer

    root = tmp_path_factory.mktemp("app")
    info = EngineInfo(model="tiny (random weights, offline demo)", device="cpu", dtype="float32", tokenizer="bytes",
                      codec="Mimi (random)", watermark="OFF", codec_id="mimi-random-0", untrained=True)
    engine = Engine(tiny_model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False, info=info)
    studio = Studio(engine, root / "profiles", outputs_root=root / "out")
    url, demo = launch(studio)
    yield url, studio
    demo.close()


def launch(studio):
    """`studio`'s app on a free port of 127.0.0.1, queued as main() queues it (`configure_queue`: one
    generation at a time unless `studio.engine.serve()` gave it a scheduler): (url, demo).
    The caller closes the demo. Tests import it: `from conftest import launch`."""
    import socket

    import app as app_module

    demo = app_module.build_demo(studio)
    slots = app_module.configure_queue(demo, studio.engine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=app_module.PAGE_CSS, head=app_module.PAGE_HEAD,
                blocked_paths=[str(studio.profiles_root)], allowed_paths=[str(studio.outputs_root)],
                max_threads=slots + 40)
    return f"http://127.0.0.1:{port}/", demo


def slow_lines(monkeypatch, studio, factor: float) -> None:
    """Make `studio`'s renders hand each finished line over `factor` times slower than it plays (as csm-1b
    on two CPU cores makes them), for the live player's pacing. Tests import it: `from conftest import
    slow_lines`."""
    import time

    real = studio.render

    def slow(*args, on_clip=None, **kwargs):
        def late(clip):
            time.sleep(clip.audio.numel() / 24_000 * factor)
            on_clip(clip)
        return real(*args, on_clip=late, **kwargs)

    monkeypatch.setattr(studio, "render", slow)
