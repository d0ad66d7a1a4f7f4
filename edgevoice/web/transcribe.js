// Transcribe: record or drop a file, POST it to /v1/audio/transcriptions (or
// translations), show the text and, when asked, each word's timing.

import { api } from "./api.js";
import { fileNameFor, microphoneProblem, startRecording } from "./audio.js";
import { $, clear, el, showError, clearError } from "./dom.js";

let recording = null;
let timer = 0;

function options() {
  const words = $("#tr-words").checked;
  let format = $("#tr-format").value;
  if (words) format = "verbose_json";
  return {
    model: $("#tr-model").value,
    language: $("#tr-language").value.trim(),
    task: $("#tr-task").value,
    format,
    words,
  };
}

/** The spoken text of an srt/vtt document (its cue lines). */
function cueText(document) {
  return document
    .split(/\r?\n/)
    .filter((line) => line && line !== "WEBVTT" && !/^\d+$/.test(line) && !line.includes("-->"))
    .join(" ");
}

function render(result, format) {
  const text = $("#tr-text");
  const raw = $("#tr-raw");
  const wrap = $("#tr-words-wrap");
  raw.hidden = true;
  wrap.hidden = true;
  if (format === "json" || format === "verbose_json") {
    text.textContent = result.text || "";
    if (format === "verbose_json") {
      raw.textContent = JSON.stringify(
        { language: result.language, duration: result.duration, segments: (result.segments || []).length },
        null,
        1,
      );
      const body = $("#tr-words-table tbody");
      clear(body);
      for (const word of result.words || []) {
        body.append(
          el("tr", {}, [
            el("td", {}, [word.word]),
            el("td", { class: "num" }, [word.start.toFixed(2)]),
            el("td", { class: "num" }, [word.end.toFixed(2)]),
          ]),
        );
      }
      wrap.hidden = !(result.words || []).length;
    }
    return;
  }
  text.textContent = format === "text" ? result.trim() : cueText(result);
  if (format !== "text") {
    raw.textContent = result;
    raw.hidden = false;
  }
}

export async function transcribe(blob, name) {
  const opts = options();
  const form = new FormData();
  form.append("file", blob, name);
  if (opts.model) form.append("model", opts.model);
  form.append("response_format", opts.format);
  if (opts.task === "transcribe" && opts.language) form.append("language", opts.language);
  if (opts.words) form.append("timestamp_granularities[]", "word");
  const path = opts.task === "translate" ? "/v1/audio/translations" : "/v1/audio/transcriptions";
  const busy = $("#tr-busy");
  busy.hidden = false;
  $("#tr-text").textContent = "";
  clearError();
  try {
    const response = await api(path, { method: "POST", body: form });
    const json = opts.format === "json" || opts.format === "verbose_json";
    render(json ? await response.json() : await response.text(), opts.format);
  } catch (error) {
    showError(error);
  } finally {
    busy.hidden = true;
  }
}

async function toggleRecording(start) {
  const record = $("#tr-record");
  const stop = $("#tr-stop");
  if (start) {
    clearError();
    try {
      recording = await startRecording();
    } catch (error) {
      showError(error);
      return;
    }
    record.disabled = true;
    record.classList.add("recording");
    stop.disabled = false;
    stop.focus();
    timer = setInterval(() => {
      $("#tr-timer").textContent = `recording ${recording.seconds.toFixed(1)} s`;
    }, 200);
    return;
  }
  clearInterval(timer);
  const current = recording;
  recording = null;
  record.disabled = false;
  record.classList.remove("recording");
  stop.disabled = true;
  $("#tr-timer").textContent = "";
  if (current) {
    const blob = await current.stop();
    record.focus();
    await transcribe(blob, fileNameFor(blob));
  }
}

function fillLanguages() {
  const model = $("#tr-model").selectedOptions[0];
  const list = $("#tr-languages");
  clear(list);
  const languages = model ? JSON.parse(model.dataset.languages || "[]") : [];
  for (const code of languages) list.append(el("option", { value: code }));
  const translate = model ? model.dataset.translate === "true" : false;
  $("#tr-task").querySelector('option[value="translate"]').disabled = !translate;
  if (!translate) $("#tr-task").value = "transcribe";
}

export function setModels(models) {
  const select = $("#tr-model");
  const previous = select.value;
  clear(select);
  for (const model of models.filter((m) => m.kind === "asr")) {
    const option = el("option", { value: model.id }, [
      model.id + (model.aliases.length ? ` (${model.aliases.join(", ")})` : ""),
    ]);
    option.dataset.languages = JSON.stringify(model.capabilities.languages || []);
    option.dataset.translate = String(Boolean(model.capabilities.translate));
    if (model.default) option.selected = true;
    select.append(option);
  }
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  fillLanguages();
}

export function initTranscribe() {
  $("#tr-record").addEventListener("click", () => toggleRecording(true));
  $("#tr-stop").addEventListener("click", () => toggleRecording(false));
  $("#tr-model").addEventListener("change", fillLanguages);
  // Word timings come with verbose_json only: show that choice.
  $("#tr-words").addEventListener("change", (event) => {
    if (event.target.checked) $("#tr-format").value = "verbose_json";
  });
  $("#tr-format").addEventListener("change", (event) => {
    if (event.target.value !== "verbose_json") $("#tr-words").checked = false;
  });
  const problem = microphoneProblem();
  if (problem) {
    $("#tr-record").disabled = true;
    $("#tr-mic-note").textContent = problem;
    $("#tr-mic-note").hidden = false;
  }
  const input = $("#tr-file");
  input.addEventListener("change", () => {
    const file = input.files && input.files[0];
    if (file) transcribe(file, file.name);
    input.value = "";
  });
  const drop = $("#tr-drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files && event.dataTransfer.files[0];
    if (file) transcribe(file, file.name);
  });
}
