// Talking to the edgevoice API: the API key, errors in the API's own words.
//
// With an api_key configured the server answers 401; the page then asks for
// the key once (a dialog), keeps it in sessionStorage for this tab, and
// retries. Every failure becomes an ApiError whose message is the API's
// `error.message`, which the page shows as is.

const KEY_STORAGE = "edgevoice.apiKey";

export class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let asking = null;

/** Show the key dialog (once, however many requests wait on it). */
function askForKey(message) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const text = document.getElementById("key-message");
  text.textContent = message || "This edgevoice asks for an API key.";
  input.value = "";
  asking = new Promise((resolve) => {
    const done = () => {
      const key = input.value.trim();
      if (!key) return; // the dialog stays open until a key is given
      sessionStorage.setItem(KEY_STORAGE, key);
      dialog.removeEventListener("close", done);
      asking = null;
      resolve(key);
    };
    dialog.addEventListener("close", done);
    dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return asking;
}

/** The API's error message from a failed response (JSON or plain text). */
export async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) {
        message = body.error.message;
        code = body.error.code || null;
      } else if (text) {
        message = text;
      }
    } catch {
      if (text) message = text.slice(0, 500);
    }
  } catch {
    /* the body is gone: keep the status line */
  }
  return new ApiError(message, response.status, code);
}

/**
 * fetch() against the API with the key; retries once after asking for a key
 * on 401. Resolves to the Response (ok), rejects with ApiError otherwise.
 */
export async function api(path, { method = "GET", json, body, headers = {}, signal } = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const init = { method, signal, headers: { ...authHeaders(), ...headers } };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(`cannot reach edgevoice (${error.message})`);
    }
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401 && attempt < 2) {
      await askForKey(error.message);
      continue;
    }
    throw error;
  }
  throw new ApiError("no valid API key");
}

export async function getJson(path, options) {
  const response = await api(path, options);
  return response.json();
}

/** Subprotocols and URL for a WebSocket to `path` carrying the key. */
export function websocketTarget(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(`${scheme}//${location.host}${path}`);
  const protocols = ["realtime"];
  const key = apiKey();
  if (key) {
    // OpenAI's browser form; a key with characters a subprotocol cannot carry goes in the query.
    if (/^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/.test(key)) {
      protocols.push(`openai-insecure-api-key.${key}`);
    } else {
      url.searchParams.set("api_key", key);
    }
  }
  return { url: url.toString(), protocols };
}
