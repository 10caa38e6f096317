// The demo CNN trained end to end through `starling serve --demo-cnn` by native CPU workers and headless Chromium tabs
// (one on WebGPU/SwiftShader, optionally one on the WASM CPU path), every micro-batch verified by the coordinator as
// in production. Prints the held-out accuracy curve, who contributed what, then one JSON line; exits non-zero when a
// tab contributed no accepted result or an honest result was rejected. `cargo xtask bench cnn-serve` runs it.
//
//   node bench/serve_cnn.mjs [--native 2] [--webgpu-tabs 1] [--cpu-tabs 0] [--starling target/release/starling]
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const argv = process.argv.slice(2);
const flag = (name, dflt) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const NATIVE = Number(flag('native', 2));
const WEBGPU_TABS = Number(flag('webgpu-tabs', 1));
const CPU_TABS = Number(flag('cpu-tabs', 0));
const STARLING = path.resolve(ROOT, flag('starling', 'target/release/starling'));
const LIMIT_S = Number(flag('limit-s', 5400));
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

const dir = mkdtempSync(path.join(tmpdir(), 'starling-cnn-serve-'));
const children = [];
let browsers = [];
async function cleanup() {
  for (const b of browsers) await b.close().catch(() => {});
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
}
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => cleanup().then(() => process.exit(130)));

function startCoordinator() {
  const proc = spawn(STARLING, ['serve', '--addr', '127.0.0.1:0', '--db', path.join(dir, 'cnn.db'), '--demo-cnn', '--www', path.join(ROOT, 'www')],
    { cwd: ROOT, env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' }, stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(proc);
  let log = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`coordinator did not start:\n${log}`)), 120_000);
    proc.stderr.on('data', (chunk) => {
      if (log.length < 100_000) log += chunk.toString();
      // eslint-disable-next-line no-control-regex
      const m = log.replace(/\x1b\[[0-9;]*m/g, '').match(/coordinator listening: volunteer page http:\/\/([^/\s]+)\//);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`coordinator exited (${code}):\n${log}`)); });
  });
}

const t0 = Date.now();
const secs = () => ((Date.now() - t0) / 1000).toFixed(0);
const addr = await startCoordinator();
const url = `http://${addr}`;
const api = async (p) => {
  const res = await fetch(`${url}/api/v1${p}`);
  if (!res.ok) throw new Error(`GET ${p}: HTTP ${res.status}`);
  return res.json();
};
console.log(`# coordinator ${url}: ${NATIVE} native CPU workers, ${WEBGPU_TABS} WebGPU tab(s), ${CPU_TABS} WASM CPU tab(s)`);
for (let i = 0; i < NATIVE; i++) {
  children.push(spawn(STARLING, ['worker', '--coordinator', `ws://${addr}/ws`, '--backend', 'cpu', '--name', `native-${i}`],
    { cwd: ROOT, env: { ...process.env, RUST_LOG: 'warn' }, stdio: 'ignore' }));
}
const tabs = [];
for (const [kind, n] of [['webgpu', WEBGPU_TABS], ['cpu', CPU_TABS]]) {
  for (let i = 0; i < n; i++) {
    const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: kind === 'webgpu' ? ['--enable-unsafe-webgpu', ...CHROMIUM_ARGS] : CHROMIUM_ARGS });
    browsers.push(browser);
    const page = await browser.newPage();
    await page.goto(kind === 'webgpu' ? `${url}/?backend=webgpu` : `${url}/`);
    await page.getByRole('button', { name: 'Start contributing' }).click();
    tabs.push({ kind, page });
  }
}
const view = (page) => page.evaluate(() => JSON.parse(JSON.stringify(window.starlingVolunteer.view)));

let job;
let lastPrinted = -1;
let failure = null;
for (;;) {
  await new Promise((r) => setTimeout(r, 10_000));
  job = await api('/jobs/1');
  if (job.last_eval && job.last_eval.step !== lastPrinted) {
    lastPrinted = job.last_eval.step;
    const tabStats = [];
    for (const t of tabs) {
      const v = await view(t.page).catch(() => null);
      tabStats.push(`${t.kind} ${v?.stats?.accepted ?? '?'} acc${v?.ended ? ` (ended: ${v.ended})` : ''}`);
    }
    console.log(`# ${secs()} s: step ${job.step}/${job.steps}, held-out ${(job.last_eval.accuracy * 100).toFixed(2)}%, best ${(job.best_test_accuracy * 100).toFixed(2)}%, rejected ${job.counters.results_rejected}; tabs: ${tabStats.join(', ')}`);
  }
  if (job.status === 'completed' || job.status === 'cancelled') break;
  if ((Date.now() - t0) / 1000 > LIMIT_S) { failure = `not completed within ${LIMIT_S} s`; break; }
}

// Who contributed what, from the coordinator's records; a tab's worker id comes from its page.
const workers = await api('/workers');
const rows = [];
for (const t of tabs) {
  const v = await view(t.page).catch((e) => ({ stats: {}, device: { backend: `tab lost: ${e.message}` } }));
  const w = workers.find((x) => x.id === v.stats.worker);
  rows.push({ who: `chromium ${t.kind}${t.kind === 'webgpu' ? ` (${v.device.adapter})` : ''}`, backend: v.device.backend, accepted: w?.accepted ?? 0, rejected: w?.rejected ?? 0, late: v.stats.late, ms_per_result: v.stats.results_sent ? v.stats.busy_ms / v.stats.results_sent : null });
}
for (const w of workers.filter((x) => x.name.startsWith('native-'))) rows.push({ who: w.name, backend: 'cpu', accepted: w.accepted, rejected: w.rejected });
// The final evaluation lands just after the last step is applied: wait for it (bounded).
let metrics = await api('/jobs/1/metrics');
for (let i = 0; i < 60 && !metrics.some((m) => m.kind === 'eval' && m.step === job.step); i++) {
  await new Promise((r) => setTimeout(r, 1000));
  metrics = await api('/jobs/1/metrics');
}
const evals = metrics.filter((m) => m.kind === 'eval');
console.log('\n| step | held-out accuracy | held-out loss |\n|---|---|---|');
for (const m of evals) console.log(`| ${m.step} | ${(m.accuracy * 100).toFixed(2)}% | ${m.loss.toFixed(4)} |`);
console.log('\n| worker | backend | accepted | rejected | late | ms per result |\n|---|---|---|---|---|---|');
for (const r of rows) console.log(`| ${r.who} | ${r.backend} | ${r.accepted} | ${r.rejected} | ${r.late ?? '—'} | ${r.ms_per_result ? r.ms_per_result.toFixed(0) : '—'} |`);
const c = job.counters;
const finalAcc = evals.length ? evals[evals.length - 1].accuracy : null;
console.log(`\nstatus ${job.status} at step ${job.step}; final held-out ${(finalAcc * 100).toFixed(2)}%, best ${(job.best_test_accuracy * 100).toFixed(2)}%; ` +
  `results accepted ${c.results_accepted}, rejected ${c.results_rejected}, late ${c.results_late}; coordinator recomputations: ` +
  `${c.spot_checks} spot checks, ${c.arbitrations} arbitrations, ${c.audits} audits; ${secs()} s`);
const tabAccepted = rows.filter((r) => r.who.startsWith('chromium')).reduce((a, r) => a + r.accepted, 0);
const rejected = rows.reduce((a, r) => a + r.rejected, 0);
console.log(JSON.stringify({ bench: 'cnn_serve', status: job.status, steps: job.step, final_accuracy: finalAcc, best_accuracy: job.best_test_accuracy, results_rejected: c.results_rejected, tab_accepted: tabAccepted, workers: rows, wall_s: Number(secs()) }));
await cleanup();
if (!failure && tabs.length && tabAccepted === 0) failure = 'no browser tab contributed an accepted result';
if (!failure && rejected > 0) failure = `${rejected} results of honest workers were rejected`;
if (failure) { console.error(`FAILED: ${failure}`); process.exit(1); }
