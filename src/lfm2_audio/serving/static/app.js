// The voice chat page: microphone -> /v1/realtime -> transcript and reply audio.
//
// Audio goes up as base64 PCM16 at the microphone's own rate (the session's
// input_audio_sample_rate; the server resamples), and comes back as PCM16 at 24 kHz, played
// through a 24 kHz AudioContext one chunk after the other. When the server hears the user
// start talking it cancels the reply; the page drops whatever reply audio is still queued.
//
// window.lfm exposes counters that the browser test reads.
"use strict";

const $ = (id) => document.getElementById(id);
const state = (window.lfm = {
  connected: false, sessionCreated: false, speechStarted: 0, speechStopped: 0, committed: 0,
  responses: 0, responsesDone: 0, cancelled: 0, audioChunks: 0, samplesQueued: 0, samplesPlayed: 0,
  userTranscripts: [], assistantText: "", errors: [],
});

let ws = null, micCtx = null, micStream = null, playCtx = null, playing = [], playEnd = 0;
let assistantDiv = null, userDivs = {}, responseActive = false;

function setStatus(text) { $("status").textContent = text; }

function logTurn(cls, text) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function sessionConfig() {
  const mode = $("mode").value;
  return {
    modalities: mode === "speech" ? ["text", "audio"] : ["text"],
    task: mode === "transcribe" ? "transcribe" : "chat",
    voice: $("voice").value || null,
    input_audio_sample_rate: micCtx ? micCtx.sampleRate : 24000,
    input_audio_transcription: { model: "lfm2-audio" },
    turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 600 },
  };
}

// ---- audio out ----------------------------------------------------------------------------

function b64ToPcm(b64) {
  const bin = atob(b64);
  const n = bin.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    if (v >= 32768) v -= 65536;
    out[i] = v / 32768;
  }
  return out;
}

function play(samples) {
  if (!playCtx) return;
  const buf = playCtx.createBuffer(1, samples.length, 24000);
  buf.copyToChannel(samples, 0);
  const src = playCtx.createBufferSource();
  src.buffer = buf;
  src.connect(playCtx.destination);
  const t = Math.max(playEnd, playCtx.currentTime + 0.03);
  src.start(t);
  playEnd = t + buf.duration;
  playing.push(src);
  state.samplesQueued += samples.length;
  src.onended = () => {
    playing = playing.filter((s) => s !== src);
    if (!src.stoppedEarly) state.samplesPlayed += samples.length;
  };
}

function stopPlayback() {
  for (const s of playing) { s.stoppedEarly = true; try { s.stop(); } catch (e) {} }
  playing = [];
  playEnd = 0;
}

// ---- audio in -----------------------------------------------------------------------------

function pcmToB64(floats) {
  const bytes = new Uint8Array(floats.length * 2);
  for (let i = 0; i < floats.length; i++) {
    const v = Math.max(-1, Math.min(1, floats[i]));
    const s = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
    bytes[2 * i] = s & 0xff;
    bytes[2 * i + 1] = (s >> 8) & 0xff;
  }
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

async function startMic() {
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  micCtx = new AudioContext();
  await micCtx.audioWorklet.addModule("/static/capture-worklet.js");
  const source = micCtx.createMediaStreamSource(micStream);
  const node = new AudioWorkletNode(micCtx, "capture");
  node.port.onmessage = (e) => {
    const block = e.data;
    let sum = 0;
    for (let i = 0; i < block.length; i++) sum += block[i] * block[i];
    $("meter").firstChild.style.width = Math.min(100, Math.sqrt(sum / block.length) * 400) + "%";
    send({ type: "input_audio_buffer.append", audio: pcmToB64(block) });
  };
  source.connect(node);
  // The worklet must be pulled by the graph to run; a muted gain keeps it silent.
  const mute = micCtx.createGain();
  mute.gain.value = 0;
  node.connect(mute).connect(micCtx.destination);
}

// ---- the conversation ---------------------------------------------------------------------

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      state.sessionCreated = true;
      send({ type: "session.update", session: sessionConfig() });
      setStatus("Listening: say something.");
      break;
    case "session.updated":
      break;
    case "input_audio_buffer.speech_started":
      state.speechStarted++;
      stopPlayback();  // barge-in: the server has cancelled the reply
      if (assistantDiv && responseActive) assistantDiv.classList.add("cut");
      setStatus("Hearing you…");
      break;
    case "input_audio_buffer.speech_stopped":
      state.speechStopped++;
      setStatus("Thinking…");
      break;
    case "input_audio_buffer.committed":
      state.committed++;
      userDivs[ev.item_id] = logTurn("user", "…");
      break;
    case "conversation.item.input_audio_transcription.delta": {
      const d = userDivs[ev.item_id];
      if (d) d.textContent = (d.textContent === "…" ? "" : d.textContent) + ev.delta;
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      state.userTranscripts.push(ev.transcript);
      const d = userDivs[ev.item_id];
      if (d) d.textContent = ev.transcript || "(no words heard)";
      if ($("mode").value === "transcribe") setStatus("Listening: say something.");
      break;
    }
    case "response.created":
      state.responses++;
      responseActive = true;
      assistantDiv = logTurn("assistant", "");
      setStatus("Answering… (talk to interrupt)");
      $("interrupt").disabled = false;
      break;
    case "response.audio_transcript.delta":
    case "response.text.delta":
      state.assistantText += ev.delta;
      if (assistantDiv) {
        const t = assistantDiv.textContent + ev.delta;
        assistantDiv.textContent = t.trimStart();  // answers often open with a newline
      }
      break;
    case "response.audio.delta":
      state.audioChunks++;
      play(b64ToPcm(ev.delta));
      break;
    case "response.done":
      state.responsesDone++;
      responseActive = false;
      $("interrupt").disabled = true;
      if (ev.response.status === "cancelled") {
        state.cancelled++;
        if (assistantDiv) assistantDiv.classList.add("cut");
      }
      setStatus("Listening: say something.");
      break;
    case "error":
      state.errors.push(ev.error);
      logTurn("error", "Error: " + ev.error.message);
      break;
  }
}

async function start() {
  $("start").disabled = true;
  try {
    playCtx = new AudioContext({ sampleRate: 24000 });
    await startMic();
  } catch (e) {
    setStatus("Microphone unavailable: " + e.message);
    $("start").disabled = false;
    return;
  }
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${proto}//${location.host}/v1/realtime`);
  ws.onopen = () => { state.connected = true; setStatus("Connected."); };
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  ws.onclose = (e) => {
    state.connected = false;
    setStatus(`Disconnected${e.reason ? ": " + e.reason : ""}.`);
    stop(false);
  };
  $("stop").disabled = false;
}

function stop(closeSocket = true) {
  if (closeSocket && ws) ws.close();
  ws = null;
  stopPlayback();
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (micCtx) micCtx.close();
  if (playCtx) playCtx.close();
  micStream = micCtx = playCtx = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  $("interrupt").disabled = true;
}

$("start").onclick = start;
$("stop").onclick = () => stop(true);
$("interrupt").onclick = () => { stopPlayback(); send({ type: "response.cancel" }); };
$("mode").onchange = $("voice").onchange = () => send({ type: "session.update", session: sessionConfig() });
