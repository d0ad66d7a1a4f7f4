// edgevoice web page: sections, shared model/voice lists, the connection pill.

import { getJson } from "./api.js";
import { initCaptions } from "./captions.js";
import { $, clearError, showError } from "./dom.js";
import { initSpeak, setModels as speakModels, setVoices as speakVoices, useVoice } from "./speak.js";
import { watchStatus } from "./status.js";
import { initTranscribe, setModels as transcribeModels } from "./transcribe.js";
import { initVoices, refreshVoices, setModels as voicesModels } from "./voices.js";

const SECTIONS = ["transcribe", "speak", "voices", "status"];

function show(section) {
  const name = SECTIONS.includes(section) ? section : "transcribe";
  for (const id of SECTIONS) {
    $(`#${id}`).hidden = id !== name;
    const link = $(`nav a[data-section="${id}"]`);
    if (id === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  watchStatus(name === "status", showError);
  window.scrollTo(0, 0); // the fragment names a section, not a place to scroll to
  document.title = `edgevoice · ${name[0].toUpperCase()}${name.slice(1)}`;
}

async function loadModels() {
  const body = await getJson("/v1/models");
  const models = body.data || [];
  transcribeModels(models);
  speakModels(models);
  voicesModels(models);
  return models;
}

async function updatePill() {
  const pill = $("#conn");
  try {
    const response = await fetch("/health");
    const health = await response.json();
    const models = health.models || {};
    pill.textContent = `online · ${(models.asr || []).length} ASR · ${(models.tts || []).length} TTS`;
    pill.className = "pill ok";
  } catch {
    pill.textContent = "offline";
    pill.className = "pill bad";
  }
}

async function main() {
  $("#notice-close").addEventListener("click", clearError);
  initTranscribe();
  initSpeak();
  initVoices(speakVoices, (voiceId) => {
    useVoice(voiceId);
    location.hash = "#speak";
  });
  initCaptions(
    () => $("#tr-model").value,
    () => $("#tr-language").value.trim(),
  );
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1));
  updatePill();
  setInterval(updatePill, 15000);
  try {
    await loadModels();
    await refreshVoices();
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(error);
  }
}

main();
