// textgen playground: the controls, one or two generations at a time (two when comparing models),
// Continue, Stop, the history, Copy and Download, the loss curve. Generated text is only ever
// inserted as text (panes.js), never as HTML.
"use strict";

import * as fields from "./fields.js";
import * as saved from "./history.js";
import {Pane, meta} from "./panes.js";
import {Refusal, generation, stopOnServer} from "./stream.js";

const $ = (id) => document.getElementById(id);
const models = new Map();
const panes = [new Pane("", null), new Pane("-b", $("pane-b"))];
let running = null;          // [{id, controller}] of the generations in flight
let session = null;          // {models, ids, entry, settings, seeds}: where the shown outputs ended, for Continue
let shown = [];              // [{model, seed}] of the outputs on show (for Copy, Download and the history)

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function describe(m) {
  if (m.error) return m.error;
  const params = m.parameters >= 1e6 ? (m.parameters / 1e6).toFixed(1) + "M" : Math.round(m.parameters / 1e3) + "k";
  const parts = [`${m.layers} × LSTM ${m.hidden_size}`, `${params} parameters`, `${m.vocab_size} characters`,
                 `${m.steps.toLocaleString("en")} steps`];
  if (m.best_val_bits_per_char !== null) parts.push(`best val ${m.best_val_bits_per_char.toFixed(3)} bits/char`);
  return parts.join(" · ");
}

function chosenModels() {
  const first = $("model").value, second = $("compare").value;
  return second && second !== first ? [first, second] : [first];
}

function showModelInfo() {
  const name = $("model").value;
  const m = models.get(name);
  $("model-info").textContent = m ? describe(m) : "";
  const styles = (m && m.styles) || [];             // a model trained with styles: pick one
  const picker = $("style"), kept = picker.value;
  picker.replaceChildren(...["", ...styles].map((name) => new Option(name || "(none)", name)));
  if (styles.includes(kept)) picker.value = kept;
  $("style-box").hidden = styles.length === 0;
  const picture = $("loss-curve"), none = $("loss-none");
  if (m && m.loss_curve) {
    const source = `/api/models/${encodeURIComponent(name)}/loss.png`;
    if (picture.getAttribute("src") !== source) picture.src = source;
    picture.hidden = false;
    none.hidden = true;
  } else {
    picture.hidden = true;
    picture.removeAttribute("src");
    none.textContent = m ? "this run has no loss curve (training draws loss.png when matplotlib is installed)" : "";
    none.hidden = false;
  }
  const same = session && session.models.join("\n") === chosenModels().join("\n");
  $("continue").disabled = running !== null || !same;
}

function fill(picker, names, first = []) {
  const chosen = picker.value;
  picker.replaceChildren(...first, ...names.map((name) => {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    return option;
  }));
  if ([...picker.options].some((o) => o.value === chosen)) picker.value = chosen;
}

async function loadModels() {
  try {
    const response = await fetch("/api/models");
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    models.clear();
    for (const m of data.models) models.set(m.name, m);
    fill($("model"), [...models.keys()]);
    fill($("compare"), [...models.keys()], [$("compare").options[0]]);
    showModelInfo();
    setStatus(`${data.models.length} model${data.models.length === 1 ? "" : "s"}; ready`);
    return true;
  } catch (error) {
    setStatus(`could not list the models: ${error.message}`, true);
    return false;
  }
}

function setRunning(requests) {
  running = requests;
  const busy = requests !== null;
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
  for (const id of ["model", "compare"]) $(id).disabled = busy;
  $("copy").disabled = $("download").disabled = busy || !panes[0].text();
  showModelInfo();
}

const ENDINGS = {length: "reached the length", stop: "reached the stop string", stopped: "stopped",
                 shutdown: "the server shut down", error: "failed"};
const CONTINUABLE = new Set(["length", "stop", "stopped"]);

/** Generate (or, continuing, carry the shown outputs on): one request per model shown. */
async function generate(continuing) {
  if (running) return;
  const read = fields.read();
  if (read.problems) {                 // the browser knows a number is not one: send nothing, say which
    setStatus(read.problems.join("; "), true);
    return;
  }
  const body = read.body, asked = fields.current();      // the settings as sent, whatever is edited meanwhile
  const names = continuing ? session.models : chosenModels();
  if (continuing) {
    body.prompt = "";
    delete body.seed;                  // the random generator carries on too; a seed would start it again
  } else if (names.length > 1 && body.seed === null) {
    // The two models must draw the same random numbers: one seed for both, chosen here.
    body.seed = String(crypto.getRandomValues(new Uint32Array(1))[0] >>> 1);
  }
  const requests = names.map((model, i) => ({
    model, controller: new AbortController(), id: null,
    body: {...body, model, ...(continuing ? {continue: session.ids[i]} : {})},
  }));
  setRunning(requests);
  setStatus("generating…");
  const started = performance.now();
  const streams = requests.map((r) => generation(r.body, r.controller.signal));
  // Nothing on show changes until every request is accepted: a refused one leaves the last output,
  // its seed and Continue as they were, all still about the same text.
  const firsts = await Promise.allSettled(streams.map((s) => s.next()));
  const refused = firsts.find((f) => f.status === "rejected");
  if (refused) {
    for (const r of requests) r.controller.abort();
    const error = refused.reason;
    if (error.name === "AbortError") setStatus("stopped");
    else setStatus(error instanceof Refusal ? fields.wordError(error.answer) : `the request failed: ${error.message}`, true);
    setRunning(null);
    return;
  }
  const previous = session;
  session = null;                      // until these end, there is nothing to continue
  $("alternatives").hidden = true;
  $("copy-report").textContent = "";
  panes[1].show(names.length > 1, names.length > 1 ? names[1] : "");
  panes[0].show(true, names.length > 1 ? names[0] : "");
  const seeds = firsts.map((f) => f.value.value.seedText);
  requests.forEach((r, i) => {
    r.id = firsts[i].value.value.id;
    if (continuing) panes[i].resume();
    else panes[i].start(body.prompt);
    panes[i].meta.textContent = meta(seeds[i], null, 0);
  });
  if (!continuing) shown = names.map((model, i) => ({model, seed: seeds[i]}));
  const ends = await Promise.all(requests.map((r, i) => follow(streams[i], panes[i], seeds[i], started)));
  setRunning(null);
  finish(names, ends, continuing ? previous : null, asked, seeds);
}

/** One stream's events into its pane; its last event ({end: "broken"} where the connection ended early). */
async function follow(stream, pane, seed, started) {
  let produced = 0;
  try {
    for await (const event of stream) {
      if (event.text !== undefined) {
        pane.append(event.text, event.logprobs ? alternatives(event) : null);
        produced += [...event.text].length;
        pane.meta.textContent = meta(seed, produced, (performance.now() - started) / 1000);
      } else if (event.warning) {
        pane.warn(event.warning);
      } else if (event.end) {
        pane.meta.textContent = meta(seed, produced, (performance.now() - started) / 1000);
        return event;
      }
    }
  } catch (error) {
    return {end: error.name === "AbortError" ? "stopped" : "broken", characters: produced};
  }
  return {end: "broken", characters: produced};
}

/** A text line's per-character log-probabilities ({logprob, top: [[char, logprob]]}) as probabilities. */
function alternatives(event) {
  const chars = [...event.text];
  return event.logprobs.map((scored, i) => ({
    chosen: chars[i], p: Math.exp(scored.logprob), top: scored.top.map(([ch, logprob]) => [ch, Math.exp(logprob)]),
  }));
}

// The final line's copy report: the longest span of the output found verbatim in the training text.
function describeCopy(copy) {
  if (!copy) return "";
  if (copy.unavailable) return `${copy.unavailable}; no copy report`;
  if (!copy.length) return "copy report: no character of the output occurs in the training text";
  const shown = copy.text.length > 60 ? copy.text.slice(0, 57) + "..." : copy.text;
  const more = copy.occurrences - 1;
  const others = more > 0 ? `; and ${more.toLocaleString("en")} other place${more > 1 ? "s" : ""}` : "";
  return `copy report: the longest span found verbatim in the training text is ${copy.length.toLocaleString("en")} ` +
         `characters, ${JSON.stringify(shown)}, from line ${copy.line.toLocaleString("en")} of ${copy.file}${others}`;
}

function finish(names, ends, continued, asked, seeds) {
  $("copy-report").textContent = ends.map((e, i) => {
    const said = describeCopy(e.copy);
    return said && names.length > 1 ? `${names[i]}: ${said}` : said;
  }).filter(Boolean).join(" · ");
  const words = ends.map((e) => `${e.characters.toLocaleString("en")} characters; ${
    ENDINGS[e.end] || (e.end === "broken" ? "the connection ended early" : e.end)}`);
  setStatus(names.length > 1 ? names.map((n, i) => `${n}: ${words[i]}`).join(" · ") : words[0],
            ends.some((e) => !CONTINUABLE.has(e.end)));
  const settings = continued ? continued.settings : {...asked, seed: seeds[0]};
  if (ends.every((e) => CONTINUABLE.has(e.end) && e.session)) {
    session = {models: names, ids: ends.map((e) => e.session), settings};
  }
  const entry = saved.add({settings, outputs: shown.map((o, i) => ({...o, text: panes[i].text()}))},
                          continued ? continued.entry : null);
  if (session) session.entry = entry;
  fields.share(settings);              // the address now restores what is on show, its seed included
  saved.render(saved.entries(), pick);
  setRunning(null);
}

function pick(entry) {
  if (running) return;
  fields.apply(entry.settings);
  const two = entry.outputs.length > 1;
  entry.outputs.forEach((o, i) => panes[i].restore(o.text, two ? o.model : ""));
  if (!two) panes[1].show(false);
  shown = entry.outputs.map(({model, seed}) => ({model, seed}));
  entry.outputs.forEach((o, i) => { panes[i].meta.textContent = meta(o.seed, null, 0); });
  session = null;                      // the server may have forgotten it: generate again to continue
  fields.share(entry.settings);
  setStatus(`restored the output of ${new Date(entry.when).toLocaleString()}`);
  setRunning(null);
}

async function stop() {
  if (!running) return;
  for (const r of running) {
    if (r.id) stopOnServer(r.id).catch(() => r.controller.abort());
    else r.controller.abort();         // not started yet: closing the connection ends it on the server too
  }
}

function shownText() {
  if (shown.length < 2) return panes[0].text();
  return shown.map((o, i) => `=== ${o.model}, seed ${o.seed} ===\n${panes[i].text()}`).join("\n\n");
}

async function copy() {
  const text = shownText();
  try {
    await navigator.clipboard.writeText(text);
    setStatus(`copied ${[...text].length.toLocaleString("en")} characters`);
  } catch {
    setStatus("the browser refused the clipboard; select the text and copy it by hand", true);
  }
}

function download() {
  const url = URL.createObjectURL(new Blob([shownText()], {type: "text/plain;charset=utf-8"}));
  const link = document.createElement("a");
  link.href = url;
  link.download = `${shown.map((o) => o.model).join("-vs-") || "textgen"}-seed-${shown.length ? shown[0].seed : ""}.txt`
    .replace(/[^\w.-]+/g, "_");
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function restoreLink() {
  if (!location.hash) return;
  const problem = fields.restore();
  showModelInfo();
  if (problem) setStatus(problem, true);
}

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") $("alternatives").hidden = true;
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();            // no newline in the prompt
    generate(false);
  }
});
$("generate").addEventListener("click", () => generate(false));
$("continue").addEventListener("click", () => generate(true));
$("stop").addEventListener("click", stop);
$("copy").addEventListener("click", copy);
$("download").addEventListener("click", download);
$("clear-history").addEventListener("click", () => { saved.clear(); saved.render([], pick); });
for (const id of ["model", "compare"]) $(id).addEventListener("change", showModelInfo);
for (const name of fields.SHARED) $(name).addEventListener("input", () => fields.mark(name, false));
$("loss-curve").addEventListener("error", () => {
  $("loss-curve").hidden = true;
  $("loss-none").textContent = "the loss curve could not be loaded";
  $("loss-none").hidden = false;
});
window.addEventListener("focus", () => { if (!running) loadModels(); });    // runs trained meanwhile appear
window.addEventListener("hashchange", restoreLink);
saved.render(saved.entries(), pick);
loadModels().then((ok) => { if (ok) restoreLink(); });
