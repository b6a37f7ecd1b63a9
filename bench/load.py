"""Load benchmark: N concurrent realtime voice sessions against `lfm2-audio serve` on loopback.

Each session connects to /v1/realtime, streams a spoken question (assets/examples/question.wav)
in real time as a microphone would (20 ms chunks, then silence until the answer is over),
lets the server's VAD end the turn, and reads the streamed answer. Reported per N:

  TTFA         time to first audio: from the server's commit of the turn (input_audio_buffer
               .committed) to the first response.audio.delta; p50 / p95 over sessions. Add the
               VAD's silence window (--silence-ms) for the time from the end of speech.
  RTF          generation time over audio length per stream (commit -> response.done, divided by
               the seconds of audio received); < 1 is faster than real time. "stalls" counts
               streams whose audio would have run dry had playback started with the first chunk.
  errors       error events, failed or missing responses, connection failures.
  frames/s     aggregate audio frames generated per second (first commit -> last done), and the
               ratio to the single-session rate measured by running sessions one after another.
  cpu ms/frame server CPU time (all its threads and child processes) per audio frame over the
               level: the measure that holds on a machine shared with other work, where
               wall-clock rates do not. "client": the same for this load generator, which on
               loopback takes its share of the same cores.

    python bench/load.py --tiny                       # a tiny random checkpoint (mechanics only)
    python bench/load.py --model DIR --sessions 1,4,16,64
    python bench/load.py --url ws://127.0.0.1:8000    # a server already running

Numbers from the tiny random model measure the serving machinery, not a real model: rerun
with the demo model (the default --model) for figures that mean anything for users.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from lfm2_audio.config import VOCODERS, WORKERS

ROOT = Path(__file__).resolve().parents[1]
QUESTION = ROOT / "src" / "lfm2_audio" / "assets" / "examples" / "question.wav"
RATE = 24000
CHUNK_MS = 20  # microphone chunk (--chunk-ms)
SERVER_PID: int | None = None


def server_cpu() -> float:
    """CPU seconds the server has used (user + system, all threads), its child processes (the
    codec's) included."""
    if SERVER_PID is None:
        return float("nan")
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            stats[int(d.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, ticks
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo = 0, [SERVER_PID]
    while todo:
        pid = todo.pop()
        ticks += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Stream:
    ok: bool = False
    error: str | None = None
    t_commit: float | None = None
    t_first_audio: float | None = None
    t_done: float | None = None
    audio_samples: int = 0
    frames: int = 0
    tokens: int = 0
    arrivals: list = field(default_factory=list)  # (time, samples so far)
    status: str | None = None

    @property
    def ttfa(self):
        return None if self.t_first_audio is None else self.t_first_audio - self.t_commit

    @property
    def rtf(self):
        if not self.audio_samples or self.t_done is None:
            return None
        return (self.t_done - self.t_commit) / (self.audio_samples / RATE)

    def stalls(self) -> bool:
        """Would playback that starts at the first chunk have run out of audio?"""
        if not self.arrivals:
            return False
        t0 = self.arrivals[0][0]
        # A chunk that arrives after the audio before it has played out (50 ms of slack, a
        # small jitter buffer) is a gap the listener hears.
        return any(t - t0 > before / RATE + 0.05 for t, before in self.arrivals)


def question_pcm() -> tuple[bytes, bytes]:
    a, r = sf.read(QUESTION, dtype="float32")
    a = soxr.resample(a, r, RATE).astype(np.float32)
    pcm = (np.clip(a, -1, 1) * 32767).astype("<i2").tobytes()
    silence = bytes(2 * RATE)
    return pcm, silence


async def session(url: str, pcm: bytes, silence: bytes, max_tokens: int, silence_ms: int, timeout: float) -> Stream:
    import websockets

    s = Stream()
    step = 2 * RATE * CHUNK_MS // 1000
    silence = silence[:step]
    try:
        async with websockets.connect(url + "/v1/realtime", max_size=None, open_timeout=timeout) as ws:
            done = asyncio.Event()

            async def mic():
                # Speech, then silence for as long as the answer lasts: a live microphone.
                t_next = time.perf_counter()
                i = 0
                while not done.is_set():
                    chunk = pcm[i:i + step] if i < len(pcm) else silence
                    i += step
                    await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(chunk).decode()}))
                    t_next += CHUNK_MS / 1000
                    await asyncio.sleep(max(0.0, t_next - time.perf_counter()))

            await ws.send(json.dumps({"type": "session.update", "session": {
                "max_response_output_tokens": max_tokens,
                "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}))
            sender = asyncio.create_task(mic())
            try:
                deadline = time.perf_counter() + timeout
                while True:
                    ev = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.perf_counter())))
                    now = time.perf_counter()
                    kind = ev["type"]
                    if kind == "input_audio_buffer.committed" and s.t_commit is None:
                        s.t_commit = now
                    elif kind == "response.audio.delta":
                        n = len(ev["delta"]) * 3 // 4 // 2
                        if s.t_first_audio is None:
                            s.t_first_audio = now
                        s.arrivals.append((now, s.audio_samples))
                        s.audio_samples += n
                    elif kind == "error":
                        s.error = ev["error"].get("code") or "error"
                        break
                    elif kind == "response.done":
                        s.t_done = now
                        s.status = ev["response"]["status"]
                        usage = ev["response"].get("usage") or {}
                        details = usage.get("output_token_details") or {}
                        s.frames, s.tokens = details.get("audio_frames", 0), details.get("text_tokens", 0)
                        s.ok = s.status in ("completed", "incomplete") and s.audio_samples > 0
                        if not s.ok:
                            s.error = f"status {s.status}"
                        break
            finally:
                done.set()
                sender.cancel()
    except Exception as e:  # connection refused, timeouts, closed sockets: all count as errors
        s.error = f"{type(e).__name__}: {e}"
    return s


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


async def run_level(url, n, pcm, silence, args) -> dict:
    cpu0, client0 = server_cpu(), time.process_time()
    streams = await asyncio.gather(*(session(url, pcm, silence, args.max_tokens, args.silence_ms, args.timeout)
                                     for _ in range(n)))
    good = [s for s in streams if s.ok]
    ttfa = [s.ttfa for s in good if s.ttfa is not None]
    rtf = [s.rtf for s in good if s.rtf is not None]
    frames = sum(s.frames for s in good)
    t0 = min((s.t_commit for s in good), default=0.0)
    span = (max(s.t_done for s in good) - t0) if good else float("nan")
    cpu, client = server_cpu() - cpu0, time.process_time() - client0
    return {"server_cpu_s": cpu, "cpu_ms_per_frame": 1000 * cpu / frames if frames else float("nan"),
            "client_cpu_ms_per_frame": 1000 * client / frames if frames else float("nan"), "sessions": n, "ok": len(good), "errors": n - len(good),
            "error_kinds": sorted({s.error for s in streams if s.error})[:5],
            "ttfa_p50": pct(ttfa, 50), "ttfa_p95": pct(ttfa, 95),
            "rtf_p50": pct(rtf, 50), "rtf_max": max(rtf) if rtf else float("nan"),
            "faster_than_realtime": sum(r < 1 for r in rtf), "stalls": sum(s.stalls() for s in good),
            "frames": frames, "frames_per_s": frames / span if good else 0.0,
            # per stream (JSON only): when its turn was committed after the first commit, its
            # time to first audio and to done, and the seconds of audio it got
            "streams": [{"commit_s": round(s.t_commit - t0, 4), "ttfa_s": s.ttfa and round(s.ttfa, 4),
                         "done_s": round(s.t_done - s.t_commit, 4), "audio_s": round(s.audio_samples / RATE, 3)}
                        for s in good]}


async def run_sequential(url, runs, pcm, silence, args) -> dict:
    """The single-session rate: sessions one after another, generation time only."""
    frames, seconds = 0, 0.0
    cpu0 = server_cpu()
    for _ in range(runs):
        s = await session(url, pcm, silence, args.max_tokens, args.silence_ms, args.timeout)
        if s.ok:
            frames += s.frames
            seconds += s.t_done - s.t_commit
    cpu = server_cpu() - cpu0
    return {"runs": runs, "frames_per_s": frames / seconds if seconds else 0.0,
            "cpu_ms_per_frame": 1000 * cpu / frames if frames else float("nan")}


def start_server(args, max_sessions: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lfm2_audio.cli", "serve", "--port", "0", "--max-sessions", str(max_sessions),
           "--max-context", str(args.max_context), "--queue-timeout", "60", "--vad", args.vad, "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--engine", args.engine]
    if args.vocoder:
        cmd += ["--vocoder", args.vocoder]
    cmd += ["--codec-worker", args.codec_worker, "--engine-worker", args.engine_worker]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("server failed to start:\n" + "".join(lines))
        lines.append(line)
        if "serving on " in line:
            http = line.split("serving on ")[1].split()[0]
            import threading

            threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stdout], daemon=True).start()
            return proc, http.replace("http://", "ws://")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled demo model)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint (tests the machinery only)")
    ap.add_argument("--url", default=None, help="ws://host:port of a running server instead of starting one")
    ap.add_argument("--sessions", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=200, help="reply length (text tokens + audio frames)")
    ap.add_argument("--sequential-runs", type=int, default=3)
    ap.add_argument("--silence-ms", type=int, default=500, help="server VAD silence that ends a turn")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vad", default="auto")
    ap.add_argument("--engine", choices=("fast", "plain"), default="fast")
    ap.add_argument("--vocoder", choices=VOCODERS, default=None,
                    help="the demo codec's vocoder on the server (default: hifigan)")
    ap.add_argument("--codec-worker", choices=list(WORKERS), default="auto",
                    help="where the server decodes audio (serve --codec-worker)")
    ap.add_argument("--engine-worker", choices=list(WORKERS), default="auto",
                    help="where the server runs the model (serve --engine-worker)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--chunk-ms", type=int, default=40, help="microphone chunk length sent per message")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.sessions.split(",")]
    global CHUNK_MS, SERVER_PID
    CHUNK_MS = args.chunk_ms
    tmp = None
    if args.tiny:
        from lfm2_audio.serving.testing import make_tiny_checkpoint

        tmp = tempfile.TemporaryDirectory()
        args.model = str(make_tiny_checkpoint(Path(tmp.name) / "tiny", ROOT / "tests" / "assets" / "tokenizer.json"))
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args, max(levels))
        SERVER_PID = proc.pid
    pcm, silence = question_pcm()
    try:  # the load generator shares the cores with the server: the lighter loop when there is one
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # 0.46 against 0.56-0.64 ms of CPU per frame
    except ImportError:
        pass
    results = {"model": "tiny-random" if args.tiny else (args.model or "demo"), "max_tokens": args.max_tokens,
               "cpu_count": os.cpu_count(), "levels": []}
    try:
        asyncio.run(session(url, pcm, silence, 20, args.silence_ms, args.timeout))  # warm up
        seq = asyncio.run(run_sequential(url, args.sequential_runs, pcm, silence, args))
        results["single_session"] = seq
        print(f"single session, {seq['runs']} runs one after another: {seq['frames_per_s']:.1f} frames/s, "
              f"{seq['cpu_ms_per_frame']:.2f} server cpu ms/frame")
        print(f"{'N':>4} {'ok':>4} {'err':>4} {'TTFA p50':>9} {'TTFA p95':>9} {'RTF p50':>8} {'RTF max':>8} "
              f"{'<1x RT':>7} {'stalls':>6} {'frames/s':>9} {'vs 1':>6} {'cpu ms/frame':>13} {'client':>7}")
        for n in levels:
            r = asyncio.run(run_level(url, n, pcm, silence, args))
            r["speedup_vs_sequential"] = r["frames_per_s"] / seq["frames_per_s"] if seq["frames_per_s"] else float("nan")
            results["levels"].append(r)
            print(f"{n:>4} {r['ok']:>4} {r['errors']:>4} {r['ttfa_p50'] * 1000:>7.0f}ms {r['ttfa_p95'] * 1000:>7.0f}ms "
                  f"{r['rtf_p50']:>8.2f} {r['rtf_max']:>8.2f} {r['faster_than_realtime']:>7} {r['stalls']:>6} "
                  f"{r['frames_per_s']:>9.1f} {r['speedup_vs_sequential']:>5.1f}x {r['cpu_ms_per_frame']:>13.2f} {r['client_cpu_ms_per_frame']:>7.2f}"
                  + (f"  errors: {r['error_kinds']}" if r["errors"] else ""), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
