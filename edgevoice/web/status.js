// Status: GET /v1/status, redrawn every few seconds while the section is shown.

import { getJson } from "./api.js";
import { $, clear, el, formatBytes, formatSeconds } from "./dom.js";

const POLL_MS = 3000;
let timer = 0;

function tile(label, value) {
  return el("div", { class: "tile" }, [
    el("div", { class: "value" }, [value]),
    el("div", { class: "label" }, [label]),
  ]);
}

function badge(text) {
  return el("span", { class: `badge ${text}` }, [text]);
}

export function renderStatus(status) {
  const m = status.metrics;
  const tiles = $("#st-tiles");
  clear(tiles);
  tiles.append(
    tile("Uptime", formatSeconds(status.uptime_s)),
    tile("Memory (RSS)", formatBytes(status.memory.rss_bytes)),
    tile("HTTP requests", String(m.http_requests_total)),
    tile("HTTP errors", String(m.http_errors_total)),
    tile("Audio transcribed", formatSeconds(m.audio_in_s)),
    tile("Audio spoken", formatSeconds(m.audio_out_s)),
    tile("Engine busy", formatSeconds(m.engine_busy_s)),
  );

  const models = $("#st-models tbody");
  clear(models);
  for (const model of status.models) {
    models.append(
      el("tr", { "data-model": model.name }, [
        el("td", {}, [
          el("strong", {}, [model.name]),
          model.default ? " (default)" : "",
          model.aliases.length ? el("div", { class: "muted small" }, [model.aliases.join(", ")]) : "",
        ]),
        el("td", {}, [model.kind]),
        el("td", {}, [model.engine]),
        el("td", {}, [model.device]),
        el("td", {}, [badge(model.state)]),
        el("td", { class: "num" }, [formatBytes(model.memory_bytes)]),
        el("td", { class: "num" }, [String(model.requests)]),
        el("td", { class: "num" }, [formatSeconds(model.busy_s)]),
        el("td", { class: "num" }, [formatSeconds(model.load_s)]),
      ]),
    );
  }

  const protocols = $("#st-protocols tbody");
  clear(protocols);
  for (const protocol of status.protocols) {
    const clients = [];
    if (protocol.clients !== undefined) clients.push(`${protocol.clients} connected`);
    if (protocol.websockets) clients.push(`${protocol.websockets} WebSocket${protocol.websockets === 1 ? "" : "s"}`);
    if (protocol.connected !== undefined) clients.push(protocol.connected ? "broker connected" : "broker unreachable");
    if (protocol.in_flight) clients.push(`${protocol.in_flight} in flight`);
    protocols.append(
      el("tr", {}, [
        el("td", {}, [protocol.name]),
        el("td", {}, protocol.addresses.map((a) => el("div", {}, [el("code", {}, [a])]))),
        el("td", {}, [clients.join(", ") || "—"]),
      ]),
    );
  }

  const mqtt = $("#st-mqtt");
  clear(mqtt);
  if (!status.mqtt.enabled) {
    mqtt.append("Not enabled ([mqtt] enabled = false).");
  } else {
    mqtt.append(
      badge(status.mqtt.connected ? "connected" : "disconnected"),
      " ",
      el("code", {}, [status.mqtt.broker || ""]),
    );
  }
  $("#st-updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
}

export async function refreshStatus() {
  const status = await getJson("/v1/status");
  renderStatus(status);
  return status;
}

/** Poll while the Status section is visible. */
export function watchStatus(visible, onError) {
  clearInterval(timer);
  if (!visible) return;
  const tick = () => refreshStatus().catch(onError);
  tick();
  timer = setInterval(() => {
    if (!document.hidden) tick();
  }, POLL_MS);
}
