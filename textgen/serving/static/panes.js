// The output panes: one, or two side by side when comparing models. Generated text only ever goes in
// as text (Text nodes, textContent), never as HTML: a model trained on markup must not run script here.
// Where a request asked for probabilities, each generated character keeps the model's top alternatives,
// and a click on the character shows them.
"use strict";

const $ = (id) => document.getElementById(id);

export class Pane {
  constructor(suffix, box) {
    this.box = box;
    this.title = $(`title${suffix}`);
    this.output = $(`output${suffix}`);
    this.meta = $(`meta${suffix}`);
    this.alternatives = new WeakMap();      // Text node -> per character (code point): {chosen, p, top: [[char, p]]}
    this.current = null;                    // the Text node the running request appends to
    this.output.addEventListener("click", (event) => showAlternatives(this, event));
  }

  show(visible, title = "") {
    if (this.box) this.box.hidden = !visible;
    this.title.hidden = !title;
    this.title.textContent = title;
  }

  /** A fresh output: the prompt, then what the request makes. */
  start(prompt) {
    this.output.replaceChildren();
    this.meta.textContent = "";
    if (prompt) this.span(prompt, "prompt");
    this.resume();
  }

  /** The next request's text carries on after what is shown. */
  resume() {
    this.current = document.createTextNode("");
    this.alternatives.set(this.current, []);
    this.output.append(this.current);
  }

  span(text, className) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    this.output.append(span);
    return span;
  }

  append(text, alternatives) {
    this.current.appendData(text);
    if (alternatives) this.alternatives.get(this.current).push(...alternatives);
    this.output.scrollTop = this.output.scrollHeight;
  }

  warn(message) {
    this.span(`warning: ${message}`, "warning");
    this.resume();                          // later text follows the warning
  }

  /** The text on show, without the warnings: what Copy and Download take. */
  text() {
    return [...this.output.childNodes].filter((n) => !(n.classList && n.classList.contains("warning")))
      .map((n) => n.textContent).join("");
  }

  /** A saved output (from the history) back on show, as text. */
  restore(text, title) {
    this.output.replaceChildren(document.createTextNode(text));
    this.current = null;
    this.show(true, title);
  }
}

/** "seed 7 · 300 characters in 0.42 s · 714 chars/s" */
export function meta(seed, characters, seconds) {
  const parts = [`seed ${seed}`];
  if (characters !== null) {
    parts.push(`${characters.toLocaleString("en")} characters in ${seconds.toFixed(2)} s`);
    if (seconds > 0) parts.push(`${Math.round(characters / seconds).toLocaleString("en")} chars/s`);
  }
  return parts.join(" · ");
}

// -- the probability view -----------------------------------------------------------------------------

function characterAt(x, y) {
  /** The Text node and UTF-16 offset of the character under the point, or null. */
  const caret = document.caretPositionFromPoint ? document.caretPositionFromPoint(x, y) : null;
  const node = caret ? caret.offsetNode : null;
  if (!node || node.nodeType !== Node.TEXT_NODE) return null;
  // The caret falls on the nearer edge of a character: take the one whose box holds the point.
  const range = document.createRange();
  for (const offset of [caret.offset, caret.offset - 1]) {
    if (offset < 0 || offset >= node.length) continue;
    range.setStart(node, offset);
    range.setEnd(node, Math.min(node.length, offset + 1));
    for (const box of range.getClientRects()) {
      if (x >= box.left - 1 && x <= box.right + 1 && y >= box.top - 1 && y <= box.bottom + 1) return {node, offset};
    }
  }
  return null;
}

function showAlternatives(pane, event) {
  const popup = $("alternatives");
  const hit = characterAt(event.clientX, event.clientY);
  const list = hit ? pane.alternatives.get(hit.node) : null;
  // The list counts characters (code points); a Text node's offsets count UTF-16 units.
  const index = list ? [...hit.node.data.slice(0, hit.offset)].length : -1;
  const entry = list && index < list.length ? list[index] : null;
  if (!entry) {
    popup.hidden = true;
    return;
  }
  const heading = document.createElement("p");
  heading.textContent = `character ${index + 1}: ${visible(entry.chosen)}, p = ${percent(entry.p)}`;
  const table = document.createElement("table");
  for (const [ch, p] of entry.top) {
    const row = table.insertRow();
    if (ch === entry.chosen) row.className = "chosen";
    row.insertCell().textContent = visible(ch);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, Math.round(p * 100))}%`;
    row.insertCell().append(bar);
    row.insertCell().textContent = percent(p);
  }
  popup.replaceChildren(heading, table);
  popup.hidden = false;
  const box = popup.parentElement.getBoundingClientRect();
  popup.style.left = `${Math.min(event.clientX - box.left, box.width - 220)}px`;
  popup.style.top = `${event.clientY - box.top + 16}px`;
}

function percent(p) {
  return p >= 0.001 ? `${(p * 100).toFixed(1)}%` : `${(p * 100).toExponential(0)}%`;
}

/** A character as the view names it: a space, a newline and a tab are otherwise invisible. */
function visible(ch) {
  return {" ": "␣ (space)", "\n": "↵ (newline)", "\t": "⇥ (tab)"}[ch] || ch;
}
