// Audio helpers: microphone recording, PCM <-> WAV, streaming playback.

/** Why the microphone cannot be used here, or "" when it can. */
export function microphoneProblem() {
  if (!window.isSecureContext) {
    return "The browser allows the microphone only on https:// or http://localhost pages; open edgevoice that way to record (files still work).";
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return "This browser cannot record from a microphone.";
  }
  if (typeof MediaRecorder === "undefined") {
    return "This browser has no MediaRecorder.";
  }
  return "";
}

export async function openMicrophone() {
  const problem = microphoneProblem();
  if (problem) throw new Error(problem);
  // Speech models hear best the raw signal (no echo cancelling, noise suppression or gain control).
  return navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
}

/** Start recording the microphone; `stop()` resolves to the recording (a Blob). */
export async function startRecording() {
  const stream = await openMicrophone();
  const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
  const mimeType = types.find((t) => MediaRecorder.isTypeSupported(t)) || "";
  const recorder = new MediaRecorder(stream, mimeType ? { mimeType } : {});
  const parts = [];
  recorder.addEventListener("dataavailable", (event) => {
    if (event.data && event.data.size) parts.push(event.data);
  });
  recorder.start(250);
  const started = performance.now();
  return {
    get seconds() {
      return (performance.now() - started) / 1000;
    },
    stop() {
      return new Promise((resolve) => {
        recorder.addEventListener(
          "stop",
          () => {
            stream.getTracks().forEach((track) => track.stop());
            resolve(new Blob(parts, { type: recorder.mimeType || "audio/webm" }));
          },
          { once: true },
        );
        recorder.stop();
      });
    },
  };
}

/** File name with an extension the server's decoder recognizes, from a MIME type. */
export function fileNameFor(blob, stem = "recording") {
  const type = blob.type || "";
  const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : type.includes("wav") ? "wav" : "webm";
  return `${stem}.${ext}`;
}

/** A WAV file (s16le mono) around PCM bytes. */
export function wavBlob(pcmChunks, rateHz) {
  const length = pcmChunks.reduce((n, c) => n + c.byteLength, 0);
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((ch, i) => header.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + length, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, rateHz, true);
  header.setUint32(28, rateHz * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, length, true);
  return new Blob([header.buffer, ...pcmChunks], { type: "audio/wav" });
}

export function pcm16ToFloat32(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(i * 2, true) / 32768;
  return out;
}

export function float32ToPcm16(samples) {
  const out = new Uint8Array(samples.length * 2);
  const view = new DataView(out.buffer);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(i * 2, s < 0 ? s * 32768 : s * 32767, true);
  }
  return out;
}

export function base64Of(bytes) {
  let binary = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(binary);
}

/**
 * Plays s16le PCM as it arrives (Web Audio), gap-free: each chunk is
 * scheduled right after the one before.
 */
export class StreamPlayer {
  constructor(rateHz) {
    this.rateHz = rateHz;
    this.context = null;
    this.nextTime = 0;
    this.carry = new Uint8Array(0);
    this.sources = new Set();
    this.failed = null;
  }

  async start() {
    try {
      const Context = window.AudioContext || window.webkitAudioContext;
      this.context = new Context();
      if (this.context.state === "suspended") await this.context.resume();
    } catch (error) {
      this.failed = error; // no audio output: the file is still made
    }
  }

  /** Schedule the next bytes; returns seconds of audio they held. */
  push(bytes) {
    let data = bytes;
    if (this.carry.length) {
      data = new Uint8Array(this.carry.length + bytes.length);
      data.set(this.carry);
      data.set(bytes, this.carry.length);
    }
    const usable = data.length - (data.length % 2);
    this.carry = data.slice(usable);
    const samples = pcm16ToFloat32(data.subarray(0, usable));
    if (!samples.length || !this.context || this.failed) return samples.length / this.rateHz;
    try {
      const buffer = this.context.createBuffer(1, samples.length, this.rateHz);
      buffer.copyToChannel(samples, 0);
      const source = this.context.createBufferSource();
      source.buffer = buffer;
      source.connect(this.context.destination);
      const at = Math.max(this.nextTime, this.context.currentTime + 0.05);
      source.start(at);
      this.nextTime = at + buffer.duration;
      this.sources.add(source);
      source.addEventListener("ended", () => this.sources.delete(source));
    } catch (error) {
      this.failed = error;
    }
    return samples.length / this.rateHz;
  }

  stop() {
    for (const source of this.sources) {
      try {
        source.stop();
      } catch {
        /* already ended */
      }
    }
    this.sources.clear();
    if (this.context) this.context.close().catch(() => {});
    this.context = null;
  }
}
