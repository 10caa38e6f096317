// Owner dashboard logic: token sign-in, job list, live updates over SSE (no polling), charts (uPlot), control, and
// for a language model a text sample after each evaluation (GET /jobs/{id}/sample, generated on the coordinator's CPU).
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem('starling-token') || '';
let source = null;          // the EventSource of the selected job
let charts = null;          // { loss, acc, data }
let leadersFetched = 0;     // last leaderboard refresh (ms), to refresh at most every 2 s on pushed events
let sampled = null;         // `${job}:${eval step}` of the shown sample, so each evaluation brings one fresh sample

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${token}` } });
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try { message = (await res.json()).error.message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  return res;
}

async function signIn(candidate) {
  token = candidate.trim();
  try {
    const me = await (await api('/api/v1/me')).json();
    sessionStorage.setItem('starling-token', token);
    $('who').textContent = `signed in as ${me.name}`;
    $('signin').hidden = true;
    $('jobs-card').hidden = false;
    $('signin-error').textContent = '';
    await listJobs();
  } catch (e) {
    sessionStorage.removeItem('starling-token');
    $('signin-error').textContent = `Sign-in failed: ${e.message}`;
  }
}

async function listJobs() {
  const jobs = await (await api('/api/v1/jobs')).json();
  const wanted = Number(new URLSearchParams(location.hash.slice(1)).get('job')) || (jobs[0] && jobs[0].id);
  $('jobs').replaceChildren(...jobs.map((j) => {
    const b = document.createElement('button');
    b.textContent = `#${j.id} ${j.name} · ${j.status}`;
    b.dataset.job = j.id;
    b.onclick = () => { location.hash = `job=${j.id}`; select(j.id); };
    return b;
  }));
  if (!jobs.length) $('jobs').textContent = 'No jobs yet: submit one with `starling job submit job.toml`.';
  if (wanted) select(wanted);
}

function makeCharts() {
  const width = Math.max(320, $('loss-chart').clientWidth || 480);
  const axes = [{}, { size: 60 }];
  const data = { steps: [], trainLoss: [], testLoss: [], trainAcc: [], testAcc: [] };
  const loss = new uPlot({ width, height: 240, scales: { x: { time: false } }, axes,
    series: [{ label: 'step' }, { label: 'train', stroke: '#3b5bdb', spanGaps: true }, { label: 'test', stroke: '#e8590c', spanGaps: true, points: { show: true } }] },
    [[], [], []], $('loss-chart'));
  const acc = new uPlot({ width, height: 240, scales: { x: { time: false }, y: { range: [0, 1] } }, axes,
    series: [{ label: 'step' }, { label: 'train', stroke: '#3b5bdb', spanGaps: true }, { label: 'test', stroke: '#e8590c', spanGaps: true, points: { show: true } }] },
    [[], [], []], $('acc-chart'));
  return { loss, acc, data };
}

function addPoint(m) {
  const d = charts.data;
  let i = d.steps.indexOf(m.step);
  if (i < 0) {
    i = d.steps.length;
    d.steps.push(m.step); d.trainLoss.push(null); d.testLoss.push(null); d.trainAcc.push(null); d.testAcc.push(null);
  }
  if (m.kind === 'train') { d.trainLoss[i] = m.loss; d.trainAcc[i] = m.accuracy; } else { d.testLoss[i] = m.loss; d.testAcc[i] = m.accuracy; }
}

function redraw() {
  const d = charts.data;
  charts.loss.setData([d.steps, d.trainLoss, d.testLoss]);
  charts.acc.setData([d.steps, d.trainAcc, d.testAcc]);
}

async function select(id) {
  for (const b of $('jobs').querySelectorAll('button')) b.classList.toggle('sel', Number(b.dataset.job) === id);
  if (source) source.close();
  $('job').hidden = $('charts').hidden = $('tables').hidden = false;
  $('loss-chart').replaceChildren(); $('acc-chart').replaceChildren();
  charts = makeCharts();
  try {
    for (const m of await (await api(`/api/v1/jobs/${id}/metrics`)).json()) addPoint(m);
    redraw();
  } catch (e) { $('job-error').textContent = e.message; }
  // EventSource cannot send headers, so the token rides in the query string of this one same-origin request.
  source = new EventSource(`/api/v1/jobs/${id}/events?token=${encodeURIComponent(token)}`);
  source.addEventListener('job', (ev) => render(JSON.parse(ev.data)));
  source.onerror = () => { $('job-error').textContent = 'live updates interrupted; reconnecting…'; };
  source.onopen = () => { $('job-error').textContent = ''; };
}

function render(job) {
  $('job-title').textContent = `#${job.id} ${job.name}`;
  $('job-status').textContent = job.status;
  $('s-step').textContent = `${job.step} / ${job.steps}`;
  $('s-loss').textContent = job.last_train ? job.last_train.loss.toFixed(4) : '—';
  const pct = (v) => (v == null ? '—' : `${(100 * v).toFixed(2)}%`);
  $('s-acc').textContent = `${pct(job.last_eval && job.last_eval.accuracy)} (${pct(job.best_test_accuracy)})`;
  // A language model's held-out metric is its loss in nats per token (per character for a char-level vocabulary).
  $('s-acc-label').textContent = job.language_model ? 'held-out nats/char (next-char accuracy)' : 'test accuracy (best)';
  if (job.language_model) $('s-acc').textContent = job.last_eval ? `${job.last_eval.loss.toFixed(3)} (${pct(job.last_eval.accuracy)})` : '—';
  $('s-rate').textContent = job.step_ms > 0 && job.status === 'running' ? (1000 / job.step_ms).toFixed(1) : '—';
  const c = job.counters;
  $('s-acc-n').textContent = c.results_accepted;
  $('s-dis').textContent = c.disagreements;
  $('s-rej').textContent = c.results_rejected;
  $('s-leases').textContent = `${c.leases_issued} (${c.leases_expired})`;
  const terminal = job.status === 'completed' || job.status === 'cancelled';
  $('pause').disabled = job.status !== 'running';
  $('resume').disabled = job.status !== 'paused';
  $('cancel').disabled = terminal;
  if (job.last_train) addPoint(job.last_train);
  if (job.last_eval) addPoint(job.last_eval);
  redraw();
  $('sample-card').hidden = !job.language_model;
  const evalStep = job.last_eval ? job.last_eval.step : 0;
  if (job.language_model && sampled !== `${job.id}:${evalStep}`) {
    sampled = `${job.id}:${evalStep}`;
    sample(job.id);
  }
  $('workers').replaceChildren(...job.workers.map((w) => row([w.name || `#${w.worker}`, pill(w.backend, w.backend), w.adapter, w.platform])));
  if (Date.now() - leadersFetched > 2000) refreshLeaders();
}

function pill(text, cls) { const s = document.createElement('span'); s.className = `pill ${cls || ''}`; s.textContent = text; return s; }
function row(cells) {
  const tr = document.createElement('tr');
  for (const c of cells) { const td = document.createElement('td'); if (c instanceof Node) td.append(c); else td.textContent = c; tr.append(td); }
  return tr;
}

async function sample(id) {
  const prompt = $('sample-prompt').value;
  try {
    const s = await (await api(`/api/v1/jobs/${id}/sample?tokens=200&temperature=0.8&prompt=${encodeURIComponent(prompt)}`)).json();
    $('sample-text').textContent = s.prompt + (s.text ?? `(ids) ${s.ids.join(' ')}`);
    $('sample-meta').textContent = `step ${s.step} · temperature ${s.temperature}`;
  } catch (e) { $('sample-text').textContent = `sampling failed: ${e.message}`; }
}

async function refreshLeaders() {
  leadersFetched = Date.now();
  const workers = await (await fetch('/api/v1/workers')).json();
  $('leaders').replaceChildren(...workers.slice(0, 20).map((w) => row([w.name || `#${w.id}`, w.credits.toFixed(3), w.accepted, w.rejected, w.refused ? pill('refused', 'refused') : (w.connected ? pill('online') : '')])));
}

async function control(action) {
  const id = Number(new URLSearchParams(location.hash.slice(1)).get('job')) || Number($('jobs').querySelector('.sel')?.dataset.job);
  try { render(await (await api(`/api/v1/jobs/${id}/${action}`, { method: 'POST' })).json()); $('job-error').textContent = ''; }
  catch (e) { $('job-error').textContent = `${action} failed: ${e.message}`; }
}

async function download(which) {
  const id = Number($('jobs').querySelector('.sel')?.dataset.job);
  try {
    const res = await api(`/api/v1/jobs/${id}/checkpoint?which=${which}`);
    const name = (res.headers.get('content-disposition') || '').match(/filename="([^"]+)"/)?.[1] || `job${id}-${which}.safetensors`;
    const a = Object.assign(document.createElement('a'), { href: URL.createObjectURL(await res.blob()), download: name });
    a.click();
    URL.revokeObjectURL(a.href);
  } catch (e) { $('job-error').textContent = `download failed: ${e.message}`; }
}

$('signin-form').onsubmit = (e) => { e.preventDefault(); signIn($('token').value); };
$('signout').onclick = () => { sessionStorage.removeItem('starling-token'); if (source) source.close(); location.reload(); };
$('pause').onclick = () => control('pause');
$('resume').onclick = () => control('resume');
$('cancel').onclick = () => { if (confirm('Cancel this job for good?')) control('cancel'); };
$('dl-latest').onclick = () => download('latest');
$('dl-best').onclick = () => download('best');
$('sample-go').onclick = () => { const id = Number($('jobs').querySelector('.sel')?.dataset.job); if (id) sample(id); };
if (token) signIn(token);
