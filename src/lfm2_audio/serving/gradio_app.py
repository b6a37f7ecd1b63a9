"""`lfm2-audio demo`: a Gradio app on the serving engine (install the `demo` extra).

The Gradio UI is mounted at /demo on the same FastAPI app as `lfm2-audio serve`, so one
process, one loaded model and one engine serve the demo, the web page at / and the API.
Each submit sends the conversation so far (earlier user audio is kept as features, earlier
answers as text) plus the new turn, and streams the answer: text into the chat, audio into a
streaming player.
"""

from __future__ import annotations

import asyncio

import numpy as np

from ..errors import InputError
from ..generation.chat import VOICES
from ..generation.sampling import GREEDY
from .reply import ReplyParams
from .runtime import Busy, Runtime, chat_system_prompt

MODES = {"Speech + text": "speech", "Text only": "text", "Transcribe": "transcribe"}


def build_demo(rt: Runtime):
    import shutil

    import gradio as gr

    # Gradio streams audio to the player through ffmpeg; without it the answer's audio is
    # handed over whole when it is complete.
    streaming = shutil.which("ffmpeg") is not None

    async def respond(audio, text, mode_label, voice, history, chat):
        mode = MODES[mode_label]
        history, chat = list(history or []), list(chat or [])
        contents, shown = [], []
        if audio is not None:
            rate, data = audio
            try:
                contents.append(await asyncio.to_thread(rt.engine.features, data, int(rate)))
            except InputError as e:
                raise gr.Error(f"cannot use this recording: {e}") from None
            shown.append("🎤 (voice message)")
        if text and text.strip():
            contents.append(text.strip())
            shown.append(text.strip())
        if not contents:
            raise gr.Error("record something or type a message first")
        chat.append({"role": "user", "content": " ".join(shown)})
        chat.append({"role": "assistant", "content": ""})
        yield chat, None, history, gr.update(value=None), gr.update(value="")
        audio_out = mode == "speech" and rt.has_audio_output
        try:
            if mode == "transcribe":
                if audio is None:
                    raise gr.Error("Transcribe needs a recording")
                stream = rt.transcribe(contents[0])
            else:
                session = await rt.open_session(chat_system_prompt(None, voice or None))
                params = ReplyParams(mode="interleaved" if audio_out else "sequential", text_sampling=GREEDY,
                                     audio_sampling=rt.lfm.audio_sampling["chat"],
                                     max_new_tokens=rt.config.max_new_tokens, stop_at_audio=not audio_out)
                stream = _closing(rt.reply(session, history + [("user", contents)], params, audio=audio_out), session)
            answer, whole = [], []
            async for c in stream:
                if c.kind == "text":
                    answer.append(c.text)
                    chat[-1]["content"] = "".join(answer)
                    yield chat, None, history, gr.update(), gr.update()
                elif c.kind == "audio" and c.audio is not None and c.audio.size:
                    pcm = (np.clip(c.audio, -1, 1) * 32767).astype(np.int16)
                    if streaming:
                        yield chat, (rt.codec.sample_rate, pcm), history, gr.update(), gr.update()
                    else:
                        whole.append(pcm)
                elif c.kind == "error":
                    raise gr.Error(c.text)
        except Busy as e:
            raise gr.Error(str(e)) from None
        if mode != "transcribe":
            history = history + [("user", contents), ("assistant", ["".join(answer)])]
        chat[-1]["content"] = "".join(answer).strip() or "(no text)"
        final = (rt.codec.sample_rate, np.concatenate(whole)) if whole else gr.update()
        yield chat, final, history, gr.update(), gr.update()

    with gr.Blocks(title="LFM2-Audio") as demo:
        gr.Markdown("# LFM2-Audio\nRecord a question or type one; the answer streams back as text and speech.")
        with gr.Row():
            mode = gr.Radio(list(MODES), value="Speech + text", label="Mode")
            voice = gr.Dropdown([""] + list(VOICES), value="", label="Voice (empty: the model's default)")
        chat = gr.Chatbot(label="Conversation", height=360)
        player = gr.Audio(label="Answer", streaming=streaming, autoplay=True, interactive=False)
        with gr.Row():
            mic = gr.Audio(sources=["microphone", "upload"], type="numpy", label="Your voice")
            text = gr.Textbox(label="Or type", lines=2)
        with gr.Row():
            send = gr.Button("Send", variant="primary")
            clear = gr.Button("New conversation")
        history = gr.State([])
        send.click(respond, [mic, text, mode, voice, history, chat], [chat, player, history, mic, text])
        clear.click(lambda: ([], [], None), None, [chat, history, player])
    return demo


async def _closing(stream, session):
    """The reply's chunks; the session is closed however the consumer stops."""
    try:
        async for c in stream:
            yield c
    finally:
        session.close()


def main(args) -> int:
    try:
        import gradio as gr
    except ImportError:
        raise InputError("the demo needs Gradio: pip install 'lfm2-audio[demo]'") from None
    from .app import create_app
    from ..config import WORKERS
    from .runtime import ServeConfig
    from .server import load_runtime, make_server

    cfg = ServeConfig(max_sessions=args.max_sessions, max_context=args.max_context, max_new_tokens=args.max_new_tokens,
                      threads=args.threads, codec_process=WORKERS[args.codec_worker],
                      engine_process=WORKERS[args.engine_worker])
    rt = load_runtime(args.model, device=args.device, dtype=args.dtype, config=cfg, fast=args.engine == "fast",
                      quantize=args.quantize, vocoder=args.vocoder)
    app = gr.mount_gradio_app(create_app(rt), build_demo(rt), path="/demo")
    server = make_server(rt, args.host, args.port, "info", app=app)
    print(f"lfm2-audio demo: open http://{args.host}:{args.port}/demo", flush=True)
    server.run()
    return 0
