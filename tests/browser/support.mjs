// Shared fixtures of the browser tests: a real `starling serve` on 127.0.0.1:0 (fresh database, demo job), native
// partner workers, real headless Chromium (playwright-core on /usr/bin/chromium) and small partner web servers.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const STARLING = path.join(ROOT, 'target/debug/starling');
export const SCREENSHOTS = path.join(ROOT, 'docs/screenshots');

const CHROMIUM_ARGS = ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

/** Polls `probe` until it returns a truthy value; fails with `what` after `timeoutMs`. */
export async function waitFor(probe, { timeoutMs = 60_000, interval = 250, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await probe();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** Starts `starling serve --demo` on a free port; resolves once it logs its address. */
export async function startCoordinator({ allowOrigins = [] } = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), 'starling-browser-'));
  const args = ['serve', '--addr', '127.0.0.1:0', '--db', path.join(dir, 'test.db'), '--demo', '--www', path.join(ROOT, 'www')];
  for (const o of allowOrigins) args.push('--allow-origin', o);
  const proc = spawn(STARLING, args, { cwd: ROOT, env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' }, stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`coordinator did not start:\n${log}`)), 60_000);
    proc.stderr.on('data', (chunk) => {
      log += chunk.toString();
      // eslint-disable-next-line no-control-regex
      const m = log.replace(/\x1b\[[0-9;]*m/g, '').match(/coordinator listening: volunteer page http:\/\/([^/\s]+)\//);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`coordinator exited (${code}):\n${log}`)); });
  });
  proc.stderr.on('data', () => {}); // keep draining
  const url = `http://${addr}`;
  return {
    addr, url, dir,
    api: async (p) => {
      const res = await fetch(`${url}/api/v1${p}`);
      if (!res.ok) throw new Error(`GET ${p}: HTTP ${res.status}`);
      return res.json();
    },
    async stop() {
      proc.kill('SIGTERM');
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A native CPU worker: the redundant partner whose replicas verify the browser's results. */
export function startNativeWorker(coord, name = 'native-partner') {
  const proc = spawn(STARLING, ['worker', '--coordinator', `ws://${coord.addr}/ws`, '--backend', 'cpu', '--name', name],
    { cwd: ROOT, env: { ...process.env, RUST_LOG: 'warn' }, stdio: 'ignore' });
  return { async stop() { proc.kill('SIGTERM'); await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r))); } };
}

/** Headless Chromium; `webgpu: false` leaves WebGPU off (no `--enable-unsafe-webgpu`). */
export async function launchBrowser({ webgpu = true } = {}) {
  return chromium.launch({ executablePath: '/usr/bin/chromium', args: webgpu ? ['--enable-unsafe-webgpu', ...CHROMIUM_ARGS] : CHROMIUM_ARGS });
}

/** A tiny web server on another origin (another port) serving one HTML page at `/`. */
export async function startPartnerSite(html) {
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(typeof html === 'function' ? html() : html);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const origin = `http://127.0.0.1:${server.address().port}`;
  return { origin, setHtml: (h) => { html = h; }, close: () => new Promise((r) => server.close(r)) };
}

/** The volunteer page's view (`window.starlingVolunteer.view`). */
export function pageView(page) {
  return page.evaluate(() => JSON.parse(JSON.stringify(window.starlingVolunteer.view)));
}

/** Browser workers the coordinator currently sees on job 1. */
export async function browserWorkers(coord) {
  const job = await coord.api('/jobs/1');
  return job.workers.filter((w) => w.platform === 'browser');
}

/** Attempts a WebSocket upgrade of `/ws` with the given Origin header; resolves with the HTTP status. */
export function upgradeStatus(coord, origin) {
  return new Promise((resolve, reject) => {
    const [host, port] = coord.addr.split(':');
    const req = http.request({ host, port, path: '/ws', headers: {
      Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13', 'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==',
      ...(origin ? { Origin: origin } : {}),
    } });
    req.on('upgrade', (res, socket) => { socket.destroy(); resolve(res.statusCode); });
    req.on('response', (res) => { res.resume(); resolve(res.statusCode); });
    req.on('error', reject);
    req.end();
  });
}
