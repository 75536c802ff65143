// textgen's offline page: the model's one-character step in plain JavaScript over the weights embedded in
// this file, and textgen's sampling (temperature, top-k, top-p) with a seeded generator of its own.
// Nothing is fetched: the Content-Security-Policy above forbids every connection.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const spec = JSON.parse($("textgen-model").textContent);
  const vocab = spec.vocab, V = vocab.length, config = spec.config;
  const H = config.hidden_size, L = config.layers, E = config.embed_size, G = 4 * H;
  const ids = new Map(vocab.map((ch, i) => [ch, i]));
  const SLICE_MS = 25;                 // compute this long, then let the page draw and hear Stop
  const MAX_LENGTH = 100000000;        // as generate.py's --length

  // ---- the weights: base64 of little-endian float32, or int8 with one float32 scale per row ----
  const bytes = Uint8Array.from(atob($("textgen-weights").textContent.trim()), (ch) => ch.charCodeAt(0));
  const view = new DataView(bytes.buffer);

  function tensor(name) {
    const t = spec.tensors[name], n = t.shape.reduce((a, b) => a * b, 1);
    if (t.dtype === "int32") {
      const out = new Int32Array(n);
      for (let i = 0; i < n; i++) out[i] = view.getInt32(t.offset + 4 * i, true);
      return out;
    }
    const out = new Float32Array(n);
    if (t.dtype === "float32") {
      for (let i = 0; i < n; i++) out[i] = view.getFloat32(t.offset + 4 * i, true);
    } else {                           // int8: q * scale, rounded to float32 as PyTorch rounds it
      const cols = t.shape[1];
      for (let r = 0; r < t.shape[0]; r++) {
        const scale = view.getFloat32(t.scale + 4 * r, true);
        for (let c = 0; c < cols; c++) out[r * cols + c] = view.getInt8(t.offset + r * cols + c) * scale;
      }
    }
    return out;
  }

  // out[r] = bias[r] + W[r, :] . x, with W (rows, cols) row-major; sums in float64.
  function matvec(W, x, rows, cols, out, bias) {
    for (let r = 0, base = 0; r < rows; r++, base += cols) {
      let sum = bias ? bias[r] : 0;
      for (let j = 0; j < cols; j++) sum += W[base + j] * x[j];
      out[r] = sum;
    }
    return out;
  }

  const layers = [];
  for (let k = 0; k < L; k++) {
    layers.push({ wih: tensor(`layer${k}.w_ih`), whh: tensor(`layer${k}.w_hh`), bias: tensor(`layer${k}.bias`) });
  }
  // Layer 0's input product of every character, computed once (as textgen's Stepper folds it):
  // a character's embedding times W_ih0, plus both biases, is one row of this table.
  const tokenGates = new Float32Array(V * G);
  {
    const embedding = tensor("embedding"), row = new Float64Array(G);
    for (let v = 0; v < V; v++) {
      matvec(layers[0].wih, embedding.subarray(v * E, (v + 1) * E), G, E, row, layers[0].bias);
      tokenGates.set(row, v * G);
    }
  }
  const head = { weight: tensor("head.weight"), bias: tensor("head.bias") };
  const adaptive = "rank" in spec.tensors;
  const tails = [], bounds = adaptive ? [...config.cutoffs, V] : [];
  if (adaptive) {
    head.rank = tensor("rank");
    for (let i = 0; i + 1 < bounds.length; i++) {
      const t = spec.tensors[`tail${i}.projection`];
      tails.push({ projection: tensor(`tail${i}.projection`), output: tensor(`tail${i}.output`), width: t.shape[0],
                   size: bounds[i + 1] - bounds[i] });
    }
  }

  // ---- one character: the four gate equations of textgen's lstm_cell, layer by layer ----
  const sigmoid = (z) => 1 / (1 + Math.exp(-z));
  const gates = new Float64Array(G);

  function zeroState() {
    return Array.from({ length: L }, () => ({ h: new Float32Array(H), c: new Float32Array(H) }));
  }

  function step(token, state) {              // -> { logits, state }: the new state, the old one untouched
    let x = null;
    const next = [];
    for (let k = 0; k < L; k++) {
      const layer = layers[k], { h: hPrev, c: cPrev } = state[k];
      if (k === 0) gates.set(tokenGates.subarray(token * G, (token + 1) * G));
      else matvec(layer.wih, x, G, H, gates, layer.bias);
      for (let r = 0, base = 0; r < G; r++, base += H) {
        let sum = 0;
        for (let j = 0; j < H; j++) sum += layer.whh[base + j] * hPrev[j];
        gates[r] += sum;
      }
      const h = new Float32Array(H), c = new Float32Array(H);
      for (let j = 0; j < H; j++) {
        const inputGate = sigmoid(gates[j]);           // how much of the candidate to write
        const forgetGate = sigmoid(gates[H + j]);      // how much of the old cell to keep
        const candidate = Math.tanh(gates[2 * H + j]); // what to write
        const outputGate = sigmoid(gates[3 * H + j]);  // how much of the cell to expose
        c[j] = forgetGate * cPrev[j] + inputGate * candidate;
        h[j] = outputGate * Math.tanh(c[j]);
      }
      next.push({ h, c });
      if (config.residual && k > 0) {                  // a layer after the first hands up its input plus its output
        const sum = new Float32Array(H);
        for (let j = 0; j < H; j++) sum[j] = h[j] + x[j];
        x = sum;
      } else {
        x = h;
      }
    }
    return { logits: logitsOf(x), state: next };
  }

  function logSoftmax(values) {
    let max = -Infinity, sum = 0;
    for (const v of values) max = Math.max(max, v);
    for (const v of values) sum += Math.exp(v - max);
    const shift = max + Math.log(sum);
    return values.map((v) => v - shift);
  }

  function logitsOf(x) {
    if (!adaptive) return matvec(head.weight, x, V, H, new Float64Array(V), head.bias);
    // The adaptive softmax: the shortlist's log-probabilities, each cluster's log-softmax plus the head's
    // log-probability of that cluster; then each character's column by its frequency rank.
    const shortlist = bounds[0];
    const headLogp = logSoftmax(matvec(head.weight, x, shortlist + tails.length, H,
                                       new Float64Array(shortlist + tails.length), head.bias));
    const byRank = new Float64Array(V);
    byRank.set(headLogp.subarray(0, shortlist));
    tails.forEach((tail, i) => {
      const projected = Float32Array.from(matvec(tail.projection, x, tail.width, H, new Float64Array(tail.width)));
      const within = logSoftmax(matvec(tail.output, projected, tail.size, tail.width, new Float64Array(tail.size)));
      for (let j = 0; j < tail.size; j++) byRank[bounds[i] + j] = within[j] + headLogp[shortlist + i];
    });
    return Float64Array.from(head.rank, (r) => byRank[r]);
  }

  // ---- sampling: textgen's next_token_probs and draw, with this page's own seeded generator ----
  function distribution(logits, temperature, topK, topP) {
    let probs = new Float64Array(V);
    if (temperature === 0) {                 // greedy: the first of the largest, as torch.argmax picks
      let best = 0;
      for (let v = 1; v < V; v++) if (logits[v] > logits[best]) best = v;
      probs[best] = 1;
    } else {
      let max = -Infinity, sum = 0;
      for (let v = 0; v < V; v++) max = Math.max(max, logits[v] / temperature);
      for (let v = 0; v < V; v++) sum += (probs[v] = Math.exp(logits[v] / temperature - max));
      for (let v = 0; v < V; v++) probs[v] /= sum;
    }
    const cutK = topK !== null && topK < V, cutP = topP !== null && topP < 1;
    if (cutK || cutP) {
      const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
      const kth = cutK ? probs[order[topK - 1]] : 0;
      const mass = probs.reduce((a, b) => a + b, 0);
      let before = 0;
      const keep = new Uint8Array(V);
      order.forEach((v, place) => {          // the k most likely (ties kept), within the nucleus of mass p
        keep[v] = place === 0 || ((!cutK || probs[v] >= kth) && (!cutP || before < topP * mass));
        before += probs[v];
      });
      let total = 0;
      for (let v = 0; v < V; v++) total += (probs[v] = keep[v] ? probs[v] : 0);
      for (let v = 0; v < V; v++) probs[v] /= total;
    }
    return probs;
  }

  function draw(probs, u) {                  // invert the cumulative distribution at u, as textgen's draw
    const cdf = new Float64Array(V);
    let sum = 0;
    for (let v = 0; v < V; v++) cdf[v] = sum += probs[v];
    const target = u * cdf[V - 1];
    for (let v = 0; v < V; v++) if (cdf[v] > target) return v;     // a zero-probability token never passes
    return V - 1;
  }

  function randomStream(seed) {              // mulberry32, two draws to a 53-bit uniform in [0, 1)
    let s = (seed >>> 0) ^ Math.imul(Math.floor(seed / 4294967296) | 0, 0x9e3779b9);
    const next32 = () => {
      s = (s + 0x6d2b79f5) | 0;
      let t = Math.imul(s ^ (s >>> 15), s | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return (t ^ (t >>> 14)) >>> 0;
    };
    return () => ((next32() >>> 5) * 67108864 + (next32() >>> 6)) / 9007199254740992;
  }

  // ---- settings, checked as textgen checks them; each mistake is one sentence ----
  function escapeChar(ch) {
    const named = { "\n": "\\n", "\t": "\\t", "\r": "\\r" }[ch];
    if (named) return named;
    return /[\s\p{C}]/u.test(ch) ? "U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") : ch;
  }

  function encode(text) {
    const chars = Array.from(text), missing = [...new Set(chars.filter((ch) => !ids.has(ch)))];
    if (missing.length) {
      missing.sort((a, b) => a.codePointAt(0) - b.codePointAt(0));
      const many = missing.length > 1;
      const shown = missing.slice(0, 20).map(escapeChar).join(" ") +
        (missing.length > 20 ? ` and ${missing.length - 20} more` : "");
      throw new Error(`the prompt has ${missing.length} character${many ? "s" : ""} the model never saw ` +
                      `(${shown}); remove ${many ? "them" : "it"} to generate`);
    }
    return chars.map((ch) => ids.get(ch));
  }

  function whole(value) { return typeof value === "number" && Number.isInteger(value); }

  function checked(options) {
    const o = { length: 300, temperature: 0.8, topK: null, topP: null, seed: null };
    for (const [key, value] of Object.entries(options)) if (value !== undefined && key in o) o[key] = value;
    for (const key of ["topK", "topP", "seed"]) if (o[key] === "") o[key] = null;
    const bad = (what, must, value) => { throw new Error(`${what} must be ${must}, got ${value}`); };
    if (!whole(o.length) || o.length < 1 || o.length > MAX_LENGTH) {
      bad("length", "from 1 to 100,000,000 characters", o.length);
    }
    const t = o.temperature;
    if (typeof t !== "number" || !Number.isFinite(t) || !(t === 0 || (t >= 1e-6 && t <= 1e6))) {
      bad("temperature", "0 (greedy) or from 1e-6 to 1e6", t);
    }
    if (o.topK !== null && (!whole(o.topK) || o.topK < 1)) {
      bad("top-k", "a whole number of at least 1 (empty: off)", o.topK);
    }
    if (o.topP !== null && (typeof o.topP !== "number" || !(o.topP > 0 && o.topP <= 1))) {
      bad("top-p", "in (0, 1] (empty: off)", o.topP);
    }
    if (o.seed !== null && (!whole(o.seed) || o.seed < 0 || o.seed > Number.MAX_SAFE_INTEGER)) {
      bad("seed", "a whole number from 0 to 9007199254740991 (empty: random)", o.seed);
    }
    return o;
  }

  // ---- the page ----
  const output = $("output"), status = $("status"), meta = $("meta");
  const buttons = { generate: $("generate"), continue: $("continue"), stop: $("stop") };
  let session = null;        // { state, logits, random, seed }: what Continue carries on
  let running = false, stopping = false;

  function say(message, error = false) {
    status.textContent = message;
    status.classList.toggle("error", error);
  }

  function setButtons() {
    buttons.generate.disabled = running;
    buttons.continue.disabled = running || session === null;
    buttons.stop.disabled = !running;
  }

  const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

  async function feed(tokens) {
    let sliceEnd = performance.now() + SLICE_MS;
    for (const token of tokens) {
      const out = step(token, session.state);
      session.state = out.state;
      session.logits = out.logits;
      if (performance.now() >= sliceEnd) {
        await tick();
        sliceEnd = performance.now() + SLICE_MS;
      }
    }
  }

  async function run(settings) {             // settings.length characters from the session, streamed as text
    let text = "", shown = 0, produced = 0;
    const piece = output.appendChild(document.createTextNode(""));
    say("generating…");
    let sliceEnd = performance.now() + SLICE_MS;
    while (produced < settings.length && !stopping) {
      const probs = distribution(session.logits, settings.temperature, settings.topK, settings.topP);
      const token = draw(probs, session.random());
      const out = step(token, session.state);
      session.state = out.state;
      session.logits = out.logits;
      text += vocab[token];
      produced += 1;
      if (performance.now() >= sliceEnd) {
        piece.appendData(text.slice(shown));     // text, never markup
        shown = text.length;
        await tick();
        sliceEnd = performance.now() + SLICE_MS;
      }
    }
    piece.appendData(text.slice(shown));
    say(stopping ? `stopped after ${produced} characters` : `reached the length (${produced} characters)`);
    return text;
  }

  async function guarded(work) {
    if (running) throw new Error("a generation is running; press Stop first");
    running = true;
    stopping = false;
    setButtons();
    try {
      return await work();
    } catch (error) {
      say(error.message, true);
      throw error;
    } finally {
      running = false;
      setButtons();
    }
  }

  function generate(options = {}) {          // -> Promise of the generated text (the prompt not included)
    return guarded(async () => {
      const settings = checked(options), prompt = String(options.prompt ?? "");
      const tokens = encode(prompt);
      const seed = settings.seed ?? crypto.getRandomValues(new Uint32Array(1))[0];
      showSettings({ ...settings, seed }, prompt);
      output.replaceChildren();
      const shownPrompt = document.createElement("span");
      shownPrompt.className = "prompt";
      shownPrompt.textContent = prompt;
      output.appendChild(shownPrompt);
      meta.textContent = `seed ${seed}`;
      session = { state: zeroState(), logits: null, random: randomStream(seed), seed };
      say("reading the prompt…");
      // As generate.py: the prompt, or where there is none the text a model starts from (a newline).
      await feed(tokens.length ? tokens : encode(spec.opening_text));
      return run(settings);
    });
  }

  function carryOn(options = {}) {           // -> Promise of the text that follows the last output
    return guarded(async () => {
      if (session === null) throw new Error("nothing to continue yet; press Generate first");
      const settings = checked({ ...readForm(), ...options, seed: null });
      showSettings({ ...settings, seed: session.seed }, null);
      return run(settings);
    });
  }

  function stop() {
    if (running) stopping = true;
  }

  function number(id, empty) {              // a field's number; its text where it is not one; empty where blank
    const text = $(id).value.trim();
    if (text === "") return empty;
    return Number.isNaN(Number(text)) ? text : Number(text);
  }

  function readForm() {
    return { prompt: $("prompt").value, length: number("length", undefined),
             temperature: number("temperature", undefined), topK: number("top_k", null), topP: number("top_p", null),
             seed: number("seed", null) };
  }

  function showSettings(settings, prompt) {
    if (prompt !== null) $("prompt").value = prompt;
    $("length").value = settings.length;
    $("temperature").value = settings.temperature;
    $("top_k").value = settings.topK ?? "";
    $("top_p").value = settings.topP ?? "";
  }

  buttons.generate.addEventListener("click", () => generate(readForm()).catch(() => {}));   // its sentence is shown
  buttons.continue.addEventListener("click", () => carryOn().catch(() => {}));
  buttons.stop.addEventListener("click", stop);

  $("model-info").textContent = `${L} × LSTM ${H}${config.residual && L > 1 ? " (residual)" : ""}, embedding ${E}, ` +
    `${adaptive ? "adaptive softmax" : "full softmax"}; vocabulary of ${V}; ${spec.parameters.toLocaleString("en")} ` +
    `weights in ${spec.quantize === "int8" ? "int8 with a scale per row" : "float32"}; step ${spec.step}; ` +
    `textgen ${spec.textgen_version}`;
  const info = Object.freeze({ ...spec, tensors: undefined });
  window.textgen = Object.freeze({ generate, continue: carryOn, stop, info });
  say("ready: everything runs in this page, offline");
  setButtons();
})();
