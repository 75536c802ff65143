// textgen playground. Generated text is only ever inserted as text (Text nodes, textContent),
// never as HTML: a model trained on markup must not be able to run script in this page.
"use strict";

const $ = (id) => document.getElementById(id);
const models = new Map();
let running = null;          // {id, controller} of the generation in flight
let session = null;          // {model, id} where the last output ended, for Continue

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function describe(m) {
  if (m.error) return m.error;
  const params = m.parameters >= 1e6 ? (m.parameters / 1e6).toFixed(1) + "M" : Math.round(m.parameters / 1e3) + "k";
  const parts = [`${m.layers} × LSTM ${m.hidden_size}`, `${params} parameters`, `${m.vocab_size} characters`,
                 `${m.steps.toLocaleString()} steps`];
  if (m.best_val_bits_per_char !== null) parts.push(`best val ${m.best_val_bits_per_char.toFixed(3)} bits/char`);
  return parts.join(" · ");
}

function showModelInfo() {
  const m = models.get($("model").value);
  $("model-info").textContent = m ? describe(m) : "";
  const styles = (m && m.styles) || [];             // a model trained with styles: pick one
  const picker = $("style"), kept = picker.value;
  picker.replaceChildren(...["", ...styles].map(name => new Option(name || "(none)", name)));
  if (styles.includes(kept)) picker.value = kept;
  $("style-box").hidden = styles.length === 0;
  $("continue").disabled = running !== null || !session || session.model !== $("model").value;
}

async function loadModels() {
  try {
    const response = await fetch("/api/models");
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    const picker = $("model");
    const chosen = picker.value;
    picker.replaceChildren();
    models.clear();
    for (const m of data.models) {
      models.set(m.name, m);
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name;
      picker.append(option);
    }
    if (models.has(chosen)) picker.value = chosen;
    $("length").max = data.limits.max_length;
    showModelInfo();
    setStatus(`${data.models.length} model${data.models.length === 1 ? "" : "s"}; ready`);
  } catch (error) {
    setStatus(`could not list the models: ${error.message}`, true);
  }
}

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function setRunning(isRunning) {
  $("generate").disabled = isRunning;
  $("stop").disabled = !isRunning;
  $("model").disabled = isRunning;
  showModelInfo();
}

function appendTo(output, text, className) {
  const span = document.createElement("span");
  if (className) span.className = className;
  span.textContent = text;
  output.append(span);
  return span;
}

async function generate(continuing) {
  const output = $("output");
  const body = {
    model: $("model").value,
    length: numberOrNull("length"),
    temperature: numberOrNull("temperature"),
    top_k: numberOrNull("top_k"),
    top_p: numberOrNull("top_p"),
    seed: numberOrNull("seed"),
    style: $("style").value || null,
    max_copy: numberOrNull("max_copy"),
  };
  if (continuing) {
    body.continue = session.id;
    body.prompt = "";
    delete body.seed;         // the random generator carries on too; a seed would start it again
  } else {
    body.prompt = $("prompt").value;
    body.prime = $("prime").value;
    output.replaceChildren();
    if (body.prompt) appendTo(output, body.prompt, "prompt");
  }
  const text = document.createTextNode("");
  output.append(text);
  const controller = new AbortController();
  running = {id: null, controller};
  setRunning(true);
  setStatus("generating…");
  let produced = 0, ended = null;
  $("copy").textContent = "";
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({error: response.statusText}));
      throw new Error(data.error);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      pending += decoder.decode(value, {stream: true});
      let newline;
      while ((newline = pending.indexOf("\n")) >= 0) {
        const event = JSON.parse(pending.slice(0, newline));
        pending = pending.slice(newline + 1);
        if (event.id) {
          running.id = event.id;
          $("meta").textContent = `seed ${event.seed}`;
        } else if (event.text !== undefined) {
          text.appendData(event.text);
          produced += event.text.length;
          output.scrollTop = output.scrollHeight;
        } else if (event.warning) {
          appendTo(output, `warning: ${event.warning}`, "warning");
        } else if (event.end) {
          ended = event;
        }
      }
    }
    if (ended) {
      session = {model: body.model, id: ended.session};
      const how = {length: "reached the length", stop: "reached the stop string", stopped: "stopped",
                   shutdown: "the server shut down", error: "failed"}[ended.end] || ended.end;
      setStatus(`${produced.toLocaleString()} characters; ${how}`, ended.end === "error");
      $("copy").textContent = describeCopy(ended.copy);
    } else {
      setStatus("the connection ended early", true);
    }
  } catch (error) {
    if (error.name === "AbortError") setStatus("stopped");
    else setStatus(error.message, true);
  } finally {
    running = null;
    setRunning(false);
  }
}

// The final line's copy report: the longest span of the output found verbatim in the training text.
function describeCopy(copy) {
  if (!copy) return "";
  if (copy.unavailable) return `${copy.unavailable}; no copy report`;
  if (!copy.length) return "copy report: no character of the output occurs in the training text";
  const shown = copy.text.length > 60 ? copy.text.slice(0, 57) + "..." : copy.text;
  const more = copy.occurrences - 1;
  const others = more > 0 ? `; and ${more.toLocaleString()} other place${more > 1 ? "s" : ""}` : "";
  return `copy report: the longest span found verbatim in the training text is ${copy.length.toLocaleString()} ` +
         `characters, ${JSON.stringify(shown)}, from line ${copy.line.toLocaleString()} of ${copy.file}${others}`;
}

async function stop() {
  if (!running) return;
  if (running.id) {
    // Ask the server to end it: the stream then closes with everything produced so far.
    await fetch("/api/stop", {method: "POST", headers: {"Content-Type": "application/json"},
                              body: JSON.stringify({id: running.id})}).catch(() => running && running.controller.abort());
  } else {
    running.controller.abort();       // not started yet: closing the connection ends it on the server too
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", () => generate(false));
  $("continue").addEventListener("click", () => generate(true));
  $("stop").addEventListener("click", stop);
  $("model").addEventListener("change", showModelInfo);
  window.addEventListener("focus", () => { if (!running) loadModels(); });    // runs trained meanwhile appear
  loadModels();
});
