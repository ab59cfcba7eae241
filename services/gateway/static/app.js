"use strict";
// baton's page: plain JavaScript against the public API (no build, no CDN).
const $ = (id) => document.getElementById(id);
const state = { token: "", cid: null, es: null, run: null, pendingKey: null, pendingText: null };

function showError(text) { const e = $("error"); e.textContent = text; e.hidden = !text; }

async function api(method, path, body, headers) {
  const h = Object.assign({ Authorization: "Bearer " + state.token }, headers || {});
  if (body !== undefined) h["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) throw new Error("The token was refused (401): paste a valid token.");
  if (!r.ok) throw new Error((data.error && data.error.message) || data.detail || ("HTTP " + r.status));
  return data;
}

function bubble(id, role, text, kind) {
  let li = document.getElementById("m-" + id);
  if (!li) { li = document.createElement("li"); li.id = "m-" + id; $("messages").appendChild(li); }
  li.className = role + (kind === "failure" ? " failure" : "");
  li.dataset.role = role;
  li.textContent = text;
  return li;
}

async function loadConversations() {
  const data = await api("GET", "/api/conversations");
  const ul = $("conversations"); ul.textContent = "";
  for (const c of data.conversations) {
    const li = document.createElement("li"); const b = document.createElement("button");
    b.type = "button"; b.textContent = c.title || c.id; b.onclick = () => open(c.id);
    li.appendChild(b); ul.appendChild(li);
  }
}

async function open(cid) {
  state.cid = cid; location.hash = location.hash.replace(/&?c=[^&]*/, "") + "&c=" + cid;
  $("messages").textContent = "";
  const page = await api("GET", "/api/conversations/" + cid + "/messages");
  for (const msg of page.messages) bubble(msg.id, msg.role, msg.content, msg.kind);
  await stream();
}

async function stream() {
  if (state.es) state.es.close();
  const t = await api("POST", "/api/conversations/" + state.cid + "/stream-token");
  const es = new EventSource("/api/conversations/" + state.cid + "/events?access_token=" + encodeURIComponent(t.token));
  state.es = es;
  const live = {};
  es.addEventListener("message.created", (e) => { const d = JSON.parse(e.data); bubble(d.id, "user", d.content); });
  es.addEventListener("token", (e) => {
    const d = JSON.parse(e.data); const k = d.run_id + ":" + d.attempt;
    if (!live[k]) live[k] = []; live[k][d.seq] = d.text;
    bubble("run-" + d.run_id, "assistant", live[k].join(""));
  });
  es.addEventListener("run.status", (e) => {
    const d = JSON.parse(e.data); state.run = d.run_id;
    $("status").textContent = "Run " + d.status + (d.reason ? ": " + d.reason : "");
    $("cancel").disabled = ["completed", "failed", "cancelled", "refused"].includes(d.status);
  });
  const done = (e) => {
    const d = JSON.parse(e.data);
    const old = document.getElementById("m-run-" + d.run_id); if (old) old.remove();
    bubble(d.id, "assistant", d.content, d.kind);
    $("status").textContent = "Run " + (d.status || "completed"); $("cancel").disabled = true;
  };
  es.addEventListener("message.completed", done);
  es.addEventListener("run.failed", done);
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) stream().catch((x) => showError(x.message)); };
}

async function send(ev) {
  ev.preventDefault();
  const text = $("content").value.trim();
  if (!text || $("send").disabled) return;
  // The same text after a failure reuses its key: a resend is the same message.
  if (state.pendingText !== text) { state.pendingKey = crypto.randomUUID(); state.pendingText = text; }
  $("send").disabled = true; showError("");
  try {
    const body = { content: text }; if (state.cid) body.conversation_id = state.cid;
    const r = await api("POST", "/api/chat", body, { "Idempotency-Key": state.pendingKey });
    state.pendingKey = null; state.pendingText = null; $("content").value = "";
    bubble(r.message.id, "user", r.message.content);
    if (state.cid !== r.message.conversation_id) { await open(r.message.conversation_id); loadConversations().catch(() => {}); }
  } catch (x) { showError("Not sent: " + x.message + " (Send again resends the same message.)"); }
  finally { $("send").disabled = false; }
}

async function login(token) {
  state.token = token.trim(); showError("");
  try { await loadConversations(); const m = /c=([0-9a-f-]+)/.exec(location.hash); if (m) await open(m[1]); }
  catch (x) { showError(x.message); }
}

$("login").onsubmit = (e) => { e.preventDefault(); login($("token").value); };
$("compose").onsubmit = send;
$("content").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { send(e); } });
$("new").onclick = () => { state.cid = null; if (state.es) state.es.close(); $("messages").textContent = ""; $("status").textContent = ""; };
$("cancel").onclick = async () => {
  if (!state.run) return;
  try { await api("POST", "/api/conversations/" + state.cid + "/runs/" + state.run + "/cancel"); }
  catch (x) { showError(x.message); }
};
const fromHash = /token=([^&]+)/.exec(location.hash);
if (fromHash) { $("token").value = decodeURIComponent(fromHash[1]); login($("token").value); }
