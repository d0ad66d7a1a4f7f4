// Live captions: the microphone streamed to /v1/realtime (OpenAI's Realtime
// transcription session), 24 kHz pcm16 in 100 ms appends; deltas show as the
// line being spoken, each completed transcript as a finished line.

import { websocketTarget } from "./api.js";
import { base64Of, float32ToPcm16, openMicrophone } from "./audio.js";
import { $, el } from "./dom.js";

const RATE_HZ = 24000;
const APPEND_SAMPLES = RATE_HZ / 10;
const MAX_LINES = 50;

let live = null;

function setState(text) {
  $("#cap-state").textContent = text;
}

/** Linear resampling of a block stream (used when the context cannot run at 24 kHz). */
function resampler(fromHz) {
  if (fromHz === RATE_HZ) return (block) => block;
  const step = fromHz / RATE_HZ;
  let position = 0; // next output position in input samples; -1 is the previous block's last
  let last = 0;
  return (block) => {
    const out = [];
    while (position < block.length - 1) {
      const i = Math.floor(position);
      const a = i < 0 ? last : block[i];
      const b = block[i + 1];
      out.push(a + (b - a) * (position - i));
      position += step;
    }
    position -= block.length;
    last = block[block.length - 1];
    return Float32Array.from(out);
  };
}

class LiveCaptions {
  constructor() {
    this.ws = null;
    this.stream = null;
    this.context = null;
    this.pending = [];
    this.pendingLength = 0;
    this.ready = false;
    this.items = new Map();
  }

  async start(model, language) {
    this.stream = await openMicrophone();
    try {
      this.context = new AudioContext({ sampleRate: RATE_HZ });
    } catch {
      this.context = new AudioContext();
    }
    await this.context.audioWorklet.addModule("/ui/pcm-worklet.js");
    const source = this.context.createMediaStreamSource(this.stream);
    const node = new AudioWorkletNode(this.context, "pcm-capture");
    const mute = this.context.createGain();
    mute.gain.value = 0;
    source.connect(node).connect(mute).connect(this.context.destination);
    const resample = resampler(this.context.sampleRate);
    node.port.onmessage = (event) => this.audio(resample(event.data));

    const target = websocketTarget("/v1/realtime?intent=transcription");
    this.ws = new WebSocket(target.url, target.protocols);
    this.ws.addEventListener("open", () => {
      setState("Connected; listening…");
      const transcription = { model };
      if (language) transcription.language = language;
      this.ws.send(
        JSON.stringify({
          type: "session.update",
          session: {
            type: "transcription",
            audio: {
              input: {
                format: { type: "audio/pcm", rate: RATE_HZ },
                transcription,
                turn_detection: { type: "server_vad", silence_duration_ms: 600 },
              },
            },
          },
        }),
      );
    });
    this.ws.addEventListener("message", (event) => this.event(JSON.parse(event.data)));
    this.ws.addEventListener("close", (event) => {
      if (live === this) {
        setState(event.code === 1000 || event.code === 1005 ? "Disconnected." : `Disconnected (${event.code} ${event.reason || ""}).`);
        stopCaptions();
      }
    });
  }

  audio(block) {
    if (!this.ready || !this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    this.pending.push(block);
    this.pendingLength += block.length;
    if (this.pendingLength < APPEND_SAMPLES) return;
    const joined = new Float32Array(this.pendingLength);
    let offset = 0;
    for (const part of this.pending) {
      joined.set(part, offset);
      offset += part.length;
    }
    this.pending = [];
    this.pendingLength = 0;
    this.ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64Of(float32ToPcm16(joined)) }));
  }

  event(event) {
    const partial = $("#cap-partial");
    switch (event.type) {
      case "session.updated":
      case "transcription_session.updated":
        this.ready = true;
        break;
      case "input_audio_buffer.speech_started":
        this.items.set(event.item_id, "");
        partial.textContent = "…";
        setState("Hearing speech…");
        break;
      case "input_audio_buffer.speech_stopped":
        setState("Transcribing…");
        break;
      case "conversation.item.input_audio_transcription.delta": {
        const text = (this.items.get(event.item_id) || "") + event.delta;
        this.items.set(event.item_id, text);
        partial.textContent = text;
        break;
      }
      case "conversation.item.input_audio_transcription.completed":
        this.items.delete(event.item_id);
        if (event.transcript) this.line(event.transcript);
        partial.textContent = "";
        setState("Listening…");
        break;
      case "conversation.item.input_audio_transcription.failed":
        this.line(`(transcription failed: ${event.error && event.error.message})`);
        partial.textContent = "";
        break;
      case "error":
        setState(`Error: ${event.error && event.error.message}`);
        break;
      default:
        break;
    }
  }

  line(text) {
    const list = $("#cap-lines");
    list.append(el("li", {}, [text]));
    while (list.children.length > MAX_LINES) list.firstElementChild.remove();
    const box = $("#captions");
    box.scrollTop = box.scrollHeight;
  }

  stop() {
    this.ready = false;
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    if (this.context) this.context.close().catch(() => {});
  }
}

export function stopCaptions() {
  const current = live;
  live = null;
  if (current) current.stop();
  const button = $("#cap-toggle");
  button.setAttribute("aria-pressed", "false");
  button.textContent = "Start live captions";
}

export function initCaptions(currentModel, currentLanguage) {
  const button = $("#cap-toggle");
  button.addEventListener("click", async () => {
    if (live) {
      stopCaptions();
      setState("Stopped.");
      return;
    }
    live = new LiveCaptions();
    button.setAttribute("aria-pressed", "true");
    button.textContent = "Stop live captions";
    setState("Connecting…");
    try {
      await live.start(currentModel(), currentLanguage());
    } catch (error) {
      setState(error.message || String(error));
      stopCaptions();
    }
  });
}
