// imp serve's page: a picture, questions about it, answers streamed from /v1/chat/completions.
// Model output is only ever inserted as text (textContent), never as HTML.
"use strict";

const KEY_STORE = "imp-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  model: null,        // the server's model id (GET /v1/models)
  image: null,        // the picture as a data: URL, sent with the first question
  messages: [],       // the conversation so far, as OpenAI messages
  controller: null,   // the running request's AbortController (Stop)
  keyWaiters: [],     // requests waiting for the user to give the API key
};

// -- the API key (only when the server has --api-key) ----------------------------------------
function apiKey() {
  return sessionStorage.getItem(KEY_STORE);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function askForKey(message) {
  return new Promise((resolve) => {
    state.keyWaiters.push(resolve);
    const error = $("key-error");
    error.textContent = message || "";
    error.hidden = !message;
    const dialog = $("key-dialog");
    if (!dialog.open) dialog.showModal();
    $("key").focus();
  });
}

// Escape must not close the dialog: the requests waiting for the key would wait for ever.
$("key-dialog").addEventListener("cancel", (e) => e.preventDefault());

$("key-form").addEventListener("submit", () => {
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("key").value = "";
  const waiters = state.keyWaiters.splice(0);
  waiters.forEach((resolve) => resolve());
});

// fetch() that asks for the API key once when the server answers 401, then tries again.
async function call(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers() });
    if (response.status !== 401) return response;
    const hadKey = apiKey() !== null;
    sessionStorage.removeItem(KEY_STORE);
    const message = hadKey ? await errorMessage(response) : "";
    if (hadKey) showError(message);
    await askForKey(message);
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

// -- what is shown -----------------------------------------------------------------------------
function showError(message) {
  const error = $("error");
  error.textContent = message || "";
  error.hidden = !message;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("question").readOnly = busy;
  document.body.dataset.busy = busy ? "yes" : "no";
}

function addTurn(question) {
  const item = document.createElement("li");
  item.className = "turn";
  const q = document.createElement("p");
  q.className = "question";
  q.textContent = question;
  const a = document.createElement("p");
  a.className = "answer";
  const stats = document.createElement("p");
  stats.className = "stats";
  item.append(q, a, stats);
  $("turns").append(item);
  return { item, answer: a, stats };
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("turns").replaceChildren();
  showError("");
  $("question").focus();
}

// -- the picture -------------------------------------------------------------------------------
function usePicture(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data: URL, as OpenAI clients send images
    const preview = $("preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.alt = "the picture: " + file.name;
    preview.hidden = false;
    $("pick-text").hidden = true;
    newConversation();  // Imp takes one picture per conversation
  };
  reader.onerror = () => showError("cannot read " + file.name);
  reader.readAsDataURL(file);
}

$("image").addEventListener("change", (e) => usePicture(e.target.files[0]));
$("new").addEventListener("click", newConversation);

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragging"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("dragging");
  usePicture(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); usePicture(file); }
});

// -- asking ------------------------------------------------------------------------------------
function userMessage(question) {
  if (state.messages.length === 0 && state.image) {
    return { role: "user", content: [{ type: "image_url", image_url: { url: state.image } },
                                     { type: "text", text: question }] };
  }
  return { role: "user", content: question };
}

// The optional settings: left empty, the server's defaults (imp serve --max-tokens, --temperature).
function settings() {
  const out = {};
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) out.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (temperature >= 0) out.temperature = temperature;
  return out;
}

async function ask(question) {
  showError("");
  const turn = addTurn(question);
  const message = userMessage(question);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let text = "";
  let usage = null;
  let firstToken = 0;
  let finished = false;
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      body: JSON.stringify({ model: state.model, stream: true, stream_options: { include_usage: true },
                             messages: [...state.messages, message], ...settings() }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { finished = true; continue; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (!firstToken) firstToken = performance.now();
            text += delta.content;
            turn.answer.textContent = text;  // text, never HTML
          }
        }
      }
    }
    if (usage) {
      const seconds = firstToken ? (performance.now() - firstToken) / 1000 : 0;
      const n = usage.completion_tokens;
      const rate = seconds > 0 && n > 1 ? ` · ${((n - 1) / seconds).toFixed(1)} tokens/s` : "";
      turn.stats.textContent = `${n} token${n === 1 ? "" : "s"}${rate}`;
    }
  } catch (e) {
    if (e.name === "AbortError") {
      turn.stats.textContent = "stopped";
    } else {
      showError(e.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (text || finished) {
    // what was said stays in the conversation (also when stopped), as in imp chat
    state.messages.push(message, { role: "assistant", content: text });
  } else {
    turn.item.remove();  // nothing said: as if not asked
  }
  $("question").focus();
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;
  $("question").value = "";
  ask(question);
});

$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});

function stop() {
  if (state.controller) state.controller.abort();  // the server cancels the generation
}
$("stop").addEventListener("click", stop);
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) stop(); });

// -- start -------------------------------------------------------------------------------------
async function start() {
  try {
    const config = await (await fetch("/ui/config.json")).json();
    if (config.api_key && !apiKey()) await askForKey("");
    const response = await call("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    state.model = body.data[0].id;
    $("model").textContent = "model " + state.model;
    document.body.dataset.ready = "yes";
  } catch (e) {
    $("model").textContent = "not connected";
    showError(e.message);
  }
}

setBusy(false);
start();
