"""OpenAI-compatible HTTP endpoints: transcriptions, speech, chat completions (and models).

Request bodies are parsed by hand rather than by pydantic models so that every mistake gets
an OpenAI-style error object naming the field (`{"error": {"message", "type", "param",
"code"}}`) with status 400, instead of a framework-specific 422. Work that can fail on the
caller's input (JSON, audio decoding, admission) happens before a streamed response starts,
so those failures are proper HTTP errors; a failure after the first byte ends the stream with
an error event (SSE) or a short body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import UploadFile

from ..errors import InputError
from ..generation.chat import SYSTEM_PROMPTS
from ..generation.sampling import Sampling
from .audio import b64, to_pcm16, wav_header
from .runtime import Chunk, Runtime, chat_system_prompt, check_voice
from .reply import ReplyParams

FINISH = {"end_of_turn": "stop", "max_new_tokens": "length", "context_limit": "length"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def field(body: dict, name: str, kind, default=None, required: bool = False, choices=None):
    """body[name] checked against a type (and choices); `default` when absent or null."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_field")
        return default
    v = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be a {names}", param=name, code="invalid_type")
    if choices is not None and v not in choices:
        raise ApiError(400, f"'{name}' must be one of {', '.join(map(str, choices))}; got {v!r}", param=name,
                       code="invalid_value")
    return v


def sse(data) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


def make_router(rt: Runtime) -> APIRouter:
    router = APIRouter()
    cfg = rt.config

    async def features_of(data: bytes, param: str):
        try:
            return await asyncio.to_thread(rt.engine.features, data)
        except InputError as e:
            raise ApiError(400, str(e), param=param, code="invalid_audio") from None

    # ---- /v1/models -------------------------------------------------------------------------

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(rt.started_at),
                                            "owned_by": "lfm2-audio"}]}

    # ---- /v1/audio/transcriptions -----------------------------------------------------------

    @router.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "send multipart/form-data with the audio in the 'file' field", code="invalid_content_type")
        form = await request.form(max_files=1, max_fields=32)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "'file' is required: the audio file to transcribe", param="file", code="missing_field")
        fmt = form.get("response_format") or "json"
        if fmt not in ("json", "text", "verbose_json"):
            raise ApiError(400, f"response_format must be json, text or verbose_json; got {fmt!r}",
                           param="response_format", code="invalid_value")
        stream = str(form.get("stream") or "false").lower() in ("true", "1")
        data = await upload.read()
        if not data:
            raise ApiError(400, "the uploaded file is empty", param="file", code="invalid_audio")
        feats = await features_of(data, "file")
        duration = feats.value.shape[-1] * rt.lfm.model.cfg.preprocessor.window_stride
        t0 = time.perf_counter()
        chunks = rt.transcribe(feats, t0=t0)
        first = await anext_or_raise(chunks)  # admission errors surface as HTTP errors here

        if stream:
            async def events():
                text = []
                try:
                    async for c in prepend(first, chunks):
                        if c.kind == "text":
                            text.append(c.text)
                            yield sse({"type": "transcript.text.delta", "delta": c.text})
                        elif c.kind == "error":
                            yield sse(error_body(c.text, type="server_error", code=c.code))
                    yield sse({"type": "transcript.text.done", "text": "".join(text).strip()})
                    rt.metrics.requests.inc(endpoint="transcriptions", status="ok")
                finally:
                    await chunks.aclose()
            return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

        text, end = [], None
        async for c in prepend(first, chunks):
            if c.kind == "text":
                text.append(c.text)
            elif c.kind == "error":
                raise ApiError(500 if c.code == "internal_error" else 400, c.text, code=c.code,
                               type="server_error" if c.code == "internal_error" else "invalid_request_error")
            elif c.kind == "end":
                end = c.reason
        result = "".join(text).strip()
        rt.metrics.requests.inc(endpoint="transcriptions", status="ok")
        if fmt == "text":
            return PlainTextResponse(result + "\n")
        if fmt == "verbose_json":
            return {"task": "transcribe", "language": form.get("language") or "english", "duration": round(duration, 3),
                    "text": result, "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": round(duration, 3),
                                                  "text": result}],
                    "finish_reason": FINISH.get(end, end)}
        return {"text": result}

    # ---- /v1/audio/speech -------------------------------------------------------------------

    @router.post("/v1/audio/speech")
    async def speech(request: Request):
        body = await json_body(request)
        text = field(body, "input", str, required=True)
        if not text.strip():
            raise ApiError(400, "'input' must not be empty", param="input", code="invalid_value")
        if len(text) > 4096:
            raise ApiError(400, "'input' is limited to 4096 characters", param="input", code="invalid_value")
        voice = field(body, "voice", str, default="us-female")
        try:
            check_voice(voice)
        except InputError as e:
            raise ApiError(400, str(e), param="voice", code="invalid_value") from None
        fmt = field(body, "response_format", str, default="wav", choices=("wav", "pcm"))
        stream_format = field(body, "stream_format", str, default="audio", choices=("audio", "sse"))
        speed = field(body, "speed", (int, float), default=1.0)
        if speed != 1.0:
            raise ApiError(400, "only speed 1.0 is supported", param="speed", code="unsupported_value")
        sampling = sampling_of(body, rt.lfm.audio_sampling["tts"], "temperature", "top_k")
        params = ReplyParams(mode="sequential", audio_sampling=sampling,
                             max_new_tokens=rt.clamp_tokens(field(body, "max_tokens", int)),
                             seed=field(body, "seed", int),
                             # The endpoint only wants speech: start the reply with the audio
                             # marker rather than let the model chat first.
                             force_tokens=(rt.lfm.tokenizer.audio_start_id,))
        if not rt.has_audio_output:
            raise ApiError(400, "this checkpoint has no audio codec: speech output is not available",
                           code="no_audio_output")
        session = await rt.open_session(SYSTEM_PROMPTS[f"tts-{voice}"])
        try:
            chunks = rt.reply(session, [("user", [text])], params, audio=True).__aiter__()
        except BaseException:
            session.close()
            raise
        rate = rt.codec.sample_rate

        async def audio_bytes():
            try:
                if fmt == "wav" and stream_format == "audio":
                    yield wav_header(rate)
                async for c in chunks:
                    if c.kind == "audio" and c.audio is not None and c.audio.size:
                        pcm = to_pcm16(c.audio)
                        rt.metrics.audio_seconds.inc(c.audio.size / rate)
                        yield sse({"type": "speech.audio.delta", "audio": b64(pcm)}) if stream_format == "sse" else pcm
                    elif c.kind == "error":
                        rt.metrics.requests.inc(endpoint="speech", status="error")
                        if stream_format == "sse":
                            yield sse(error_body(c.text, type="server_error", code=c.code))
                        return
                if stream_format == "sse":
                    yield sse({"type": "speech.audio.done"})
                rt.metrics.requests.inc(endpoint="speech", status="ok")
            finally:
                await chunks.aclose()
                session.close()

        media = "text/event-stream" if stream_format == "sse" else ("audio/wav" if fmt == "wav" else "audio/pcm")
        headers = dict(SSE_HEADERS)
        headers["X-Sample-Rate"] = str(rate)
        return StreamingResponse(audio_bytes(), media_type=media, headers=headers)

    # ---- /v1/chat/completions ---------------------------------------------------------------

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        messages = field(body, "messages", list, required=True)
        if not messages:
            raise ApiError(400, "'messages' must not be empty", param="messages", code="invalid_value")
        modalities = field(body, "modalities", list, default=["text"])
        if not modalities or any(m not in ("text", "audio") for m in modalities) or "text" not in modalities:
            raise ApiError(400, "modalities must be [\"text\"] or [\"text\", \"audio\"]", param="modalities",
                           code="invalid_value")
        want_audio = "audio" in modalities
        audio_opts = field(body, "audio", dict, default={})
        voice = audio_opts.get("voice")
        out_format = audio_opts.get("format", "wav")
        if want_audio:
            if out_format not in ("wav", "pcm16"):
                raise ApiError(400, "audio.format must be wav or pcm16", param="audio.format", code="invalid_value")
            if voice is not None:
                try:
                    check_voice(voice)
                except InputError as e:
                    raise ApiError(400, str(e), param="audio.voice", code="invalid_value") from None
            if not rt.has_audio_output:
                raise ApiError(400, "this checkpoint has no audio codec: audio output is not available",
                               param="modalities", code="no_audio_output")
        stream = field(body, "stream", bool, default=False)
        include_usage = bool((field(body, "stream_options", dict, default={}) or {}).get("include_usage"))
        max_tokens = field(body, "max_completion_tokens", int, default=field(body, "max_tokens", int))
        temperature = field(body, "temperature", (int, float), default=0.0)
        top_p = field(body, "top_p", (int, float))
        try:
            text_sampling = Sampling(float(temperature), None, float(top_p) if top_p is not None else None)
        except InputError as e:
            raise ApiError(400, str(e), param="temperature", code="invalid_value") from None
        params = ReplyParams(mode="interleaved" if want_audio else "sequential", text_sampling=text_sampling,
                             audio_sampling=sampling_of(body, rt.lfm.audio_sampling["chat"], "audio_temperature",
                                                       "audio_top_k"),
                             max_new_tokens=rt.clamp_tokens(max_tokens), seed=field(body, "seed", int),
                             stop_at_audio=not want_audio)
        instructions, turns = await parse_messages(messages)
        system = chat_system_prompt(instructions, voice if want_audio else None)
        session = await rt.open_session(system)
        try:
            stream_ = rt.reply(session, turns, params, audio=want_audio)
            chunks = stream_.__aiter__()
        except BaseException:
            session.close()
            raise
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        audio_id = f"audio_{uuid.uuid4().hex[:24]}"
        rate = rt.codec.sample_rate

        def usage():
            prompt = stream_.request.prompt_positions
            reply = stream_.request.reply
            done = (reply.tokens + reply.frames) if reply is not None else 0
            return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

        if stream:
            def chunk(delta, finish=None):
                return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

            async def events():
                try:
                    yield chunk({"role": "assistant", "content": "" if not want_audio else None})
                    reason = None
                    async for c in chunks:
                        if c.kind == "text":
                            yield chunk({"audio": {"id": audio_id, "transcript": c.text}} if want_audio else {"content": c.text})
                        elif c.kind == "audio" and c.audio is not None and c.audio.size:
                            rt.metrics.audio_seconds.inc(c.audio.size / rate)
                            yield chunk({"audio": {"id": audio_id, "data": b64(to_pcm16(c.audio))}})
                        elif c.kind == "error":
                            rt.metrics.requests.inc(endpoint="chat", status="error")
                            yield sse(error_body(c.text, type="server_error", code=c.code))
                            yield sse("[DONE]")
                            return
                        elif c.kind == "end":
                            reason = c.reason
                    yield chunk({}, FINISH.get(reason, "stop"))
                    if include_usage:
                        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                   "model": cfg.model_name, "choices": [], "usage": usage()})
                    yield sse("[DONE]")
                    rt.metrics.requests.inc(endpoint="chat", status="ok")
                finally:
                    await chunks.aclose()
                    session.close()

            return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

        try:
            text, audio, reason = [], [], None
            async for c in chunks:
                if c.kind == "text":
                    text.append(c.text)
                elif c.kind == "audio" and c.audio is not None:
                    audio.append(c.audio)
                elif c.kind == "error":
                    internal = c.code == "internal_error"
                    raise ApiError(500 if internal else 400, c.text, code=c.code,
                                   type="server_error" if internal else "invalid_request_error")
                elif c.kind == "end":
                    reason = c.reason
        finally:
            await chunks.aclose()
            session.close()
        content = "".join(text)
        message = {"role": "assistant", "content": content}
        if want_audio:
            wave = np.concatenate(audio) if audio else np.zeros(0, np.float32)
            rt.metrics.audio_seconds.inc(wave.size / rate)
            pcm = to_pcm16(wave)
            data = (wav_header(rate, wave.size) + pcm) if out_format == "wav" else pcm
            message = {"role": "assistant", "content": None,
                       "audio": {"id": audio_id, "data": b64(data), "transcript": content,
                                 "expires_at": int(time.time()) + 3600}}
        rt.metrics.requests.inc(endpoint="chat", status="ok")
        return {"id": cid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": FINISH.get(reason, "stop")}],
                "usage": usage()}

    async def parse_messages(messages: list):
        """OpenAI messages -> (system instructions, [(role, [text | Features])])."""
        instructions, turns = [], []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise ApiError(400, f"{where} must be an object", param=where, code="invalid_type")
            role = m.get("role")
            content = m.get("content")
            if role in ("system", "developer"):
                instructions.append(text_of(content, where))
            elif role == "user":
                turns.append(("user", await user_parts(content, where)))
            elif role == "assistant":
                if content is not None:
                    turns.append(("assistant", [text_of(content, where)]))
            else:
                raise ApiError(400, f"{where}.role must be system, developer, user or assistant; got {role!r}",
                               param=f"{where}.role", code="invalid_value")
        if not any(r == "user" for r, _ in turns):
            raise ApiError(400, "messages need at least one user message", param="messages", code="invalid_value")
        return ("\n".join(t for t in instructions if t) or None), turns

    def text_of(content, where: str) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                             for p in content):
            return "".join(p["text"] for p in content)
        raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content",
                       code="invalid_value")

    async def user_parts(content, where: str) -> list:
        if isinstance(content, str):
            return [content]
        if not isinstance(content, list) or not content:
            raise ApiError(400, f"{where}.content must be a string or a non-empty list of parts",
                           param=f"{where}.content", code="invalid_value")
        parts = []
        for j, p in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif kind == "input_audio":
                audio = p.get("input_audio")
                if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
                    raise ApiError(400, f"{pw}.input_audio.data must be base64 audio", param=pw, code="invalid_value")
                fmt = audio.get("format", "wav")
                if fmt not in ("wav", "mp3", "flac", "ogg", "pcm16"):
                    raise ApiError(400, f"{pw}.input_audio.format {fmt!r} is not supported (wav, mp3, flac, ogg, pcm16)",
                                   param=pw, code="invalid_audio")
                try:
                    raw = base64.b64decode(audio["data"], validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(400, f"{pw}.input_audio.data is not valid base64", param=pw, code="invalid_audio") from None
                if len(raw) > cfg.max_upload_bytes:
                    raise ApiError(413, f"{pw}: audio over {cfg.max_upload_bytes} bytes", param=pw, code="too_large")
                if fmt == "pcm16":  # raw 16-bit mono at 24 kHz, like the realtime API
                    from .audio import from_pcm16

                    try:
                        wave = from_pcm16(raw)
                        feats = await asyncio.to_thread(rt.engine.features, wave, 24000)
                    except InputError as e:
                        raise ApiError(400, f"{pw}: {e}", param=pw, code="invalid_audio") from None
                else:
                    feats = await features_of(raw, pw)
                parts.append(feats)
            else:
                raise ApiError(400, f"{pw}: part type {kind!r} is not supported (text, input_audio)", param=pw,
                               code="unsupported_content")
        return parts

    return router


def sampling_of(body: dict, default: Sampling, temp_key: str, top_k_key: str) -> Sampling:
    t = field(body, temp_key, (int, float))
    k = field(body, top_k_key, int)
    try:
        return default.overridden(float(t) if t is not None else None, k)
    except InputError as e:
        raise ApiError(400, str(e), param=temp_key, code="invalid_value") from None


async def anext_or_raise(agen):
    """The first chunk of a reply, so that errors before any output become HTTP errors."""
    first = await agen.__anext__()
    if first.kind == "error":
        await agen.aclose()
        internal = first.code == "internal_error"
        raise ApiError(500 if internal else 400, first.text, code=first.code,
                       type="server_error" if internal else "invalid_request_error")
    return first


async def prepend(first: Chunk, agen):
    yield first
    async for c in agen:
        yield c
