"""`lfm2-audio serve`: load a checkpoint, start the engine, serve HTTP and WebSocket.

Shutdown is graceful: the first SIGTERM or SIGINT stops admitting work (new requests get 503,
/health reports "draining"), lets the replies in flight finish for up to --shutdown-timeout
seconds, closes realtime connections with code 1001 and exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging

from ..config import WORKERS
from .runtime import Runtime, ServeConfig

log = logging.getLogger("lfm2_audio.serving")


def load_runtime(model=None, device="cpu", dtype=None, config: ServeConfig | None = None, fast: bool = False,
                 lfm=None, quantize: str | None = None, vocoder: str | None = None) -> Runtime:
    """A Runtime over a checkpoint (or an already loaded LFM2Audio `lfm`)."""
    config = config or ServeConfig()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if lfm is None:
        from ..pipeline import LFM2Audio

        # The fast path is built where the engine runs (Runtime): in its child process, a copy
        # here would be memory for nothing.
        lfm = LFM2Audio.from_pretrained(model, dtype=dtype, device=device, fast=False, quantize=quantize, vocoder=vocoder)
    return Runtime(lfm, config, fast=fast)


def make_server(rt: Runtime, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", app=None):
    """A uvicorn server for `app` (default: create_app(rt)) that drains `rt` on SIGTERM."""
    import uvicorn

    from .app import create_app

    class Server(uvicorn.Server):
        draining = False
        announce = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.announce and self.servers:
                for s in self.servers[0].sockets:
                    h, p = s.getsockname()[:2]
                    print(f"lfm2-audio: serving on http://{h}:{p} (web page at /, realtime at ws://{h}:{p}/v1/realtime)",
                          flush=True)
                    break

        def handle_exit(self, sig, frame):
            # uvicorn's own handler stops at once and re-raises the signal after; we drain first
            # and exit normally.
            if self.draining:
                self.force_exit = True
                self.should_exit = True
                return
            self.draining = True
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self):
            try:
                await rt.drain()
            finally:
                self.should_exit = True

    config = uvicorn.Config(app if app is not None else create_app(rt), host=host, port=port, log_level=log_level, lifespan="on",
                            ws_max_size=rt.config.max_message_bytes, timeout_graceful_shutdown=5,
                            ws_ping_interval=20, ws_ping_timeout=20,
                            # Realtime traffic is base64 PCM: deflate saves a quarter of the bytes
                            # for more CPU per message than the rest of the handling together.
                            ws_per_message_deflate=False)
    return Server(config)


def serve(args) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServeConfig(model_name=args.model_name, max_sessions=args.max_sessions, max_context=args.max_context,
                      queue_timeout=args.queue_timeout, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                      max_new_tokens=args.max_new_tokens, shutdown_timeout=args.shutdown_timeout, vad=args.vad,
                      threads=args.threads, codec_process=WORKERS[args.codec_worker],
                      engine_process=WORKERS[args.engine_worker])
    rt = load_runtime(args.model, device=args.device, dtype=args.dtype, config=cfg, fast=args.engine == "fast",
                      quantize=args.quantize, vocoder=args.vocoder)
    server = make_server(rt, args.host, args.port, args.log_level)
    server.run()
    return 0 if not getattr(server, "force_exit", False) else 1
