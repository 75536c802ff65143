// The settings on the page: reading them (the browser's own check of each number first), marking the
// fields the browser or the server finds wrong, wording the server's sentences in the page's labels,
// and the settings in the address's #fragment, so that a link restores them.
"use strict";

const $ = (id) => document.getElementById(id);

export const NUMBERS = ["length", "temperature", "top_k", "top_p", "seed", "max_copy"];
// Everything a link carries, in the order it shows them (the prime document stays on the page).
export const SHARED = ["model", "compare", "style", "prompt", ...NUMBERS, "unknown", "logprobs"];

/** A setting as the page names it: its control's label ("Temperature"), or the field's name. */
export function label(name) {
  const control = $(name);
  const box = control && control.closest("label");
  return box ? box.firstChild.textContent.trim() : name;
}

/** A setting and its value as the page words them: Temperature, or “Unknown characters: leave them out”. */
function pageWords(name, value) {
  if (value === null || value === undefined) return label(name);
  const control = $(name);
  const option = control && control.tagName === "SELECT" ? [...control.options].find((o) => o.value === value) : null;
  return `“${label(name)}: ${option ? option.textContent : value}”`;
}

export function mark(name, wrong = true) {
  const control = $(name);
  if (!control) return;
  control.classList.toggle("invalid", wrong);
  if (wrong) control.setAttribute("aria-invalid", "true");
  else control.removeAttribute("aria-invalid");
}

export function unmarkAll() {
  for (const name of SHARED) mark(name, false);
}

function problem(input) {
  const v = input.validity;
  if (v.badInput) return "is not a number";
  if (v.stepMismatch) return "must be a whole number";
  return input.validationMessage;
}

/**
 * The request's settings from the controls, or {problems} where the browser already knows a number is
 * not one (it would send null, and the server would quietly use the default): those fields are marked.
 * The seed stays text, as typed: a JavaScript number holds only 53 bits of the server's 63.
 */
export function read() {
  unmarkAll();
  const problems = [];
  const body = {model: $("model").value, prompt: $("prompt").value, unknown: $("unknown").value};
  for (const name of NUMBERS) {
    const input = $(name);
    if (!input.checkValidity()) {
      mark(name);
      problems.push(`${label(name)} ${problem(input)}`);
      continue;
    }
    const text = input.value.trim();
    body[name] = text === "" ? null : name === "seed" ? text : Number(text);
  }
  const logprobs = Number($("logprobs").value);
  if (logprobs > 0) body.logprobs = logprobs;
  if ($("style").value) body.style = $("style").value;          // a model trained with styles
  if ($("prime").value) body.prime = $("prime").value;          // a document read before the prompt
  return problems.length ? {problems} : {body};
}

/** JSON for a request, with a seed given as its digits (exact up to the server's 2**63 - 1). */
export function encode(body) {
  const {seed, ...rest} = body;
  const others = JSON.stringify(rest);
  if (seed === null || seed === undefined) return others;
  return `{"seed":${/^\d+$/.test(seed) ? seed : JSON.stringify(seed)}` + (others === "{}" ? "}" : "," + others.slice(1));
}

/** A refused request's sentence in the page's words, marking each setting it names. */
export function wordError(answer) {
  if (!answer.template || !answer.mentions) return answer.error;
  let sentence = answer.template;
  for (const [name, value] of Object.entries(answer.mentions)) {
    sentence = sentence.split(`{${name}}`).join(pageWords(name, value));
    mark(name);
  }
  return sentence;
}

/** The settings of what is on show, into the address's #fragment (never sent to the server). */
export function share(settings) {
  const params = new URLSearchParams();
  for (const name of SHARED) {
    const value = settings[name];
    if (value !== null && value !== undefined && value !== "") params.set(name, String(value));
  }
  history.replaceState(null, "", `${location.pathname}#${params}`);
}

/** Settings from the address's #fragment into the controls; a sentence for what could not be restored. */
export function restore() {
  const params = new URLSearchParams(location.hash.slice(1));
  const missing = [];
  for (const [name, value] of params) {
    const control = SHARED.includes(name) ? $(name) : null;
    if (!control) continue;
    if (control.tagName === "SELECT") {
      if ([...control.options].some((o) => o.value === value)) control.value = value;
      else missing.push(`${label(name)} “${value}”`);
    } else {
      control.value = value;
      if (control.value !== value) {        // a number input takes no text that is not a number
        missing.push(`${label(name)} “${value}”`);
        mark(name);
      }
    }
  }
  return missing.length ? `the link's ${missing.join(", ")} is not available here` : null;
}

/** Every shared setting as the controls hold them now (the seed as text). */
export function current() {
  const settings = {};
  for (const name of SHARED) settings[name] = $(name).value;
  return settings;
}

/** Put settings (a history entry's) back into the controls. */
export function apply(settings) {
  unmarkAll();
  for (const name of SHARED) {
    const control = $(name);
    if (control && settings[name] !== undefined && settings[name] !== null) control.value = settings[name];
  }
}
