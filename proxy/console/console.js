// The ttc-proxy console: a key's recent runs drawn from their traces, and a playground streaming one or two models
// side by side. Plain DOM, no dependencies: served by the proxy from its package, works offline.
"use strict";

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || attrs.svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "svg" || value === undefined || value === null || value === false) continue;
    if (name === "class") node.setAttribute("class", value);
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const svg = (tag, attrs = {}, ...children) => el(tag, { ...attrs, svg: true }, ...children);

// ---- the key and requests ----

const KEY_STORAGE = "ttc-proxy-key";
$("#key").value = sessionStorage.getItem(KEY_STORAGE) || "";

function headers(extra = {}) {
  const key = $("#key").value.trim();
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error ? body.error.message : `${response.status} ${response.statusText}`);
  return body;
}

// ---- tabs ----

for (const tab of document.querySelectorAll("button.tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll("button.tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === tab.dataset.tab));
  });
}

// ---- the run list ----

let traces = new Map();

async function loadRuns(selectId) {
  sessionStorage.setItem(KEY_STORAGE, $("#key").value.trim());
  const status = $("#runs-status");
  status.textContent = "Loading…";
  try {
    const listing = await getJSON("/v1/traces?limit=50");
    traces = new Map(listing.data.map((t) => [t.id, t]));
    const list = $("#run-list");
    list.replaceChildren(...listing.data.map(runItem));
    status.textContent = listing.data.length ? `${listing.data.length} runs (newest first)` :
      "No strategy runs for this key yet (pass-through requests keep no trace).";
    const chosen = selectId || (listing.data[0] && listing.data[0].id);
    if (chosen && traces.has(chosen)) showRun(chosen);
    loadModels();
  } catch (error) {
    status.textContent = `Could not list runs: ${error.message}`;
  }
}

function runItem(trace) {
  const root = trace.nodes[0];
  const when = new Date(trace.created * 1000).toLocaleTimeString();
  return el("li", { "data-trace-id": trace.id, onclick: () => showRun(trace.id) },
    el("div", {}, el("span", { class: "strategy", text: root.label + (root.over ? ` > ${root.over}` : "") }),
      " ", el("span", { class: `status-${root.status || "running"}`, text: root.status || "running" })),
    el("div", { class: "muted", text: `${root.model || ""} · ${when} · ${fmtMs(root.ms)} · ${root.calls ?? "?"} calls` }));
}

function fmtMs(ms) {
  if (ms === undefined || ms === null) return "…";
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

// ---- one run, drawn from its trace ----

function showRun(id) {
  const trace = traces.get(id);
  document.querySelectorAll("#run-list li").forEach((li) => li.classList.toggle("selected", li.dataset.traceId === id));
  const detail = $("#run-detail");
  detail.dataset.traceId = id;
  const children = new Map();
  for (const node of trace.nodes) {
    if (node.parent === null) continue;
    if (!children.has(node.parent)) children.set(node.parent, []);
    children.get(node.parent).push(node);
  }
  const view = { trace, children, nodes: trace.nodes };
  detail.replaceChildren(drawStrategy(trace.nodes[0], view, true));
}

function descendants(view, node, stop = (n) => false) {
  const found = [];
  const walk = (n) => {
    for (const child of view.children.get(n.id) || []) {
      found.push(child);
      if (!stop(child)) walk(child);
    }
  };
  walk(node);
  return found;
}

function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) }))));
}

const DRAWINGS = { sc: drawPool, bon: drawPool, deepconf: drawPool, mcts: drawMcts, entropy: drawTokens,
                   pts: drawTokens, deepthink: drawDeepthink, think: drawThink };

function drawStrategy(node, view, top) {
  const details = node.details || {};
  const card = el("section", { class: top ? "card run" : "card nested", "data-strategy": node.label,
                               "data-node": node.id });
  card.append(el("h3", { text: top ? `${node.label}${node.over ? " > " + node.over : ""} · ${view.trace.id}`
                                   : `${node.label} (nested run)` }),
    facts([["status", node.status || "running"], ["model", node.model], ["answer", details.answer ?? node.answer],
           ["time", fmtMs(node.ms)], ["backend calls", node.calls], ["prompt tokens", node.prompt_tokens],
           ["completion tokens", node.completion_tokens], ["budget exhausted", node.budget_exhausted ? "yes" : null],
           ["error", node.error]]));
  if (node.params && Object.keys(node.params).length) {
    const set = Object.entries(node.params).filter(([, v]) => v !== null);
    card.append(el("details", {}, el("summary", { text: "parameters" }),
      el("code", { text: set.map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ") })));
  }
  const draw = DRAWINGS[node.label];
  if (draw) {
    try { card.append(draw(node, view)); } catch (error) { card.append(el("p", { class: "muted", text: `(cannot draw: ${error.message})` })); }
  }
  // runs nested in this one (compositions): drawn inside it, the first few in full
  const nested = descendants(view, node, (n) => n.kind === "strategy").filter((n) => n.kind === "strategy");
  if (nested.length) {
    const box = el("div", { class: "nested-runs" }, el("h3", { text: `${nested.length} nested ${nested[0].label} run${nested.length > 1 ? "s" : ""}` }));
    nested.slice(0, 6).forEach((child) => box.append(drawStrategy(child, view, false)));
    if (nested.length > 6) box.append(el("p", { class: "muted", text: `… and ${nested.length - 6} more` }));
    card.append(box);
  }
  const calls = drawCalls(node, view);
  if (calls) card.append(calls);
  return card;
}

function drawCalls(node, view) {
  const calls = descendants(view, node, (n) => n.kind === "strategy").filter((n) => n.kind === "call" || n.kind === "stream");
  const rows = calls.map((c) => el("tr", {},
    el("td", { text: c.id }), el("td", { text: c.label }), el("td", { text: c.n ?? 1 }), el("td", { text: c.status }),
    el("td", { text: fmtMs(c.ms) }), el("td", { text: c.prompt_tokens ?? "" }), el("td", { text: c.completion_tokens ?? "" }),
    el("td", { text: (c.outputs || []).map((o) => o.slice(0, 80)).join(" | ") })));
  if (!calls.length) return null;
  return el("details", { class: "calls" }, el("summary", { text: `${calls.length} backend call${calls.length > 1 ? "s" : ""}` }),
    el("table", {}, el("tr", {}, ...["#", "label", "n", "status", "time", "prompt", "completion", "output"].map((h) => el("th", { text: h }))), rows));
}

// sc, bon, deepconf: the pool of candidates, their answers and scores, and the one chosen
function drawPool(node) {
  const d = node.details;
  if (!d || !d.candidates) return el("p", { class: "muted", text: "(no candidates recorded)" });
  let chosen;
  let scores;
  if (node.label === "bon") {
    chosen = d.winner ? d.winner.index : -1;
    scores = d.scores || {};
  } else if (node.label === "deepconf") {
    chosen = d.candidates.findIndex((c) => c.answer === d.answer && c.pruned_at === null);
    scores = d.weights || {};
  } else {
    chosen = d.candidates.findIndex((c) => c.answer === d.answer && c.counted !== false);
    scores = d.votes || {};
  }
  const pool = el("div", { class: "pool" }, d.candidates.map((c, i) => {
    const dropped = c.counted === false || (c.pruned_at !== undefined && c.pruned_at !== null);
    const score = c.confidence ?? c.score ?? null;
    return el("div", { class: `candidate${i === chosen ? " chosen" : ""}${dropped ? " dropped" : ""}`, "data-index": i },
      el("div", { class: "muted", text: `#${i + 1}` }),
      el("div", { class: "answer", text: c.answer ?? "(no answer)" }),
      el("div", { class: "muted", text: [score !== null ? `score ${Number(score).toFixed(3)}` : null,
        c.completion_tokens ?? c.tokens ? `${c.completion_tokens ?? c.tokens} tokens` : null,
        c.pruned_at !== undefined && c.pruned_at !== null ? `stopped at ${c.pruned_at}` : null,
        c.finish_reason && c.finish_reason !== "stop" ? c.finish_reason : null].filter(Boolean).join(" · ") }));
  }));
  const entries = Object.entries(scores);
  const top = Math.max(1e-9, ...entries.map(([, v]) => Number(v)));
  const label = node.label === "sc" ? "votes" : node.label === "deepconf" ? "weights" : "scores by answer";
  const bars = el("div", { class: "bars" }, el("div", { class: "muted", text: label }), entries.map(([answer, value]) =>
    el("div", { class: `bar${answer === d.answer ? " winner" : ""}` }, el("span", { class: "label", text: answer }),
      el("div", { class: "fill", style: `width:${Math.max(2, 260 * Number(value) / top)}px` }),
      el("span", { text: Number(value).toFixed(2) }))));
  return el("div", {}, pool, entries.length ? bars : null);
}

// mcts: the search tree, each node's score and whether it widened (a new answer) or deepened (refined its parent)
const ACTION_COLOURS = { widen: "var(--widen)", deepen: "var(--deepen)", step: "var(--step)", finish: "var(--finish)", refused: "#9ca3af" };

function drawMcts(node) {
  const tree = (node.notes && node.notes.tree) || (node.details && node.details.tree) || [];
  if (!tree.length) return el("p", { class: "muted", text: "(no tree recorded)" });
  const chosen = node.details && node.details.node !== undefined ? node.details.node
    : (tree.find((n) => n.answer === node.answer) || {}).id;
  const kids = new Map();
  for (const n of tree) {
    const parent = n.parent === null ? "root" : n.parent;
    if (!kids.has(parent)) kids.set(parent, []);
    kids.get(parent).push(n);
  }
  // leaves get a column each; a parent sits above the middle of its children
  const pos = new Map();
  let column = 0;
  const place = (id, depth) => {
    const children = kids.get(id) || [];
    let x;
    if (!children.length) x = column++;
    else {
      const xs = children.map((c) => place(c.id, depth + 1));
      x = (Math.min(...xs) + Math.max(...xs)) / 2;
    }
    pos.set(id, { x, depth });
    return x;
  };
  place("root", 0);
  const depth = Math.max(...[...pos.values()].map((p) => p.depth));
  const dx = Math.max(44, Math.min(78, 1000 / Math.max(1, column))), dy = 90, pad = 46;  // wide trees packed
  // below the deepest row: its largest circle and two lines of text
  const byModel = tree.some((n) => n.model);  // a search over several models: a third line names each node's
  const width = Math.max(column * dx + pad * 2, 320), height = depth * dy + pad + 22 + 36 + (byModel ? 13 : 0);
  const at = (id) => ({ x: pad + pos.get(id).x * dx, y: pad + pos.get(id).depth * dy });
  const drawing = svg("svg", { class: "tree", viewBox: `0 0 ${width} ${height}`, style: `max-width:${width}px`,
                               "data-nodes": tree.length });
  for (const n of tree) {
    const from = at(n.parent === null ? "root" : n.parent), to = at(n.id);
    drawing.append(svg("line", { x1: from.x, y1: from.y, x2: to.x, y2: to.y }));
  }
  const r = at("root");
  drawing.append(svg("g", { class: "question" }, svg("rect", { x: r.x - 34, y: r.y - 13, width: 68, height: 26, rx: 6, fill: "#111827" }),
    svg("text", { x: r.x, y: r.y + 4, fill: "#fff", style: "fill:#fff", text: "question" })));
  for (const n of tree) {
    const p = at(n.id);
    const radius = 10 + 12 * Math.max(0, Math.min(1, n.score));
    drawing.append(svg("g", { class: `mcts-node${n.id === chosen ? " chosen" : ""}`, "data-node-id": n.id,
                              "data-action": n.action, "data-score": n.score, "data-model": n.model || "" },
      svg("title", { text: `node ${n.id}: ${n.action}${n.model ? ` by ${n.model}` : ""}, score ${n.score}, answer ${n.answer}` }),
      svg("circle", { cx: p.x, cy: p.y, r: radius, fill: ACTION_COLOURS[n.action] || "#6b7280" }),
      svg("text", { x: p.x, y: p.y + 4, style: "fill:#fff;font-weight:700", text: n.id }),
      svg("text", { x: p.x, y: p.y + radius + 14, text: `${n.answer || "…"}` }),
      svg("text", { x: p.x, y: p.y + radius + 27, style: "fill:#6b7280", text: Number(n.score).toFixed(3) }),
      ...(n.model ? [svg("text", { class: "node-model", x: p.x, y: p.y + radius + 40, style: "fill:#6b7280",
                                   text: n.model })] : [])));
  }
  const used = [...new Set(tree.map((n) => n.action))];
  return el("div", {}, drawing, el("div", { class: "legend" },
    used.map((a) => el("span", {}, el("i", { style: `background:${ACTION_COLOURS[a] || "#6b7280"}` }), a)),
    el("span", { text: "size: score · green ring: chosen" })));
}

// entropy, pts: the reply's tokens coloured by entropy (pts: by how unsure the top token was), interventions marked
function drawTokens(node) {
  const positions = (node.notes && node.notes.positions) || [];
  if (!positions.length) return el("p", { class: "muted", text: "(no token positions recorded)" });
  const interventions = (node.details && node.details.interventions) || [];
  const marked = new Map(interventions.map((i) => [i.position, i]));
  const byEntropy = positions.some((p) => p.entropy !== undefined);
  const measure = (p) => byEntropy ? p.entropy : 1 - (p.top_probability ?? 1);
  const top = byEntropy ? Math.max(1.5, ...positions.map((p) => p.entropy || 0)) : 1;
  const tokens = el("div", { class: "tokens" }, positions.map((p) => {
    const level = Math.max(0, Math.min(1, measure(p) / top));
    const forked = marked.has(p.position) || (!interventions.length && p.action && !/^(keep|continue|in kept branch)$/.test(p.action));
    const why = marked.get(p.position);
    // where the strategy branched, the reply goes on with the branch it kept, not the token first sampled there
    const shown = why && typeof why.kept === "string" ? why.kept : p.token;
    return el("span", { class: `token${forked ? " intervention" : ""}`, "data-position": p.position,
                        style: `background:hsl(${140 - 140 * level},${70 + 15 * level}%,${85 - 13 * level}%)`,
                        title: `${JSON.stringify(p.token)} · ${byEntropy ? `entropy ${p.entropy}, varentropy ${p.varentropy}, ${p.regime}` : `top p ${p.top_probability}`} · ${p.action}${why ? ` · ${why.why || ""}: sampled ${JSON.stringify(p.token)}, kept ${JSON.stringify(why.kept)}` : ""}` },
      shown);
  }));
  const list = interventions.length ? el("ol", { class: "interventions" }, interventions.map((i) =>
    el("li", { text: `token ${i.position} ${JSON.stringify(i.token ?? "")}: ${i.action}${i.why ? ` (${i.why})` : ""}${i.kept !== undefined ? ` → kept ${JSON.stringify(i.kept)}` : ""}${i.inserted ? ` inserted ${JSON.stringify(i.inserted)}` : ""}` }))) : null;
  return el("div", {}, tokens,
    el("div", { class: "scale" }, el("span", { text: byEntropy ? "entropy low" : "sure" }), el("span", { class: "gradient" }),
      el("span", { text: byEntropy ? "high" : "unsure" }), el("span", { class: "token intervention", text: "x" }), "intervention"),
    list);
}

// deepthink: its plan (approaches), an exploration per approach with its answer, and the route to the answer
function drawDeepthink(node) {
  const d = node.details;
  if (!d) return el("p", { class: "muted", text: "(no plan recorded)" });
  const explorations = d.explorations || [];
  return el("div", {},
    el("p", {}, "route: ", el("span", { class: "route", "data-route": d.route, text: d.route || "?" }),
      d.agreement !== undefined ? ` · agreement ${Number(d.agreement).toFixed(2)}` : ""),
    el("div", { class: "approaches" }, explorations.map((x, i) =>
      el("div", { class: `candidate${x.answer === d.answer ? " agrees" : ""}`, "data-index": i },
        el("div", { class: "muted", text: `approach ${i + 1}` }), el("div", { text: x.approach }),
        el("div", { class: "answer", text: x.answer ?? "(no answer)" })))));
}

// think: the thinking segments, with the waits the strategy inserted between them
function drawThink(node, view) {
  const d = node.details || {};
  const wait = (node.params && node.params.wait) || "Wait";
  const segments = descendants(view, node).filter((n) => n.label === "thinking");
  const answer = descendants(view, node).find((n) => n.label === "answer");
  const parts = [];
  segments.forEach((s, i) => {
    if (i > 0) parts.push(el("span", { class: "wait", text: wait }));
    parts.push(el("div", { class: "segment", text: (s.outputs || [""])[0] || `(${s.completion_tokens} tokens)` }));
  });
  return el("div", { class: "thinking" },
    facts([["thinking tokens", d.thinking_tokens], ["waits", d.waits], ["answer tokens", d.answer_tokens]]),
    parts, answer ? el("div", {}, el("strong", { text: "answer: " }), (answer.outputs || [""])[0]) : null);
}

// ---- models for the playground ----

async function loadModels() {
  try {
    const models = await getJSON("/v1/models");
    $("#model-names").replaceChildren(...models.data.map((m) => el("option", { value: m.id })));
  } catch (error) { /* the playground still takes typed names */ }
}

// ---- the playground ----

async function runLane(lane, model, question, maxTokens) {
  const started = performance.now();
  let firstToken = null;
  const reasoning = lane.querySelector(".reasoning"), answer = lane.querySelector(".answer-text"), stats = lane.querySelector(".stats");
  let usage = null, traceId = null, buffer = "";
  const show = () => {
    stats.textContent = [usage ? `${usage.completion_tokens} completion tokens` : null, fmtMs(performance.now() - started),
      firstToken !== null ? `first text after ${fmtMs(firstToken)}` : null].filter(Boolean).join(" · ");
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "content-type": "application/json" }),
      body: JSON.stringify({ model, messages: [{ role: "user", content: question }], stream: true,
                             max_tokens: maxTokens, stream_options: { include_usage: true } }) });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          if (chunk.ttc) traceId = chunk.ttc.trace_id;
          const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
          if (delta.reasoning_content) reasoning.textContent += delta.reasoning_content;
          if (delta.content) answer.textContent += delta.content;
          if ((delta.content || delta.reasoning_content) && firstToken === null) firstToken = performance.now() - started;
        }
      }
      show();
    }
    show();
    if (traceId) {
      stats.append(" · ", el("a", { href: "#", "data-trace-link": traceId, text: "see the run",
        onclick: (e) => { e.preventDefault(); document.querySelector('[data-tab="runs"]').click(); loadRuns(traceId); } }));
    }
    lane.dataset.state = "done";
    lane.dataset.tokens = usage ? usage.completion_tokens : "";
  } catch (error) {
    lane.classList.add("failed");
    answer.textContent = `error: ${error.message}`;
    lane.dataset.state = "failed";
  }
}

$("#play-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("#key").value.trim());
  const question = $("#question").value;
  const maxTokens = Number($("#max-tokens").value) || 96;
  const models = [$("#model-a").value.trim(), $("#model-b").value.trim()].filter(Boolean);
  const lanes = models.map((model, i) => el("div", { class: "card lane", "data-model": model, "data-lane": i, "data-state": "running" },
    el("h3", { text: model }), el("div", { class: "muted", text: "reasoning" }), el("div", { class: "reasoning" }),
    el("div", { class: "muted", text: "answer" }), el("div", { class: "answer-text" }), el("div", { class: "stats" })));
  $("#lanes").replaceChildren(...lanes);
  models.forEach((model, i) => runLane(lanes[i], model, question, maxTokens));
});

$("#key-form").addEventListener("submit", (event) => { event.preventDefault(); loadRuns(); });
if (location.hash.startsWith("#trace-")) loadRuns(location.hash.slice(1));
