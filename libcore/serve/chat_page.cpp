// The chat page tm-serve serves at "/": one self-contained HTML document (no
// external resources), talking to /v1/chat/completions with streaming.
#include "tm/serve.hpp"

namespace tmc {

const std::string& chat_page_html() {
    static const std::string page = R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tm chat</title>
<style>
  :root { --bg:#f6f7f9; --fg:#1d2127; --muted:#6b7280; --card:#fff; --line:#dfe3e8; --accent:#2563eb; --user:#e8f0fe; }
  @media (prefers-color-scheme: dark) {
    :root { --bg:#15171b; --fg:#e6e8eb; --muted:#9aa1ab; --card:#1e2126; --line:#30343b; --accent:#5b8def; --user:#23324d; }
  }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.5 system-ui, sans-serif; background:var(--bg); color:var(--fg);
         display:grid; grid-template-columns: 280px 1fr; height:100vh; }
  aside { border-right:1px solid var(--line); padding:16px; overflow:auto; background:var(--card); }
  aside h1 { font-size:18px; margin:0 0 4px; }
  aside .model { color:var(--muted); font-size:13px; margin-bottom:16px; word-break:break-all; }
  label { display:block; font-size:13px; color:var(--muted); margin:12px 0 4px; }
  textarea, input { width:100%; font:inherit; color:inherit; background:var(--bg); border:1px solid var(--line);
                    border-radius:6px; padding:6px 8px; }
  input[type=range] { padding:0; }
  main { display:flex; flex-direction:column; height:100vh; min-width:0; }
  #log { flex:1; overflow:auto; padding:20px; }
  .msg { max-width:820px; margin:0 auto 14px; padding:10px 14px; border-radius:10px; background:var(--card);
         border:1px solid var(--line); position:relative; white-space:pre-wrap; word-wrap:break-word; }
  .msg.user { background:var(--user); }
  .msg .who { font-size:12px; color:var(--muted); margin-bottom:2px; }
  .msg .copy { position:absolute; top:6px; right:8px; font-size:12px; border:0; background:none; color:var(--muted); cursor:pointer; }
  .msg .stats { font-size:12px; color:var(--muted); margin-top:6px; }
  .msg.error { border-color:#dc2626; color:#dc2626; }
  form { display:flex; gap:8px; padding:12px 20px; border-top:1px solid var(--line); background:var(--card); }
  form textarea { flex:1; resize:none; height:64px; }
  button { font:inherit; border-radius:6px; border:1px solid var(--line); background:var(--card); color:var(--fg);
           padding:6px 14px; cursor:pointer; }
  button.primary { background:var(--accent); color:#fff; border-color:var(--accent); }
  button:disabled { opacity:.5; cursor:default; }
  .row { display:flex; gap:8px; margin-top:16px; }
</style>
</head>
<body>
<aside>
  <h1>tm chat</h1>
  <div class="model" id="model">connecting…</div>
  <label for="system">System prompt</label>
  <textarea id="system" rows="4" placeholder="(none)"></textarea>
  <label for="temperature">Temperature <span id="tv">0.7</span></label>
  <input id="temperature" type="range" min="0" max="2" step="0.05" value="0.7">
  <label for="top_p">Top-p <span id="pv">1</span></label>
  <input id="top_p" type="range" min="0.05" max="1" step="0.05" value="1">
  <label for="max_tokens">Max tokens</label>
  <input id="max_tokens" type="number" min="1" value="512">
  <label for="key">API key (if the server needs one)</label>
  <input id="key" type="password" autocomplete="off">
  <div class="row"><button id="clear" type="button">New chat</button></div>
</aside>
<main>
  <div id="log"></div>
  <form id="form">
    <textarea id="input" placeholder="Send a message (Enter to send, Shift+Enter for a new line)"></textarea>
    <button id="send" class="primary" type="submit">Send</button>
    <button id="stop" type="button" disabled>Stop</button>
  </form>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let history = [], controller = null, model = "";
const key = $("key");
key.value = localStorage.getItem("tm-key") || "";
key.onchange = () => localStorage.setItem("tm-key", key.value);
$("temperature").oninput = (e) => $("tv").textContent = e.target.value;
$("top_p").oninput = (e) => $("pv").textContent = e.target.value;
function headers() {
  const h = {"Content-Type": "application/json"};
  if (key.value) h["Authorization"] = "Bearer " + key.value;
  return h;
}
async function loadModel() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
    model = j.data[0].id;
    $("model").textContent = model + " · context " + j.data[0].max_model_len + " tokens";
  } catch (e) { $("model").textContent = "models: " + e.message; }
}
function bubble(role, text) {
  const d = document.createElement("div");
  d.className = "msg " + role;
  const who = document.createElement("div"); who.className = "who"; who.textContent = role;
  const body = document.createElement("div"); body.className = "body"; body.textContent = text;
  const copy = document.createElement("button"); copy.className = "copy"; copy.type = "button"; copy.textContent = "copy";
  copy.onclick = () => { navigator.clipboard && navigator.clipboard.writeText(body.textContent); copy.textContent = "copied"; setTimeout(() => copy.textContent = "copy", 1200); };
  d.append(who, body, copy);
  $("log").append(d);
  $("log").scrollTop = $("log").scrollHeight;
  return d;
}
function busy(b) { $("send").disabled = b; $("stop").disabled = !b; }
async function send(text) {
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  const body = out.querySelector(".body");
  const messages = [];
  if ($("system").value.trim()) messages.push({role: "system", content: $("system").value});
  messages.push(...history);
  controller = new AbortController();
  busy(true);
  const t0 = performance.now();
  let answer = "", usage = null, finish = "";
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model, messages, stream: true, stream_options: {include_usage: true},
        temperature: +$("temperature").value, top_p: +$("top_p").value, max_tokens: +$("max_tokens").value || 512})});
    if (!r.ok) { const j = await r.json(); throw new Error(j.error ? j.error.message : r.statusText); }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!ev.startsWith("data: ")) continue;
        const data = ev.slice(6);
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        if (j.usage) usage = j.usage;
        if (j.choices && j.choices.length) {
          const c = j.choices[0];
          if (c.delta && c.delta.content) { answer += c.delta.content; body.textContent = answer; $("log").scrollTop = $("log").scrollHeight; }
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { out.classList.add("error"); body.textContent = answer + (answer ? "\n" : "") + "error: " + e.message; }
  }
  history.push({role: "assistant", content: answer});
  const s = document.createElement("div"); s.className = "stats";
  const secs = (performance.now() - t0) / 1000;
  s.textContent = (finish || "done") + (usage ? " · " + usage.completion_tokens + " tokens · " + (usage.completion_tokens / secs).toFixed(1) + " tok/s" : "");
  out.append(s);
  controller = null;
  busy(false);
}
$("form").onsubmit = (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
};
$("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); } };
$("stop").onclick = () => controller && controller.abort();
$("clear").onclick = () => { if (controller) controller.abort(); history = []; $("log").innerHTML = ""; };
loadModel();
</script>
</body>
</html>
)HTML";
    return page;
}

}  // namespace tmc
