// Speak: text to /v1/audio/speech, played while it streams (s16le 24 kHz PCM
// scheduled with Web Audio as the chunks arrive), then kept as a WAV for the
// audio element and the download.

import { api } from "./api.js";
import { StreamPlayer, wavBlob } from "./audio.js";
import { $, clear, el, showError, clearError, formatSeconds } from "./dom.js";

const PCM_RATE_HZ = 24000;

let models = [];
let voices = [];
let current = null;
let lastUrl = null;
let lastRequest = null;

function ttsModels() {
  return models.filter((m) => m.kind === "tts");
}

function fillVoices(selectId, model, { builtin = true } = {}) {
  const select = $(selectId);
  const previous = select.value;
  clear(select);
  const info = ttsModels().find((m) => m.id === model);
  if (builtin) {
    const own = voices.filter((v) => v.type === "builtin" && v.model === model);
    if (own.length) {
      const group = el("optgroup", { label: "Model voices" });
      for (const voice of own) group.append(el("option", { value: voice.id }, [voice.name]));
      select.append(group);
    }
  }
  const stored = voices.filter((v) => v.type !== "builtin");
  if (stored.length && info && info.capabilities.cloning) {
    const group = el("optgroup", { label: "Voice library (cloned)" });
    for (const voice of stored) group.append(el("option", { value: voice.id }, [voice.name]));
    select.append(group);
  }
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
}

function refreshPickers() {
  const select = $("#sp-model");
  const previous = select.value;
  clear(select);
  for (const model of ttsModels()) {
    const label = model.id + (model.capabilities.cloning ? " · clones" : "");
    const option = el("option", { value: model.id }, [label]);
    if (model.default) option.selected = true;
    select.append(option);
  }
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  fillVoices("#sp-voice", select.value);
}

export function setModels(list) {
  models = list;
  refreshPickers();
}

export function setVoices(list) {
  voices = list;
  refreshPickers();
}

/** Pick a stored voice in Speak (with a model that can clone it). */
export function useVoice(voiceId) {
  const cloner = ttsModels().find((m) => m.capabilities.cloning);
  if (cloner) $("#sp-model").value = cloner.id;
  fillVoices("#sp-voice", $("#sp-model").value);
  $("#sp-voice").value = voiceId;
}

function request(format, stream) {
  const body = {
    model: $("#sp-model").value,
    voice: $("#sp-voice").value || undefined,
    input: $("#sp-text").value,
    speed: Number($("#sp-speed").value),
    response_format: format,
  };
  if (stream) body.stream_format = "audio";
  return body;
}

function setBusy(busy) {
  $("#sp-go").disabled = busy;
  $("#sp-stop").disabled = !busy;
}

async function speak() {
  clearError();
  stop();
  const result = $("#sp-result");
  const state = $("#sp-state");
  const controller = new AbortController();
  const player = new StreamPlayer(PCM_RATE_HZ);
  current = { controller, player };
  setBusy(true);
  state.textContent = "Synthesizing…";
  const started = performance.now();
  const chunks = [];
  let audioS = 0;
  let firstMs = null;
  try {
    await player.start();
    lastRequest = request("pcm", true);
    const response = await api("/v1/audio/speech", { method: "POST", json: lastRequest, signal: controller.signal });
    const reader = response.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (!value || !value.length) continue;
      if (firstMs === null) {
        firstMs = performance.now() - started;
        state.textContent = `Playing (first audio after ${(firstMs / 1000).toFixed(2)} s)…`;
      }
      chunks.push(value);
      audioS += player.push(value);
    }
    const doneMs = performance.now() - started;
    const wav = wavBlob(chunks, PCM_RATE_HZ);
    if (lastUrl) URL.revokeObjectURL(lastUrl);
    lastUrl = URL.createObjectURL(wav);
    const audio = $("#sp-audio");
    audio.src = lastUrl;
    result.hidden = false;
    result.dataset.firstMs = String(Math.round(firstMs ?? doneMs));
    result.dataset.doneMs = String(Math.round(doneMs));
    result.dataset.chunks = String(chunks.length);
    $("#sp-figures").textContent =
      `${formatSeconds(audioS)} of audio in ${chunks.length} chunks; first audio after ` +
      `${((firstMs ?? doneMs) / 1000).toFixed(2)} s, all after ${(doneMs / 1000).toFixed(2)} s` +
      (player.failed ? " (no audio output here: press play)" : "");
    updateDownload(wav);
    state.textContent = "Done.";
  } catch (error) {
    if (error.name === "AbortError") {
      state.textContent = "Stopped.";
    } else {
      state.textContent = "";
      showError(error);
    }
  } finally {
    if (current && current.controller === controller) current = null;
    setBusy(false);
  }
}

function updateDownload(wav) {
  const link = $("#sp-download");
  const format = $("#sp-format").value;
  link.dataset.format = format;
  link.download = `speech.${format}`;
  if (format === "wav") {
    link.href = lastUrl;
    link.textContent = "Download wav";
  } else {
    link.href = "#";
    link.textContent = `Download ${format}`;
  }
  link.dataset.wav = wav ? "ready" : "";
}

async function download(event) {
  const link = event.currentTarget;
  const format = link.dataset.format;
  if (!lastRequest || format === "wav") return; // the WAV link is a plain download
  event.preventDefault();
  const state = $("#sp-state");
  state.textContent = `Making ${format}…`;
  try {
    const body = { ...lastRequest, response_format: format };
    delete body.stream_format;
    const response = await api("/v1/audio/speech", { method: "POST", json: body });
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: `speech.${format === "pcm" ? "pcm" : format}` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    state.textContent = "Downloaded.";
  } catch (error) {
    state.textContent = "";
    showError(error);
  }
}

function stop() {
  if (!current) return;
  current.controller.abort();
  current.player.stop();
  current = null;
  setBusy(false);
}

export function initSpeak() {
  $("#sp-model").addEventListener("change", () => fillVoices("#sp-voice", $("#sp-model").value));
  $("#sp-go").addEventListener("click", speak);
  $("#sp-stop").addEventListener("click", stop);
  $("#sp-download").addEventListener("click", download);
  $("#sp-format").addEventListener("change", () => updateDownload(lastUrl ? "ready" : null));
  const speed = $("#sp-speed");
  speed.addEventListener("input", () => {
    $("#sp-speed-out").textContent = `${Number(speed.value).toFixed(2)}×`;
  });
  $("#sp-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) speak();
  });
}
