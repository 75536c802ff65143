// One generation request: POST /api/generate, then its JSON lines, one event at a time, as they arrive.
"use strict";

import {encode} from "./fields.js";

/** A request the server refused before any stream began: its JSON answer ({error, template, mentions}). */
export class Refusal extends Error {
  constructor(answer) {
    super(answer.error);
    this.answer = answer;
  }
}

/**
 * Yields each event of the stream: first {id, model, seed, samples} (with seedText, the seed's exact
 * digits), then {text}, {warning}, and last {end, characters, session}. Throws a Refusal for a 4xx/5xx.
 */
export async function* generation(body, signal) {
  const response = await fetch("/api/generate", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: encode(body), signal,
  });
  if (!response.ok) {
    const answer = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
    throw new Refusal(answer);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "", first = true;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    pending += decoder.decode(value, {stream: true});
    let newline;
    while ((newline = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      const event = JSON.parse(line);
      if (first) {
        // JSON.parse rounds a seed past 2**53; the line holds its digits (strings before it are escaped).
        const digits = /"seed": ?(\d+)/.exec(line);
        event.seedText = digits ? digits[1] : String(event.seed);
        first = false;
      }
      yield event;
    }
  }
}

/** Ask the server to end a generation: its stream then closes with everything produced so far. */
export function stopOnServer(id) {
  return fetch("/api/stop", {method: "POST", headers: {"Content-Type": "application/json"},
                             body: JSON.stringify({id})});
}
