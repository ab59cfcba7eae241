"use strict";
// baton's page: plain JavaScript against the public API (no build, no CDN).
const $ = (id) => document.getElementById(id);
const FINAL = ["completed", "failed", "cancelled", "refused"];
const STATUS_TEXT = {
  pending: "Waiting for a worker…", queued: "Queued…", running: "Answering…",
  retrying: "Retrying…", requires_action: "Waiting for your approval of a tool call…",
  completed: "Answered.", failed: "Failed.", cancelled: "Cancelled.",
  refused: "Refused.",
};
const state = {
  token: "", cid: null, es: null, run: null, pendingKey: null, pendingText: null,
  lastEventId: null, attempts: {}, sending: false, ended: {}, deciding: {},
};

function showError(text) { const e = $("error"); e.textContent = text; e.hidden = !text; }
function setStatus(text) { $("status").textContent = text; }

async function api(method, path, body, headers) {
  const h = Object.assign({ Authorization: "Bearer " + state.token }, headers || {});
  if (body !== undefined) h["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (x) {
    throw new Error("the gateway cannot be reached (" + x.message + ")");
  }
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) {
    throw new Error("This token was refused (401 " + ((data.error && data.error.message) || "unauthenticated") +
      "): paste a valid token and press Use token.");
  }
  if (!r.ok) {
    const err = new Error((data.error && data.error.message) || data.detail || ("HTTP " + r.status));
    err.status = r.status; throw err;
  }
  return data;
}

function bubble(id, role, text, kind) {
  let li = document.getElementById("m-" + id);
  if (!li) {
    li = document.createElement("li"); li.id = "m-" + id;
    const who = document.createElement("span"); who.className = "who";
    const body = document.createElement("span"); body.className = "text";
    li.append(who, body); $("messages").appendChild(li);
  }
  li.className = role + (kind === "failure" ? " failure" : "");
  li.dataset.role = role;
  li.querySelector(".who").textContent = role === "user" ? "You" : "baton";
  li.querySelector(".text").textContent = text;
  li.scrollIntoView({ block: "nearest" });
  return li;
}

// A tool call: what it asks (tool, server, arguments), Approve / Deny while it waits, then its
// result. One card per call id, whichever tells of it first (tool.requested, /state, tool.result).
function toolCard(runId, call, from) {
  let li = document.getElementById("t-" + call.tool_call_id);
  if (!li) {
    li = document.createElement("li"); li.id = "t-" + call.tool_call_id;
    li.dataset.from = from; // what told of it first: "state", "tool.requested", "tool.result"
    li.className = "tool"; li.dataset.role = "tool"; li.dataset.run = runId;
    const who = document.createElement("span"); who.className = "who";
    const body = document.createElement("span"); body.className = "text";
    const args = document.createElement("pre"); args.className = "args";
    const actions = document.createElement("div"); actions.className = "actions decide";
    const outcome = document.createElement("p"); outcome.className = "outcome";
    const result = document.createElement("pre"); result.className = "result"; result.hidden = true;
    li.append(who, body, args, actions, outcome, result);
    const run = document.getElementById("m-run-" + runId);
    // Before the streamed answer of its run when that bubble already exists, else at the end.
    if (run) $("messages").insertBefore(li, run); else $("messages").appendChild(li);
  }
  li.dataset.call = call.tool_call_id;
  li.querySelector(".who").textContent = "Tool call";
  if (call.server) li.dataset.server = call.server; // tool.result does not carry it
  const server = li.dataset.server ? " on " + li.dataset.server : "";
  li.querySelector(".text").textContent = (call.tool || "tool") + server;
  if (call.arguments !== undefined) {
    li.querySelector(".args").textContent = JSON.stringify(call.arguments, null, 2);
    li.setAttribute("aria-label", "Tool call " + (call.tool || "") + server);
  }
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function askApproval(runId, call, from) {
  const li = toolCard(runId, call, from);
  if (li.dataset.state) return li; // already decided or answered: never asked again
  li.dataset.state = "pending"; li.dataset.digest = call.input_digest || "";
  const actions = li.querySelector(".decide"); actions.textContent = "";
  for (const [label, approve] of [["Approve", true], ["Deny", false]]) {
    const b = document.createElement("button"); b.type = "button"; b.textContent = label;
    b.className = approve ? "approve" : "deny";
    b.setAttribute("aria-label", label + " tool call " + call.tool + (call.server ? " on " + call.server : ""));
    b.onclick = () => decide(runId, call, approve, li);
    actions.appendChild(b);
  }
  // Announced by the list's aria-live; focus stays where the user is (never on Approve unasked).
  li.querySelector(".outcome").textContent = "baton asks before running this tool.";
  return li;
}

async function decide(runId, call, approve, li) {
  // One decision per call, whatever the clicks: the buttons go before the request leaves.
  if (state.deciding[call.tool_call_id] || li.dataset.state !== "pending") return;
  state.deciding[call.tool_call_id] = true; li.dataset.state = "deciding";
  for (const b of li.querySelectorAll(".decide button")) b.disabled = true;
  li.querySelector(".outcome").textContent = approve ? "Approving…" : "Denying…";
  try {
    const decision = { tool_call_id: call.tool_call_id, approve };
    if (li.dataset.digest) decision.input_digest = li.dataset.digest; // what was shown
    await api("POST", "/api/conversations/" + state.cid + "/runs/" + runId + "/tool-approvals",
      { decisions: [decision] });
    if (li.dataset.state === "answered") return; // the result was quicker than the answer
    li.dataset.state = approve ? "approved" : "denied";
    li.querySelector(".decide").textContent = "";
    li.querySelector(".outcome").textContent = approve ? "Approved: running the tool…" : "Denied: the model is told so.";
    setStatus(approve ? "Running the tool…" : "Answering…");
  } catch (x) {
    if (li.dataset.state === "answered") return;
    showError("Not " + (approve ? "approved" : "denied") + ": " + x.message);
    if (x.status === 409) {
      // Decided elsewhere, expired, the run moved on, or other arguments than the ones shown:
      // not from this card again; a reload shows the call as it stands (/state).
      li.dataset.state = "closed"; li.querySelector(".decide").textContent = "";
      li.querySelector(".outcome").textContent = "Not decided: " + x.message +
        ". Reload the conversation to see where the call stands.";
      return;
    }
    state.deciding[call.tool_call_id] = false; li.dataset.state = "pending";
    for (const b of li.querySelectorAll(".decide button")) b.disabled = false;
    li.querySelector(".outcome").textContent = "baton asks before running this tool.";
  }
}

function showResult(d) {
  const li = toolCard(d.run_id, d, "tool.result");
  li.dataset.state = "answered"; li.dataset.outcome = d.outcome;
  li.querySelector(".decide").textContent = "";
  li.querySelector(".outcome").textContent = "Result (" + d.outcome + (d.is_error ? ", error" : "") + "):";
  const result = li.querySelector(".result"); result.hidden = false;
  result.textContent = d.content;
  li.classList.toggle("failure", !!d.is_error);
}

async function showPending(cid) {
  // A reload while a call waits: /state lists it again, with the digest to answer with.
  const s = await api("GET", "/api/conversations/" + cid + "/state");
  if (cid !== state.cid) return;
  for (const run of s.runs || []) {
    if (!(run.pending_tool_calls || []).length) continue;
    state.run = run.run_id; $("cancel").disabled = false;
    setStatus(STATUS_TEXT.requires_action);
    for (const call of run.pending_tool_calls) askApproval(run.run_id, call, "state");
  }
}

async function loadConversations() {
  const data = await api("GET", "/api/conversations");
  const ul = $("conversations"); ul.textContent = "";
  for (const c of data.conversations) {
    const li = document.createElement("li"); const b = document.createElement("button");
    b.type = "button"; b.textContent = c.title || ("Conversation " + c.id.slice(0, 8));
    b.onclick = () => open(c.id).catch((x) => showError(x.message));
    if (c.id === state.cid) b.setAttribute("aria-current", "true");
    li.appendChild(b); ul.appendChild(li);
  }
}

function setHash() {
  const parts = [];
  if (/token=/.test(location.hash)) parts.push("token=" + encodeURIComponent(state.token));
  if (state.cid) parts.push("c=" + state.cid);
  history.replaceState(null, "", "#" + parts.join("&"));
}

async function open(cid) {
  state.cid = cid; state.run = null; state.attempts = {}; state.deciding = {}; setHash();
  $("messages").textContent = ""; setStatus(""); $("cancel").disabled = true;
  const page = await api("GET", "/api/conversations/" + cid + "/messages");
  for (const msg of page.messages) bubble(msg.id, msg.role, msg.content, msg.kind);
  // Everything after the last message shown: a reply that streamed or finished between the
  // read and the stream's opening is replayed, never lost ("all" when nothing is shown yet).
  const last = page.messages[page.messages.length - 1];
  state.lastEventId = last ? "msg:" + last.id : "all";
  await showPending(cid);
  await stream();
}

async function stream() {
  if (state.es) { state.es.close(); state.es = null; }
  const cid = state.cid;
  const t = await api("POST", "/api/conversations/" + cid + "/stream-token");
  if (cid !== state.cid) return;
  let url = "/api/conversations/" + cid + "/events?access_token=" + encodeURIComponent(t.token);
  // A new EventSource (after the old one was closed: a refused reconnect, an expired token)
  // resumes where the last one stopped; the browser's own reconnects send Last-Event-ID.
  if (state.lastEventId) url += "&last_event_id=" + encodeURIComponent(state.lastEventId);
  const es = new EventSource(url);
  state.es = es;
  const seen = (e) => { if (e.lastEventId) state.lastEventId = e.lastEventId; };
  es.addEventListener("message.created", (e) => {
    seen(e); const d = JSON.parse(e.data); bubble(d.id, "user", d.content);
  });
  es.addEventListener("token", (e) => {
    seen(e); const d = JSON.parse(e.data);
    const run = state.attempts[d.run_id];
    if (!run || d.attempt > run.attempt) state.attempts[d.run_id] = { attempt: d.attempt, parts: [] };
    const cur = state.attempts[d.run_id];
    if (d.attempt < cur.attempt) return; // a late token of an attempt already replaced
    cur.parts[d.seq] = d.text;
    bubble("run-" + d.run_id, "assistant", cur.parts.join(""));
  });
  es.addEventListener("tool.requested", (e) => {
    seen(e); const d = JSON.parse(e.data); askApproval(d.run_id, d, "tool.requested");
  });
  es.addEventListener("tool.result", (e) => { seen(e); showResult(JSON.parse(e.data)); });
  es.addEventListener("run.status", (e) => {
    seen(e); const d = JSON.parse(e.data); state.run = d.run_id;
    if (FINAL.includes(d.status)) state.ended[d.run_id] = true;
    const cur = state.attempts[d.run_id];
    if (d.status === "running" && cur && d.attempt > cur.attempt) {
      // A retry starts over: the partial text of the attempt before goes.
      state.attempts[d.run_id] = { attempt: d.attempt, parts: [] };
      bubble("run-" + d.run_id, "assistant", "");
    }
    setStatus((STATUS_TEXT[d.status] || d.status) + (d.reason ? " (" + d.reason + ")" : ""));
    $("cancel").disabled = FINAL.includes(d.status);
  });
  const done = (e) => {
    seen(e); const d = JSON.parse(e.data); state.ended[d.run_id] = true;
    const old = document.getElementById("m-run-" + d.run_id);
    const streamed = old ? old.querySelector(".text").textContent : "";
    if (old) old.remove();
    // What streamed before the stored text replaced it (the browser tests compare the two).
    bubble(d.id, "assistant", d.content, d.kind).dataset.streamed = streamed;
    setStatus(STATUS_TEXT[d.status] || (d.kind === "failure" ? "Failed." : "Answered."));
    $("cancel").disabled = true;
  };
  es.addEventListener("message.completed", done);
  es.addEventListener("run.failed", done);
  es.onopen = () => { if (/cannot be reached|Reconnecting/.test($("error").textContent)) showError(""); };
  es.onerror = () => {
    if (state.es !== es) return;
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up (the gateway refused the reconnect): a fresh token, same position.
      setTimeout(() => { if (state.es === es) stream().catch((x) => showError("Reconnecting: " + x.message)); }, 1000);
    }
  };
}

async function send(ev) {
  if (ev) ev.preventDefault();
  const text = $("content").value.trim();
  if (!text || state.sending) return;
  if (!state.token) { showError("Paste a token and press Use token first."); return; }
  // The same text after a failure reuses its key: a resend is the same message.
  if (state.pendingText !== text) { state.pendingKey = crypto.randomUUID(); state.pendingText = text; }
  state.sending = true; $("send").disabled = true; showError("");
  try {
    const body = { content: text }; if (state.cid) body.conversation_id = state.cid;
    const r = await api("POST", "/api/chat", body, { "Idempotency-Key": state.pendingKey });
    state.pendingKey = null; state.pendingText = null; $("content").value = "";
    state.run = "run-" + r.message.id; $("cancel").disabled = false;
    if (state.cid !== r.message.conversation_id) {
      await open(r.message.conversation_id); loadConversations().catch(() => {});
    } else {
      bubble(r.message.id, "user", r.message.content);
    }
    setStatus(STATUS_TEXT.pending);
  } catch (x) { showError("Not sent: " + x.message + " (Send again resends the same message.)"); }
  finally { state.sending = false; $("send").disabled = false; $("content").focus(); }
}

async function login(token) {
  state.token = token.trim(); showError("");
  if (!state.token) { showError("Paste a token first."); return; }
  try {
    await loadConversations();
    sessionStorage.setItem("baton-token", state.token);
    $("who").textContent = "Signed in.";
    const m = /c=([0-9a-f-]+)/.exec(location.hash);
    if (m) await open(m[1]);
  } catch (x) { sessionStorage.removeItem("baton-token"); $("who").textContent = ""; showError(x.message); }
}

$("login").onsubmit = (e) => { e.preventDefault(); login($("token").value); };
$("compose").onsubmit = send;
$("content").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
});
$("new").onclick = () => {
  state.cid = null; state.run = null; if (state.es) { state.es.close(); state.es = null; }
  $("messages").textContent = ""; setStatus(""); $("cancel").disabled = true; setHash(); $("content").focus();
};
$("cancel").onclick = async () => {
  const run = state.run;
  if (!run || !state.cid) return;
  try {
    await api("POST", "/api/conversations/" + state.cid + "/runs/" + run + "/cancel");
    if (!state.ended[run]) setStatus("Cancelling…"); // unless its end was already streamed
  }
  catch (x) { showError("Not cancelled: " + x.message); }
};
const fromHash = /token=([^&]+)/.exec(location.hash);
const saved = fromHash ? decodeURIComponent(fromHash[1]) : sessionStorage.getItem("baton-token");
if (saved) { $("token").value = saved; login(saved); }
