// The console page: plain DOM, no build step. Everything shown comes from workers and models, so
// it is set with textContent (never innerHTML), and the server's CSP forbids inline code.
"use strict";

const state = { me: { operator: null, csrf: null }, runId: null, source: null, open: new Set(), run: null,
                lastSeq: 0, pending: null, listTimer: null, clock: null };

function $(id) { return document.getElementById(id); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else if (key === "title" || key === "type" || key === "href") node.setAttribute(key, String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function notice(text, isError) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
  box.classList.toggle("error", Boolean(isError));
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function span(start, end) {
  if (!start) return "";
  const s = Math.max(0, (end || Date.now() / 1000) - start);
  return s < 60 ? `${s.toFixed(1)}s` : `${Math.floor(s / 60)}m${Math.round(s % 60)}s`;
}

function show(text) {
  if (text === null || text === undefined) return "";
  return typeof text === "string" ? text : JSON.stringify(text, null, 2);
}

// -- who am I -------------------------------------------------------------------------------

async function loadMe() {
  try { state.me = await api("/api/me"); } catch (e) { state.me = { operator: null, csrf: null }; }
  const who = $("who");
  if (state.me.operator) {
    who.textContent = `acting as ${state.me.operator}`;
    $("logout").hidden = false;
  } else {
    who.textContent = "read-only";
    who.title = "log in with an operator's login URL to act";
    $("logout").hidden = true;
  }
}

$("logout").addEventListener("click", async () => {
  try { await api("/logout", { method: "POST", headers: { "X-CSRF-Token": state.me.csrf || "" } }); }
  catch (e) { notice(e.message, true); }
  await loadMe();
  route();
});

// -- the run list ---------------------------------------------------------------------------

async function loadRuns() {
  let data;
  try { data = await api("/api/runs"); } catch (e) { $("runs-hint").textContent = e.message; return; }
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  for (const run of data.runs) {
    const link = el("a", { href: `#/run/${encodeURIComponent(run.run_id)}`, text: run.goal || run.run_id });
    const tr = el("tr", { "data-run": run.run_id },
      el("td", { class: "id mono", text: run.run_id.slice(-8) }),
      el("td", { class: "goal" }, link),
      el("td", { class: "st" }, el("span", { class: `state ${run.state}`, text: run.state })),
      el("td", { class: "age", text: age(run.started) }),
      el("td", { class: "tok", text: run.tokens }),
      el("td", { class: "tasks", text: run.tasks }));
    body.append(tr);
  }
  $("runs-hint").textContent = data.runs.length
    ? `${data.runs.length} run(s), newest first; this list refreshes every 5 s.`
    : "No runs in this namespace yet.";
}

// -- one run --------------------------------------------------------------------------------

function openRun(runId) {
  state.runId = runId;
  state.run = null;
  state.open = new Set();
  state.lastSeq = 0;
  closePanel();
  $("history").replaceChildren();
  $("tasks").replaceChildren();
  $("run-goal").textContent = "";
  $("run-id").textContent = runId;
  $("run-live").textContent = "connecting…";
  const source = new EventSource(`/api/runs/${encodeURIComponent(runId)}/stream`);
  state.source = source;
  source.addEventListener("run", (e) => { state.run = JSON.parse(e.data); renderRun(); });
  source.addEventListener("history", (e) => { appendHistory(JSON.parse(e.data)); });
  source.addEventListener("end", () => {
    $("run-live").textContent = "ended";
    source.close();
  });
  source.addEventListener("open", () => { $("run-live").textContent = "live"; });
  source.addEventListener("unavailable", (e) => { $("run-live").textContent = JSON.parse(e.data).error; });
  source.addEventListener("waiting", (e) => {
    const reason = JSON.parse(e.data).reason;
    $("run-live").textContent = reason ? `waiting: ${reason}` : "live";
  });
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.CLOSED) $("run-live").textContent = "reconnecting…";
  });
  // A run whose history expired has no stream events: show its summary.
  api(`/api/runs/${encodeURIComponent(runId)}`).then((data) => {
    if (state.runId === runId && !state.run) {
      state.run = data.run;
      renderRun();
      if (data.run.history_missing) $("run-live").textContent = "history expired: summary only";
    }
  }).catch((e) => notice(e.message, true));
}

function actionButtons(actions, taskId) {
  if (!state.me.operator || !actions.length) return null;
  const box = el("span", { class: "actions" });
  for (const action of actions) {
    const button = el("button", { type: "button", "data-action": action, "data-task": taskId, text: action });
    button.addEventListener("click", (e) => { e.stopPropagation(); e.preventDefault(); openPanel(action, taskId); });
    box.append(button);
  }
  return box;
}

function renderRun() {
  const run = state.run;
  if (!run) return;
  $("run-goal").textContent = run.goal || "(no goal)";
  const badge = $("run-state");
  badge.textContent = run.state;
  badge.className = `state ${run.state}`;
  $("run-age").textContent = run.started ? `started ${age(run.started)}` : "";
  $("run-tokens").textContent = `${run.tokens} tokens`;
  const reason = $("run-reason");
  reason.textContent = run.reason || "";
  reason.hidden = !run.reason;
  $("run-actions").replaceChildren();
  const runButtons = actionButtons(run.actions || [], "");
  if (runButtons) $("run-actions").replaceChildren(...runButtons.childNodes);

  const list = $("tasks");
  const items = run.tasks.map(renderTask);
  list.replaceChildren(...items);
}

function renderTask(task) {
  const summary = el("summary", {},
    el("span", { class: "id", text: task.id }),
    el("span", {}, el("span", { class: `state ${task.state}`, "data-field": "state", text: task.state })),
    el("span", { class: "muted", text: `attempt ${task.attempt}` }),
    el("span", { class: "cap", title: "worker", text: task.worker || task.capability }),
    el("span", { class: "wait", "data-field": "waiting", text: task.waiting ? task.waiting.text : task.note }),
    el("span", { class: "muted", text: span(task.started, task.finished) }),
    el("span", { class: "muted", text: `${task.tokens} tok` }));
  const buttons = actionButtons(task.actions || [], task.id);
  if (buttons) summary.append(buttons);  // in the row, so a person sees what they may do without opening it
  const details = el("details", {}, summary);
  details.open = state.open.has(task.id);
  details.addEventListener("toggle", () => {
    if (details.open) state.open.add(task.id); else state.open.delete(task.id);
  });
  const body = el("div", { class: "body" });
  body.append(el("p", { class: "muted", text: `capability ${task.capability}` +
    (task.depends_on.length ? ` · after ${task.depends_on.join(", ")}` : "") +
    (task.redos ? ` · ${task.redos} redo(s)` : "") }));
  if (task.guard || (task.reason && task.state !== "accepted")) {
    body.append(el("p", { class: "guard", "data-field": "guard",
      text: (task.guard ? `guard ${task.guard}: ` : "") + (task.reason || "") }));
  }
  for (const attempt of task.attempts.slice().reverse()) body.append(renderAttempt(attempt));
  details.append(body);
  return el("li", { class: `task d${Math.min(task.depth, 4)}`, "data-task": task.id, "data-state": task.state },
            details);
}

function renderAttempt(a) {
  const box = el("div", { class: `attempt ${a.outcome.split(",")[0]}`, "data-attempt": a.attempt });
  const head = `attempt ${a.attempt}` + (a.worker ? ` · ${a.worker}` : "") +
    (a.duration_s ? ` · ${a.duration_s.toFixed(2)}s` : "") + (a.tokens ? ` · ${a.tokens} tokens` : "") +
    (a.outcome ? ` · ${a.outcome}` : "");
  box.append(el("h3", { text: head }));
  if (a.output !== null && a.output !== undefined) box.append(el("pre", { class: "output", text: show(a.output) }));
  if (a.error) box.append(el("p", { class: "guard", text: `error: ${a.error}` }));
  for (const v of a.verdicts) {
    const text = `${v.stage} · ${v.verifier}: ${v.passed ? "passed" : "failed"}` +
      (v.feedback ? ` — ${v.feedback}` : "") + (v.corrections.length ? ` (corrections: ${v.corrections.join("; ")})` : "");
    box.append(el("p", { class: `verdict ${v.passed ? "pass" : "fail"}`, text }));
  }
  for (const d of a.decisions) {
    const text = `${d.action} by ${d.by}` + (d.feedback ? `: ${d.feedback}` : "") +
      (d.applied ? "" : ` — refused: ${d.reason}`);
    box.append(el("p", { class: "decision", "data-field": "decision", text }));
  }
  return box;
}

function describe(e) {
  const b = e.body;
  switch (b.kind) {
    case "run_started": return `run started: ${b.goal}`;
    case "dispatched": return `dispatched to ${b.capability}`;
    case "transition": {
      let text = `${b.event}: ${b.from_state} → ${b.to_state}`;
      if (b.verdict) text += ` (${b.verdict.verifier}: ${b.verdict.feedback || (b.verdict.passed ? "passed" : "failed")})`;
      if (b.guard) text += ` [guard ${b.guard}]`;
      if (b.reason) text += ` — ${b.reason}`;
      if (b.error) text += ` — ${b.error}`;
      return text;
    }
    case "verdict": return `verdict ${b.stage} by ${b.verifier}: ${b.passed ? "passed" : "failed"} ${b.feedback}`;
    case "override": return `${b.action}${b.feedback ? `: ${b.feedback}` : ""}`;
    case "override_refused": return `${b.action} refused: ${b.reason}`;
    case "waiting": return b.waiting ? waitingText(b.waiting) : "moving again";
    case "progress": return `progress: ${b.message}`;
    case "run_finished": return `run ${b.state}${b.reason ? `: ${b.reason}` : ""}`;
    default: return b.kind;
  }
}

function waitingText(w) {
  switch (w.for) {
    case "worker": return `waiting for a worker of capability ${w.capability}`;
    case "person": return "waiting for a person to approve";
    case "dependency": return `waiting for ${w.on.join(", ")}`;
    default: return "waiting to retry";
  }
}

function appendHistory(events) {
  const list = $("history");
  for (const e of events) {
    if (e.seq <= state.lastSeq) continue;  // a reconnected stream starts from the beginning again
    state.lastSeq = e.seq;
    const when = new Date(e.time * 1000).toLocaleTimeString();
    list.append(el("li", { "data-seq": e.seq, "data-kind": e.body.kind },
      el("span", { class: "muted", text: `#${e.seq}` }),
      el("span", { class: "muted when", text: when }),
      el("span", { class: "who2 mono", text: (e.task_id ? `${e.task_id}/${e.attempt}` : "run") }),
      el("span", { class: "what", text: `${describe(e)}${e.actor ? `  · ${e.actor}` : ""}` })));
  }
}

// -- acting ---------------------------------------------------------------------------------

const NEEDS_FEEDBACK = { reject: "Feedback for the next attempt (required)", redo: "Feedback for the next attempt",
                         cancel: "Why (recorded as the reason)" };

function openPanel(action, taskId) {
  state.pending = { action, taskId };
  const target = taskId ? `task ${taskId}` : "the whole run";
  $("action-title").textContent = `${action} ${target} as ${state.me.operator}`;
  const label = NEEDS_FEEDBACK[action];
  $("feedback-label").hidden = !label;
  $("feedback").hidden = !label;
  $("feedback-label").textContent = label || "";
  $("feedback").value = "";
  $("action-send").textContent = `Send ${action}`;
  $("action-send").setAttribute("data-send", action);
  $("action-panel").hidden = false;
  (label ? $("feedback") : $("action-send")).focus();
}

function closePanel() {
  state.pending = null;
  $("action-panel").hidden = true;
}

$("action-close").addEventListener("click", closePanel);
$("action-panel").addEventListener("submit", async (e) => {
  e.preventDefault();
  const pending = state.pending;
  if (!pending) return;
  const feedback = $("feedback").value;
  if (pending.action === "reject" && !feedback.trim()) { notice("reject needs feedback", true); return; }
  try {
    await api(`/api/runs/${encodeURIComponent(state.runId)}/actions`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.me.csrf || "" },
      body: JSON.stringify({ action: pending.action, task_id: pending.taskId, feedback }),
    });
    notice(`${pending.action} sent for ${pending.taskId || "the run"}; the history shows when the manager applies it.`);
    closePanel();
  } catch (err) {
    notice(`${pending.action} not sent: ${err.message}`, true);
  }
});

// -- routing --------------------------------------------------------------------------------

function route() {
  if (state.source) { state.source.close(); state.source = null; }
  if (state.listTimer) { clearInterval(state.listTimer); state.listTimer = null; }
  const match = location.hash.match(/^#\/run\/(.+)$/);
  $("runs-view").hidden = Boolean(match);
  $("run-view").hidden = !match;
  if (match) {
    openRun(decodeURIComponent(match[1]));
  } else {
    state.runId = null;
    loadRuns();
    state.listTimer = setInterval(loadRuns, 5000);
  }
}

window.addEventListener("hashchange", () => { notice(""); route(); });
state.clock = setInterval(() => { if (state.run && state.run.state === "running") renderRun(); }, 5000);
loadMe().then(route);
