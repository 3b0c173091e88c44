// The page of serve.py: send a file to /v1/jobs, poll its progress, then show the two
// spectrograms, the two players and the download link. Plain JS, nothing from other hosts.
"use strict";

const POLL_MS = 300;
const $ = (id) => document.getElementById(id);
let current = null; // {id, inputUrl, outputUrl, cancelled}

function setError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function kHz(hz) {
  return `${(hz / 1000).toFixed(hz % 1000 ? 2 : 0)} kHz`;
}

function describeBandwidth(info) {
  const rate = 2 * info.bandwidth_hz;
  if (info.bandwidth_hz >= 24000) return "24 kHz (already full band)";
  return `${kHz(info.bandwidth_hz)} (sounds like ${kHz(rate)} audio)`;
}

function reset(file) {
  if (current) {
    current.cancelled = true;
    URL.revokeObjectURL(current.inputUrl);
    if (current.outputUrl) URL.revokeObjectURL(current.outputUrl);
  }
  current = { id: null, inputUrl: URL.createObjectURL(file), outputUrl: null, cancelled: false };
  $("status").hidden = false;
  $("results").hidden = true;
  $("name").textContent = file.name;
  $("details").textContent = "";
  $("bandwidth").textContent = "…";
  $("progress").value = 0;
  $("state").textContent = "uploading";
  $("cancel").hidden = true;
  setError("");
  return current;
}

async function errorText(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function run(file) {
  const task = reset(file);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("keep_lowband", $("keep_lowband").checked ? "true" : "false");
  form.append("input_sr", $("input_sr").value);
  form.append("format", $("format").value);
  let response = await fetch("/v1/jobs", { method: "POST", body: form });
  if (!response.ok) throw new Error(await errorText(response));
  let job = await response.json();
  task.id = job.id;
  const info = job.input;
  $("details").textContent =
    `${info.seconds.toFixed(2)} s · ${info.sample_rate} Hz · ${info.channels} channel${info.channels > 1 ? "s" : ""}`;
  $("bandwidth").textContent = describeBandwidth(info);
  $("cancel").hidden = false;
  while (!["done", "failed", "cancelled"].includes(job.state)) {
    $("progress").value = job.progress;
    $("state").textContent =
      job.state === "queued" ? `queued (position ${job.position})` : `${Math.round(100 * job.progress)} %`;
    await sleep(POLL_MS);
    if (task.cancelled) return;
    response = await fetch(`/v1/jobs/${job.id}`);
    if (!response.ok) throw new Error(await errorText(response));
    job = await response.json();
  }
  $("cancel").hidden = true;
  if (job.state !== "done") throw new Error(job.error || `job ${job.state}`);
  response = await fetch(`/v1/jobs/${job.id}/result`);
  if (!response.ok) throw new Error(await errorText(response));
  task.outputUrl = URL.createObjectURL(await response.blob());
  if (task.cancelled) return;
  $("progress").value = 1;
  $("state").textContent = "done";
  $("spectrogram-input").src = `/v1/jobs/${job.id}/spectrogram/input`;
  $("spectrogram-output").src = `/v1/jobs/${job.id}/spectrogram/output`;
  $("player-input").src = task.inputUrl;
  $("player-output").src = task.outputUrl;
  const stem = file.name.replace(/\.[^.]*$/, "") || "audio";
  $("download").href = task.outputUrl;
  $("download").download = `${stem}_superresolved.wav`;
  $("results").hidden = false;
}

function start(file) {
  if (!file) return;
  run(file).catch((error) => {
    $("state").textContent = "";
    $("cancel").hidden = true;
    setError(error.message);
  });
}

$("file").addEventListener("change", (event) => start(event.target.files[0]));

$("cancel").addEventListener("click", async () => {
  if (!current || !current.id) return;
  current.cancelled = true;
  await fetch(`/v1/jobs/${current.id}`, { method: "DELETE" });
  $("cancel").hidden = true;
  $("state").textContent = "cancelled";
});

const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  start(event.dataTransfer.files[0]);
});

// Microphone: MediaRecorder gives webm/ogg, which the server's decoder may not read, so the
// recording is decoded here and sent as 16-bit WAV at the browser's own rate.
function encodeWav(buffer) {
  const channels = buffer.numberOfChannels;
  const frames = buffer.length;
  const view = new DataView(new ArrayBuffer(44 + 2 * channels * frames));
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + 2 * channels * frames, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true);
  view.setUint16(22, channels, true);
  view.setUint32(24, buffer.sampleRate, true);
  view.setUint32(28, 2 * channels * buffer.sampleRate, true);
  view.setUint16(32, 2 * channels, true);
  view.setUint16(34, 16, true);
  text(36, "data");
  view.setUint32(40, 2 * channels * frames, true);
  const data = [...Array(channels).keys()].map((c) => buffer.getChannelData(c));
  for (let i = 0, offset = 44; i < frames; i++) {
    for (let c = 0; c < channels; c++, offset += 2) {
      const s = Math.max(-1, Math.min(1, data[c][i]));
      view.setInt16(offset, Math.round(s * 32767), true);
    }
  }
  return new Blob([view], { type: "audio/wav" });
}

// Browsers offer the microphone only to pages from https or from this machine (localhost).
function microphone(constraints) {
  if (!navigator.mediaDevices) {
    throw new Error("the browser offers a microphone only over https or on localhost");
  }
  return navigator.mediaDevices.getUserMedia(constraints);
}

let recorder = null;
$("record").addEventListener("click", async () => {
  const button = $("record");
  if (recorder) {
    recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await microphone({ audio: true });
  } catch (error) {
    $("status").hidden = false;
    setError(`no microphone: ${error.message}`);
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (event) => chunks.push(event.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((track) => track.stop());
    recorder = null;
    button.textContent = "Record";
    button.classList.remove("recording");
    const context = new AudioContext();
    try {
      const decoded = await context.decodeAudioData(await new Blob(chunks).arrayBuffer());
      start(new File([encodeWav(decoded)], "recording.wav", { type: "audio/wav" }));
    } catch (error) {
      setError(`could not decode the recording: ${error.message}`);
    } finally {
      context.close();
    }
  };
  recorder.start();
  button.textContent = "Stop";
  button.classList.add("recording");
});

// Live mode: microphone -> an AudioContext at the chosen rate (the browser resamples, which
// band-limits the voice like a call) -> capture-worklet.js blocks -> WS /v1/stream -> 48 kHz
// blocks played back to back. The latency shown runs from sending an input block to playing
// the output made from it.
const LIVE_BLOCK_SECONDS = 0.02;
const PLAYBACK_MARGIN_SECONDS = 0.05;
let live = null;

function setLiveError(message) {
  $("live-error").textContent = message || "";
  $("live-error").hidden = !message;
}

function play(state, samples) {
  if (!samples.length) return;
  const buffer = state.playback.createBuffer(1, samples.length, 48000);
  buffer.copyToChannel(samples, 0);
  const source = state.playback.createBufferSource();
  source.buffer = buffer;
  source.connect(state.playback.destination);
  const now = state.playback.currentTime;
  const start = Math.max(state.nextTime, now + PLAYBACK_MARGIN_SECONDS);
  source.start(start);
  state.nextTime = start + buffer.duration;
  state.outputSamples += samples.length;
  // the input block holding the sample that the last output sample was made from
  const inputIndex = (state.outputSamples * state.rate) / 48000;
  while (state.sent.length > 1 && state.sent[0].end < inputIndex) state.sent.shift();
  const server = performance.now() - state.sent[0].time;
  const total = server + 1000 * (state.nextTime - now);
  $("live-latency").textContent =
    `${Math.round(total)} ms (${Math.round(server)} ms of it server and network)`;
}

async function startLive() {
  const rate = Number($("live-rate").value);
  const mic = await microphone({ audio: { channelCount: 1 } });
  const capture = new AudioContext({ sampleRate: rate });
  const playback = new AudioContext({ sampleRate: 48000 });
  await capture.audioWorklet.addModule("/static/capture-worklet.js");
  const tap = new AudioWorkletNode(capture, "capture", {
    processorOptions: { blockSize: Math.round(rate * LIVE_BLOCK_SECONDS) },
  });
  capture.createMediaStreamSource(mic).connect(tap);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const lowband = $("live-lowband").checked;
  const socket = new WebSocket(
    `${scheme}://${location.host}/v1/stream?sr=${rate}&keep_lowband=${lowband}`
  );
  socket.binaryType = "arraybuffer";
  const state = { mic, capture, playback, socket, rate, sent: [], inputSamples: 0, outputSamples: 0, nextTime: 0 };
  tap.port.onmessage = (event) => {
    if (socket.readyState !== WebSocket.OPEN) return;
    state.inputSamples += event.data.length;
    state.sent.push({ end: state.inputSamples, time: performance.now() });
    socket.send(event.data.buffer);
  };
  socket.onmessage = (event) => {
    if (typeof event.data === "string") setLiveError(JSON.parse(event.data).error);
    else play(state, new Float32Array(event.data));
  };
  socket.onclose = () => {
    stopLive(state);
    // let what was scheduled finish playing
    const left = Math.max(0, state.nextTime - playback.currentTime);
    setTimeout(() => playback.close(), 1000 * left + 100);
  };
  live = state;
  $("live-toggle").textContent = "Stop live";
  $("live-toggle").classList.add("recording");
  $("live-latency").textContent = "…";
}

function stopLive(state) {
  if (!state || state.stopped) return;
  state.stopped = true;
  if (live === state) live = null;
  state.mic.getTracks().forEach((track) => track.stop());
  state.capture.close();
  // the server sends what is left, then closes
  if (state.socket.readyState === WebSocket.OPEN) state.socket.send("end");
  $("live-toggle").textContent = "Start live";
  $("live-toggle").classList.remove("recording");
}

$("live-toggle").addEventListener("click", () => {
  if (live) {
    stopLive(live);
    return;
  }
  setLiveError("");
  startLive().catch((error) => setLiveError(`live mode: ${error.message}`));
});
