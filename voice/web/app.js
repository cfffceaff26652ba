// The browser voice client for `tradeoff serve`: the same OpenAI Realtime events as every other client.
// Microphone (echo cancellation on) -> AudioWorklet (24 kHz pcm16, 20 ms frames) -> input_audio_buffer.append.
// Reply audio deltas are scheduled back to back on the AudioContext clock (gapless) and all stopped at once on
// input_audio_buffer.speech_started (barge-in). Each turn gets a latency bar: the server's breakdown from
// tradeoff.metrics, plus what only the browser can see, from the frame holding the end of the user's speech
// being sent to the first reply sample reaching the audio output.

const RATE = 24000;
const STAGES = [ // tradeoff.metrics breakdown_ms, in pipeline order, then the browser's remainder
  ["endpointing", "#7fa7c9"], ["asr", "#c58fc0"], ["llm_ttft", "#e8935a"], ["first_clause", "#e6c35c"],
  ["tts", "#8cc46e"], ["send", "#5d8fd6"], ["transport + playout", "#aaaaaa"],
];
const $ = (id) => document.getElementById(id);

let ws = null, ctx = null, mic = null, worklet = null;
let samplesSent = 0, sent = []; // [samples sent so far, performance.now()] per frame
let playing = [], playEnd = 0, playedDone = 0; // scheduled sources; when they end (ctx time); samples finished
let turns = new Map(), current = null; // response id -> turn; the latest response
let speechEnd = null; // performance.now() when the frame holding the end of the user's last turn was sent
let pushToTalk = false, talking = false;
let bargeIns = 0, dropped = 0; // playback cut by the user's speech; reply deltas that came after the cut

// ---- connection ------------------------------------------------------------------------------

async function connect() {
  setMessage("");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setMessage("This browser gives no microphone to this page: open it as http://127.0.0.1:PORT/ or " +
               "http://localhost:PORT/ (or over https); browsers allow the microphone only in a secure context.");
    return;
  }
  $("connect").disabled = true;
  status("asking for the microphone…");
  try {
    mic = await navigator.mediaDevices.getUserMedia(
      { audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 } });
  } catch (e) {
    $("connect").disabled = false;
    status("disconnected");
    setMessage(e.name === "NotAllowedError" || e.name === "SecurityError"
      ? "Microphone permission was refused. Allow the microphone for this page (the icon at the left of the " +
        "address bar), then press Connect again."
      : e.name === "NotFoundError" ? "No microphone was found. Plug one in and press Connect again."
      : `The microphone could not be opened: ${e.name}: ${e.message}`);
    return;
  }
  try {
    ctx = new AudioContext();
    await ctx.resume();
    await ctx.audioWorklet.addModule("capture-worklet.js");
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime`;
    status("connecting…");
    ws = new WebSocket(url);
    ws.onmessage = (m) => onEvent(JSON.parse(m.data));
    await new Promise((ok, fail) => {
      ws.onopen = ok;
      ws.onerror = () => fail(new Error(`cannot reach ${url}`));
    });
    ws.onclose = (e) => {
      if (ws) { setMessage(`The server closed the connection (code ${e.code}${e.reason ? ": " + e.reason : ""}).`); disconnect(); }
    };
    if (pushToTalk) sendSession();
    worklet = new AudioWorkletNode(ctx, "capture-24k");
    worklet.port.onmessage = (e) => sendFrame(new Int16Array(e.data));
    ctx.createMediaStreamSource(mic).connect(worklet);
    worklet.connect(ctx.destination); // silent: it writes no output, but this keeps it pulled by the graph
  } catch (e) {
    setMessage(`Could not connect: ${e.message}`);
    disconnect();
    return;
  }
  $("connect").textContent = "Disconnect";
  $("connect").disabled = false;
  $("ptt").disabled = !pushToTalk;
}

function disconnect() {
  const socket = ws;
  ws = null;
  if (socket) socket.close();
  stopPlayback();
  if (worklet) { worklet.port.postMessage("stop"); worklet.disconnect(); worklet = null; }
  if (mic) { mic.getTracks().forEach((t) => t.stop()); mic = null; }
  if (ctx) { ctx.close(); ctx = null; }
  talking = false;
  $("connect").textContent = "Connect";
  $("connect").disabled = false;
  $("ptt").disabled = true;
  status("disconnected");
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function sendSession() { // push to talk: no server VAD, the button commits turns
  send({ type: "session.update", session: { type: "realtime",
    audio: { input: { turn_detection: pushToTalk ? null : { type: "server_vad" } } } } });
}

// ---- microphone --------------------------------------------------------------------------------

function sendFrame(pcm) {
  if (!ws || ws.readyState !== WebSocket.OPEN || (pushToTalk && !talking)) return;
  send({ type: "input_audio_buffer.append", audio: toBase64(pcm) });
  samplesSent += pcm.length;
  sent.push([samplesSent, performance.now()]);
  if (sent.length > 6000) sent.splice(0, 3000); // two minutes of frames: a turn only looks up its own
}

function sentAt(audioMs) { // when the frame holding input position `audioMs` was sent
  const n = (audioMs * RATE) / 1000;
  const hit = sent.find(([count]) => count >= n);
  return hit ? hit[1] : performance.now();
}

function press() {
  if (!ws || !pushToTalk || talking) return;
  talking = true;
  $("ptt").classList.add("held");
  stopPlayback();
  if (current && !current.done) send({ type: "response.cancel" });
}

function release() {
  if (!talking) return;
  talking = false;
  $("ptt").classList.remove("held");
  speechEnd = sent.length ? sent[sent.length - 1][1] : performance.now();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
}

// ---- server events -------------------------------------------------------------------------------

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      status(pushToTalk ? "connected: hold the button (or space) and speak" : "connected: speak");
      break;
    case "input_audio_buffer.speech_started":
      stopPlayback(); // barge-in: the agent goes quiet the moment the server hears the user
      status("listening…");
      break;
    case "input_audio_buffer.speech_stopped":
      speechEnd = sentAt(ev.audio_end_ms);
      status("thinking…");
      break;
    case "conversation.item.input_audio_transcription.completed":
      line("user", ev.transcript || "(nothing recognised)");
      break;
    case "response.created":
      current = { id: ev.response.id, speechEnd, firstPlayAt: null, line: null, done: false, interrupted: false };
      turns.set(current.id, current);
      speechEnd = null;
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": {
      const turn = turns.get(ev.response_id);
      if (turn && !turn.interrupted) {
        turn.line = turn.line || line("bot", "");
        turn.line.textContent += ev.delta;
      }
      break;
    }
    case "response.output_audio.delta":
      play(turns.get(ev.response_id), fromBase64(ev.delta));
      break;
    case "tradeoff.metrics": {
      const turn = turns.get(ev.response_id);
      if (turn) { turn.metrics = ev; renderTurn(turn); }
      break;
    }
    case "response.done": {
      const turn = turns.get(ev.response.id);
      if (turn) {
        turn.done = true;
        if (ev.response.status !== "completed" && turn.line) turn.line.classList.add("cut");
      }
      status(pushToTalk ? "connected: hold the button (or space) and speak" : "connected: speak");
      break;
    }
    case "error":
      setMessage(`server: ${ev.error.message}`);
      break;
  }
}

// ---- playback ------------------------------------------------------------------------------------

function play(turn, pcm) {
  if (turn && turn.interrupted) dropped++; // a late delta of an interrupted reply is never played
  if (!turn || turn.interrupted || !ctx) return;
  const buffer = ctx.createBuffer(1, pcm.length, RATE); // the context resamples to its own rate
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  const start = Math.max(ctx.currentTime, playEnd); // right after the previous delta: no gap, no overlap
  source.start(start);
  playEnd = start + buffer.duration;
  const entry = { source, start, length: pcm.length };
  playing.push(entry);
  source.onended = () => {
    const i = playing.indexOf(entry);
    if (i >= 0) { playing.splice(i, 1); playedDone += entry.length; }
  };
  if (turn.firstPlayAt === null) turn.firstPlayAt = outputTime(start);
}

function stopPlayback() {
  const now = ctx ? ctx.currentTime : Infinity;
  if (playing.some((e) => e.start + e.length / RATE > now)) bargeIns++;
  for (const e of playing) {
    playedDone += heardOf(e, now);
    e.source.onended = null;
    e.source.stop();
  }
  playing = [];
  playEnd = 0;
  if (current && !current.done) {
    current.interrupted = true;
    if (current.line) current.line.classList.add("cut");
  }
}

function heardOf(entry, now) {
  return Math.max(0, Math.min(entry.length, Math.round((now - entry.start) * RATE)));
}

function outputTime(contextTime) { // performance.now() at which `contextTime` reaches the audio output
  const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
  if (ts && ts.performanceTime > 0) return ts.performanceTime + (contextTime - ts.contextTime) * 1000;
  return performance.now() + (contextTime - ctx.currentTime + (ctx.outputLatency || ctx.baseLatency || 0)) * 1000;
}

setInterval(() => { // the played-samples counter (also what the browser test watches)
  const now = ctx ? ctx.currentTime : 0;
  const n = playing.reduce((sum, e) => sum + heardOf(e, now), playedDone);
  Object.assign($("played").dataset, { samples: String(n), bargeIns: String(bargeIns), dropped: String(dropped) });
  $("played").textContent = `reply audio played: ${n} samples (${(n / RATE).toFixed(1)} s)`;
}, 100);

// ---- display -------------------------------------------------------------------------------------

function renderTurn(turn) {
  const m = turn.metrics;
  const div = document.createElement("div");
  div.className = "turn";
  const browserMs = turn.speechEnd !== null && turn.firstPlayAt !== null ? turn.firstPlayAt - turn.speechEnd : null;
  const server = serverParts(m);
  if (!server) { // a typed turn, or one that played no audio: nothing to measure from or to
    div.textContent = `turn without speech: LLM TTFT ${fmt(m.llm && m.llm.ttft_ms)} ms`;
    $("turns").prepend(div);
    return;
  }
  const parts = STAGES.slice(0, -1).filter(([name]) => name in server.parts)
    .map(([name, color]) => [name, color, server.parts[name]]);
  const serverCount = parts.length;
  if (browserMs !== null) parts.push([server.rest, STAGES[6][1], Math.max(0, browserMs - server.total)]);
  const total = parts.reduce((s, p) => s + p[2], 0);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.style.width = `${Math.min(100, (100 * total) / Math.max(1500, total))}%`;
  for (const [name, color, ms] of parts) {
    const seg = document.createElement("span");
    seg.style.width = `${(100 * ms) / (total || 1)}%`;
    seg.style.background = color;
    seg.title = `${name} ${fmt(ms)} ms`;
    bar.append(seg);
  }
  const label = document.createElement("div");
  label.textContent = (browserMs !== null ? `E2E ${fmt(browserMs)} ms in the browser (end of speech sent → first reply audio out) · ` : "") +
    `server ${fmt(server.total)} ms = ` + parts.slice(0, serverCount).map(([n, , ms]) => `${n} ${fmt(ms)}`).join(" + ") +
    (m.drafted ? " (drafted)" : "") + (m.tbt_ms && m.tbt_ms.p50 !== null ? ` · TBT p50 ${fmt(m.tbt_ms.p50)} ms` : "");
  div.dataset.serverE2eMs = fmt(server.total);
  if (browserMs !== null) div.dataset.e2eMs = fmt(browserMs);
  div.append(label, bar);
  $("turns").prepend(div);
}

// The server's critical path in ms per stage, its total, and what the browser's remainder holds. A VAD turn
// has it all in breakdown_ms. A push-to-talk turn is committed by the client and answered on its
// response.create, so the server's path starts when the request reached the engine (first token time minus
// TTFT), charged with the server's rule (each stage: its finish minus the latest earlier finish); waiting for
// the transcript then falls in the browser's remainder.
function serverParts(m) {
  if (m.breakdown_ms) return { parts: m.breakdown_ms, total: m.e2e_ms, rest: "transport + playout" };
  const t = m.timestamps;
  const order = [["llm_ttft", "llm_first_token"], ["first_clause", "first_clause"], ["tts", "tts_first_chunk"],
                 ["send", "first_audio_sent"]];
  if (!m.llm || m.llm.ttft_ms === null || order.some(([, key]) => t[key] === null)) return null;
  const arrival = t.llm_first_token - m.llm.ttft_ms / 1000;
  const parts = {};
  let latest = arrival;
  for (const [name, key] of order) {
    parts[name] = Math.max(0, t[key] - latest) * 1000;
    latest = Math.max(latest, t[key]);
  }
  return { parts, total: (latest - arrival) * 1000, rest: "commit + ASR + transport + playout" };
}

function line(who, text) {
  const p = document.createElement("p");
  p.className = who;
  p.textContent = text;
  $("transcript").append(p);
  return p;
}

const fmt = (ms) => (ms === null || ms === undefined ? "–" : String(Math.round(ms)));
const status = (text) => { $("status").textContent = text; };
const setMessage = (text) => { $("message").textContent = text; };

function toBase64(pcm) {
  const bytes = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(text) {
  const s = atob(text);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return new Int16Array(bytes.buffer);
}

// ---- controls ------------------------------------------------------------------------------------

$("legend").append(...STAGES.map(([name, color]) => {
  const s = document.createElement("span");
  s.innerHTML = `<i style="background:${color}"></i>`;
  s.append(name);
  return s;
}));
$("connect").onclick = () => (ws ? disconnect() : connect());
$("push-to-talk").onchange = (e) => {
  pushToTalk = e.target.checked;
  $("ptt").disabled = !pushToTalk || !ws;
  if (ws) sendSession();
};
$("ptt").onpointerdown = press;
$("ptt").onpointerup = release;
$("ptt").onpointerleave = release;
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && pushToTalk && ws && !e.repeat) { e.preventDefault(); press(); }
});
document.addEventListener("keyup", (e) => { // (a focused button or checkbox would act on this key up)
  if (e.code === "Space" && pushToTalk && ws) { e.preventDefault(); release(); }
});
