// The history of outputs, kept in this browser's localStorage so that it survives a reload: the newest
// first, at most KEPT entries, each with its settings and its text (shown only ever as text).
"use strict";

const KEY = "textgen.history";
const KEPT = 50;
const MAX_TEXT = 200_000;                   // characters of one output kept: localStorage holds ~5 MB in all

export function entries() {
  try {
    const saved = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(saved) ? saved.filter((e) => e && typeof e === "object" && Array.isArray(e.outputs)) : [];
  } catch {
    return [];                              // unreadable (another page's, or storage off): start afresh
  }
}

function save(list) {
  for (let kept = list.length; kept > 0; kept = Math.floor(kept / 2)) {
    try {
      localStorage.setItem(KEY, JSON.stringify(list.slice(0, kept)));
      return;
    } catch {
      // over the browser's quota: keep fewer
    }
  }
}

/** entry: {settings, outputs: [{model, text, seed}]}; a continued output replaces the entry it continued. */
export function add(entry, replacing = null) {
  const list = entries().filter((e) => e.id !== replacing);
  const outputs = entry.outputs.map((o) => ({...o, text: o.text.slice(0, MAX_TEXT)}));
  const id = `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
  list.unshift({...entry, outputs, id, when: new Date().toISOString()});
  save(list.slice(0, KEPT));
  return id;
}

export function clear() {
  try {
    localStorage.removeItem(KEY);
  } catch {
    // storage off: nothing was kept
  }
}

/** The list into the page: one button per entry, which calls pick(entry). */
export function render(list, pick) {
  const items = list.map((entry) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "history-entry";
    const first = entry.outputs[0] || {text: "", model: "", seed: ""};
    const head = document.createElement("span");
    head.className = "history-head";
    head.textContent = entry.outputs.map((o) => o.model).join(" vs ") + ` · seed ${first.seed}`;
    const text = document.createElement("span");
    text.className = "history-text";
    text.textContent = first.text.slice(0, 120);
    button.append(head, text);
    button.addEventListener("click", () => pick(entry));
    item.append(button);
    return item;
  });
  document.getElementById("history").replaceChildren(...items);
  document.getElementById("history-count").textContent = String(list.length);
}
