/**
 * The memory inspector: one static page served at `/` (no build step, no dependency). Chat with a
 * session (streamed) and watch its memory: every retained token coloured by turn, its role shown by
 * its frame, pinned and summary tokens marked, evicted tokens fading out, a bar of retained vs budget,
 * a per-turn chart (prefilled, generated, evicted, latency); pin, unpin and forget turns; start a new
 * session with another policy or budget. Its API calls carry the key the user types when the server
 * asks for one (kept in sessionStorage).
 */

const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

export function memoryPage(modelId: string): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>finite-memory-llm: memory inspector</title>
<style>
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #fafafa; --muted: #6b6b70; --line: #d7d7dc; --accent: #2a62d8; }
@media (prefers-color-scheme: dark) { :root { --fg: #ececf0; --bg: #16161a; --muted: #9b9ba3; --line: #3a3a42; --accent: #7aa2ff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; padding: 8px 16px; border-bottom: 1px solid var(--line); }
header h1 { font-size: 16px; margin: 0; }
header .meta { color: var(--muted); }
main { display: grid; grid-template-columns: minmax(300px, 2fr) 3fr; gap: 12px; padding: 12px 16px; height: calc(100vh - 49px); }
@media (max-width: 800px) { main { grid-template-columns: 1fr; height: auto; } }
section { display: flex; flex-direction: column; min-height: 0; gap: 8px; }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: 4px 0; }
#log { flex: 1; overflow: auto; border: 1px solid var(--line); border-radius: 6px; padding: 8px; min-height: 200px; }
.msg { margin: 0 0 8px; white-space: pre-wrap; }
.msg b { color: var(--muted); font-weight: 600; }
form { display: flex; gap: 6px; }
input, select, button { font: inherit; padding: 6px 8px; border: 1px solid var(--line); border-radius: 5px; background: transparent; color: inherit; }
input[type=text], input[type=password] { flex: 1; min-width: 0; }
button { cursor: pointer; }
button:focus-visible, input:focus-visible, select:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
.row { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
#bar { position: relative; height: 18px; border: 1px solid var(--line); border-radius: 4px; overflow: hidden; }
#bar > div { height: 100%; background: var(--accent); opacity: .55; }
#bar > span { position: absolute; inset: 0; text-align: center; font-size: 12px; line-height: 16px; }
#tokens { flex: 1; overflow: auto; border: 1px solid var(--line); border-radius: 6px; padding: 6px; font: 12px/1.9 ui-monospace, monospace; min-height: 160px; }
.tok { display: inline-block; padding: 1px 1px; border-radius: 3px; border: 1px solid transparent; white-space: pre; transition: opacity 1.2s; }
.tok.user { border-bottom-color: currentColor; }
.tok.system { border-color: var(--muted); }
.tok.pinned { outline: 2px solid #d9a400; outline-offset: -1px; }
.tok.summary { font-style: italic; border: 1px dashed currentColor; }
.tok.reasoning { opacity: .55; font-style: italic; }
.msg .thought { display: block; opacity: .6; font-style: italic; white-space: pre-wrap; }
.tok.evicted { opacity: 0; text-decoration: line-through; }
#turns { max-height: 22vh; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
#turns table { width: 100%; border-collapse: collapse; font-size: 12px; }
#turns td, #turns th { padding: 3px 6px; border-bottom: 1px solid var(--line); text-align: left; }
#chart { width: 100%; height: 90px; border: 1px solid var(--line); border-radius: 6px; }
.legend span { display: inline-block; margin-right: 10px; font-size: 12px; color: var(--muted); }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: -1px; }
#status { color: var(--muted); min-height: 1.4em; }
#evictions { font-size: 12px; color: var(--muted); max-height: 12vh; overflow: auto; margin: 0; padding-left: 18px; }
</style>
</head>
<body>
<header>
  <h1>Memory inspector</h1>
  <span class="meta">model <b>${escapeHtml(modelId)}</b> · session <b id="sid"></b></span>
  <form id="newSession" class="row" aria-label="New session">
    <label>policy <select id="policy" aria-label="policy of a new session">
      <option>sliding</option><option>importance</option><option>semantic</option><option>rolling_summary</option><option>hybrid</option>
    </select></label>
    <label>budget <input id="budget" type="number" min="16" step="16" value="" placeholder="server's" style="width:7em" aria-label="budget of a new session (tokens)"></label>
    <button type="submit">New session</button>
  </form>
  <form id="keyForm" class="row" hidden aria-label="API key">
    <input id="key" type="password" placeholder="API key" aria-label="API key" autocomplete="off">
    <button type="submit">Use key</button>
  </form>
</header>
<main>
  <section aria-label="Chat">
    <h2>Chat</h2>
    <div id="log" aria-live="polite"></div>
    <form id="send">
      <input id="message" type="text" placeholder="Message (Enter sends)" aria-label="message" autocomplete="off">
      <label class="row" style="gap:3px"><input id="pinNew" type="checkbox"> pin</label>
      <button type="submit" id="sendBtn">Send</button>
    </form>
    <div id="status" role="status"></div>
  </section>
  <section aria-label="Memory">
    <h2>Memory <span id="policyName" class="meta"></span></h2>
    <div id="bar" role="meter" aria-label="retained tokens of the budget"><div></div><span></span></div>
    <div id="tokens" aria-label="retained tokens"></div>
    <h2>Turns</h2>
    <div id="turns"><table><thead><tr><th>turn</th><th>tokens</th><th>pinned</th><th></th></tr></thead><tbody></tbody></table></div>
    <h2>Per turn</h2>
    <div class="legend"><span><i style="background:#3b82f6"></i>prefilled</span><span><i style="background:#22c55e"></i>generated</span><span><i style="background:#ef4444"></i>evicted</span><span><i style="background:#a855f7"></i>latency (ms, line)</span></div>
    <svg id="chart" role="img" aria-label="per-turn chart"></svg>
    <h2>Evictions</h2>
    <ol id="evictions"></ol>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const state = { session: sessionStorage.getItem('fml.session') || newId(), key: sessionStorage.getItem('fml.key') || '', own: null, positions: new Map(), turns: [], busy: false };
function newId() { return 's-' + Math.random().toString(36).slice(2, 10); }
function headers(extra) { const h = { ...extra }; if (state.key) h.authorization = 'Bearer ' + state.key; return h; }
function say(text) { $('status').textContent = text; }
function hue(turn) { return (turn * 47) % 360; }
function setSession(id, own) {
  state.session = id; state.own = own; state.positions = new Map(); state.turns = [];
  sessionStorage.setItem('fml.session', id); $('sid').textContent = id; $('log').textContent = ''; $('tokens').textContent = '';
  $('turns').querySelector('tbody').textContent = ''; $('evictions').textContent = ''; drawChart(); drawBar(0, 0);
}
async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(body === undefined ? {} : { 'content-type': 'application/json' }), body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) { $('keyForm').hidden = false; $('key').focus(); throw new Error('This server needs its API key'); }
  const json = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((json.error && json.error.message) || ('HTTP ' + r.status));
  return json;
}
function addMessage(role, text) {
  const p = document.createElement('p'); p.className = 'msg';
  const b = document.createElement('b'); b.textContent = role + ': '; p.append(b, document.createTextNode(text));
  $('log').append(p); $('log').scrollTop = $('log').scrollHeight; return p;
}
function drawBar(retained, budget) {
  const pct = budget ? Math.min(100, (100 * retained) / budget) : 0;
  $('bar').firstElementChild.style.width = pct + '%';
  $('bar').lastElementChild.textContent = budget ? retained + ' / ' + budget + ' tokens' : '';
  $('bar').setAttribute('aria-valuenow', String(retained)); $('bar').setAttribute('aria-valuemax', String(budget));
  $('bar').dataset.retained = String(retained); $('bar').dataset.budget = String(budget);
}
function drawTokens(tokens) {
  const box = $('tokens'); const seen = new Set();
  for (const t of tokens) {
    seen.add(t.position);
    let el = state.positions.get(t.position);
    if (!el) { el = document.createElement('span'); state.positions.set(t.position, el); box.append(el); }
    el.className = 'tok ' + t.role + (t.pinned ? ' pinned' : '') + (t.summary ? ' summary' : '');
    el.textContent = t.text || ' ';
    el.dataset.turn = String(t.turn); el.dataset.position = String(t.position);
    el.style.background = 'hsl(' + hue(t.turn) + ' 70% 55% / .22)';
    el.title = 'turn ' + t.turn + ', ' + t.role + ', position ' + t.position + (t.pinned ? ', pinned' : '');
  }
  for (const [pos, el] of state.positions) {
    if (seen.has(pos) || el.classList.contains('evicted')) continue;
    el.classList.add('evicted');   // fades out, then goes
    setTimeout(() => { el.remove(); state.positions.delete(pos); }, 1300);
  }
  // Keep the document order by position (a summary can take an earlier place).
  [...box.children].sort((a, b) => Number(a.dataset.position) - Number(b.dataset.position)).forEach((el) => box.append(el));
}
function drawTurns(tokens, pins) {
  const counts = new Map();
  for (const t of tokens) if (t.role === 'user' || t.role === 'assistant' || t.role === 'reasoning') counts.set(t.turn, (counts.get(t.turn) || 0) + 1);
  const pinned = new Set(pins.map((p) => p.turn));
  const body = $('turns').querySelector('tbody'); body.textContent = '';
  for (const [turn, n] of [...counts].sort((a, b) => a[0] - b[0])) {
    const tr = document.createElement('tr'); tr.dataset.turn = String(turn);
    tr.innerHTML = '<td></td><td></td><td></td><td class="row"></td>';
    tr.children[0].textContent = String(turn); tr.children[1].textContent = String(n); tr.children[2].textContent = pinned.has(turn) ? 'yes' : '';
    const pin = document.createElement('button'); pin.textContent = pinned.has(turn) ? 'Unpin' : 'Pin';
    pin.setAttribute('aria-label', (pinned.has(turn) ? 'unpin' : 'pin') + ' turn ' + turn);
    pin.onclick = () => change(pinned.has(turn) ? 'DELETE' : 'POST', '/turns/' + turn + '/pin');
    const forget = document.createElement('button'); forget.textContent = 'Forget'; forget.setAttribute('aria-label', 'forget turn ' + turn);
    forget.onclick = () => change('DELETE', '/turns/' + turn);
    tr.children[3].append(pin, forget); body.append(tr);
  }
}
function drawEvictions(evictions) {
  const ol = $('evictions'); ol.textContent = '';
  for (const e of evictions.slice().reverse()) {
    const li = document.createElement('li');
    li.textContent = new Date(e.at).toLocaleTimeString() + ': turn ' + e.turn + ' (' + e.phase + '), ' + e.tokens + ' tokens by ' + (e.fallback ? 'sliding (latency guard)' : e.policy) + (e.summary_tokens ? ', summary of ' + e.summary_tokens + ' tokens' : '');
    ol.append(li);
  }
}
function drawChart() {
  const svg = $('chart'); const w = svg.clientWidth || 600; const h = svg.clientHeight || 90; const rows = state.turns.slice(-40);
  svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h); svg.textContent = '';
  if (!rows.length) return;
  const max = Math.max(1, ...rows.map((r) => Math.max(r.prefilled, r.generated, r.evicted)));
  const maxMs = Math.max(1, ...rows.map((r) => r.latency));
  const slot = w / rows.length; const bw = Math.max(1, slot / 4);
  const ns = 'http://www.w3.org/2000/svg'; let line = '';
  rows.forEach((r, i) => {
    [['prefilled', '#3b82f6'], ['generated', '#22c55e'], ['evicted', '#ef4444']].forEach(([k, color], j) => {
      const rect = document.createElementNS(ns, 'rect'); const v = (r[k] / max) * (h - 6);
      rect.setAttribute('x', String(i * slot + 2 + j * bw)); rect.setAttribute('y', String(h - v)); rect.setAttribute('width', String(bw - 1)); rect.setAttribute('height', String(v)); rect.setAttribute('fill', color);
      const t = document.createElementNS(ns, 'title'); t.textContent = 'turn ' + r.turn + ': ' + k + ' ' + r[k]; rect.append(t); svg.append(rect);
    });
    line += (i ? ' L' : 'M') + (i * slot + slot / 2) + ' ' + (h - (r.latency / maxMs) * (h - 6));
  });
  const path = document.createElementNS(ns, 'path'); path.setAttribute('d', line); path.setAttribute('stroke', '#a855f7'); path.setAttribute('fill', 'none'); path.setAttribute('stroke-width', '2'); svg.append(path);
}
function render(view) {
  $('policyName').textContent = view.policy + ', budget ' + view.budget;
  drawBar(view.retained_tokens, view.budget); drawTokens(view.tokens); drawTurns(view.tokens, view.pins); drawEvictions(view.evictions);
}
async function refresh() {
  try { render(await api('GET', '/v1/sessions/' + encodeURIComponent(state.session) + '/memory')); }
  catch (err) { if (!/No session/.test(err.message)) say(err.message); }
}
async function change(method, path) {
  try { render(await api(method, '/v1/sessions/' + encodeURIComponent(state.session) + path)); say(''); } catch (err) { say(err.message); }
}
async function send(text) {
  if (state.busy || !text) return;
  state.busy = true; $('sendBtn').disabled = true; say('…');
  addMessage('you', text);
  const out = addMessage('assistant', '');
  const fm = {};
  if ($('pinNew').checked) fm.pin = true;
  if (state.own) { fm.chat = state.own; }
  try {
    const r = await fetch('/v1/chat/completions', { method: 'POST', headers: headers({ 'content-type': 'application/json', 'x-session-id': state.session }), body: JSON.stringify({ messages: [{ role: 'user', content: text }], stream: true, max_tokens: 64, finite_memory: fm }) });
    if (r.status === 401) { $('keyForm').hidden = false; $('key').focus(); throw new Error('This server needs its API key'); }
    if (!r.ok) { const j = await r.json().catch(() => ({})); throw new Error((j.error && j.error.message) || ('HTTP ' + r.status)); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = ''; let last = null;
    for (;;) {
      const { done, value } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf('\\n\\n')) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        const d = ev.choices && ev.choices[0] && ev.choices[0].delta;
        if (d && d.content) out.lastChild.textContent += d.content;
        if (d && d.reasoning_content) {
          // A reasoning model's thinking, shown dimmed above its answer.
          let thought = out.querySelector('.thought');
          if (!thought) { thought = document.createElement('span'); thought.className = 'thought'; out.insertBefore(thought, out.lastChild); }
          thought.textContent += d.reasoning_content;
        }
        if (ev.finite_memory) last = ev.finite_memory;
      }
    }
    state.own = null;   // a session's own policy and budget apply at its creation only
    if (last) {
      const t = last.turn;
      state.turns.push({ turn: t.turn, prefilled: t.promptTokens, generated: t.generatedTokens, evicted: t.evictedTokens, latency: Math.round(t.latencyMs) });
      drawChart();
      say('turn ' + t.turn + ': prefilled ' + t.promptTokens + ', generated ' + t.generatedTokens + ', evicted ' + t.evictedTokens + ', ' + Math.round(t.latencyMs) + ' ms');
    }
    $('pinNew').checked = false;
    await refresh();
  } catch (err) { say(err.message); }
  finally { state.busy = false; $('sendBtn').disabled = false; $('message').focus(); }
}
$('send').addEventListener('submit', (e) => { e.preventDefault(); const m = $('message'); const text = m.value.trim(); m.value = ''; send(text); });
$('newSession').addEventListener('submit', (e) => {
  e.preventDefault();
  const own = { policy: $('policy').value };
  const b = Number($('budget').value); if (b) own.max_tokens = b;
  setSession(newId(), own); say('new session: ' + own.policy + (own.max_tokens ? ', budget ' + own.max_tokens : '')); $('message').focus();
});
$('keyForm').addEventListener('submit', (e) => { e.preventDefault(); state.key = $('key').value; sessionStorage.setItem('fml.key', state.key); $('keyForm').hidden = true; refresh(); });
setSession(state.session, null); refresh(); $('message').focus();
window.addEventListener('resize', drawChart);
</script>
</body>
</html>
`;
}
