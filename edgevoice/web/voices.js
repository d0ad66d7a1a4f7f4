// Voices: the voice library (/v1/audio/voices): upload or record a reference
// clip with its transcript, list, preview (clone-speak), use in Speak, delete.

import { api, getJson } from "./api.js";
import { fileNameFor, microphoneProblem, startRecording } from "./audio.js";
import { $, clear, el, showError, clearError, formatSeconds } from "./dom.js";

let onChange = () => {};
let onUse = () => {};
let models = [];
let recorded = null;
let recording = null;

function cloningModel() {
  return models.find((m) => m.kind === "tts" && m.capabilities.cloning);
}

export function setModels(list) {
  models = list;
  const can = Boolean(cloningModel());
  $("#vo-no-cloning").hidden = can;
  for (const control of $("#vo-form").querySelectorAll("input, textarea, button")) control.disabled = !can;
  $("#vo-record-stop").disabled = true;
  if (can && microphoneProblem()) $("#vo-record").disabled = true;
  $("#vo-clone-go").disabled = !can;
}

function render(voices) {
  const stored = voices.filter((v) => v.type !== "builtin");
  const body = $("#vo-table tbody");
  clear(body);
  for (const voice of stored) {
    const preview = el("button", { type: "button", class: "small" }, ["Preview"]);
    preview.setAttribute("aria-label", `Preview ${voice.name}`);
    preview.addEventListener("click", () => cloneSpeak(voice.id, $("#vo-clone-text").value));
    const use = el("button", { type: "button", class: "small" }, ["Use in Speak"]);
    use.setAttribute("aria-label", `Use ${voice.name} in Speak`);
    use.addEventListener("click", () => onUse(voice.id));
    const remove = el("button", { type: "button", class: "small danger" }, ["Delete"]);
    remove.setAttribute("aria-label", `Delete ${voice.name}`);
    remove.addEventListener("click", () => deleteVoice(voice));
    body.append(
      el("tr", { "data-voice-id": voice.id }, [
        el("td", {}, [voice.name]),
        el("td", {}, [el("code", {}, [voice.id])]),
        el("td", { class: "num" }, [formatSeconds(voice.duration_s)]),
        el("td", {}, [voice.transcript || "—"]),
        el("td", {}, [el("div", { class: "actions" }, [preview, use, remove])]),
      ]),
    );
  }
  $("#vo-empty").hidden = stored.length > 0;
  const builtin = $("#vo-builtin tbody");
  clear(builtin);
  for (const voice of voices.filter((v) => v.type === "builtin")) {
    builtin.append(
      el("tr", {}, [
        el("td", {}, [voice.name]),
        el("td", {}, [voice.model]),
        el("td", {}, [voice.engine]),
        el("td", {}, [(voice.languages || []).join(", ") || "—"]),
      ]),
    );
  }
  const select = $("#vo-clone-voice");
  const previous = select.value;
  clear(select);
  for (const voice of stored) select.append(el("option", { value: voice.id }, [voice.name]));
  if (previous && stored.some((v) => v.id === previous)) select.value = previous;
}

export async function refreshVoices() {
  const body = await getJson("/v1/audio/voices");
  const voices = body.data || [];
  render(voices);
  onChange(voices);
  return voices;
}

async function cloneSpeak(voiceId, text) {
  clearError();
  const state = $("#vo-clone-state");
  const audio = $("#vo-clone-audio");
  const model = cloningModel();
  if (!voiceId) {
    showError(new Error("Choose a stored voice first."));
    return;
  }
  state.textContent = "Synthesizing…";
  try {
    const response = await api("/v1/audio/speech", {
      method: "POST",
      json: { model: model && model.id, voice: voiceId, input: text, response_format: "wav" },
    });
    const blob = await response.blob();
    if (audio.src) URL.revokeObjectURL(audio.src);
    audio.src = URL.createObjectURL(blob);
    audio.hidden = false;
    $("#vo-clone-voice").value = voiceId;
    state.textContent = "";
    audio.play().catch(() => {});
  } catch (error) {
    state.textContent = "";
    showError(error);
  }
}

async function deleteVoice(voice) {
  if (!window.confirm(`Delete the voice “${voice.name}”?`)) return;
  clearError();
  try {
    await api(`/v1/audio/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE" });
    await refreshVoices();
  } catch (error) {
    showError(error);
  }
}

async function save(event) {
  event.preventDefault();
  clearError();
  const state = $("#vo-state");
  const name = $("#vo-name").value.trim();
  const file = $("#vo-file").files[0] || null;
  const clip = file || recorded;
  if (!name) {
    showError(new Error("Give the voice a name."));
    $("#vo-name").focus();
    return;
  }
  if (!clip) {
    showError(new Error("Choose a reference clip or record one."));
    return;
  }
  const form = new FormData();
  form.append("name", name);
  form.append("audio_sample", clip, file ? file.name : fileNameFor(clip, "reference"));
  const transcript = $("#vo-transcript").value.trim();
  if (transcript) form.append("transcript", transcript);
  state.textContent = "Saving…";
  $("#vo-save").disabled = true;
  try {
    const response = await api("/v1/audio/voices", { method: "POST", body: form });
    const voice = await response.json();
    state.textContent = `Saved “${voice.name}” (${formatSeconds(voice.duration_s)}).`;
    $("#vo-form").reset();
    recorded = null;
    $("#vo-recorded").hidden = true;
    await refreshVoices();
  } catch (error) {
    state.textContent = "";
    showError(error);
  } finally {
    $("#vo-save").disabled = !cloningModel();
  }
}

async function record(start) {
  const state = $("#vo-record-state");
  if (start) {
    try {
      recording = await startRecording();
    } catch (error) {
      showError(error);
      return;
    }
    $("#vo-record").disabled = true;
    $("#vo-record-stop").disabled = false;
    state.textContent = "Recording… read the transcript aloud.";
    return;
  }
  const current = recording;
  recording = null;
  $("#vo-record").disabled = false;
  $("#vo-record-stop").disabled = true;
  if (!current) return;
  recorded = await current.stop();
  state.textContent = `Recorded ${current.seconds.toFixed(1)} s.`;
  const audio = $("#vo-recorded");
  if (audio.src) URL.revokeObjectURL(audio.src);
  audio.src = URL.createObjectURL(recorded);
  audio.hidden = false;
}

export function initVoices(changed, use) {
  onChange = changed;
  onUse = use;
  $("#vo-form").addEventListener("submit", save);
  $("#vo-record").addEventListener("click", () => record(true));
  $("#vo-record-stop").addEventListener("click", () => record(false));
  $("#vo-clone-go").addEventListener("click", () =>
    cloneSpeak($("#vo-clone-voice").value, $("#vo-clone-text").value),
  );
}
