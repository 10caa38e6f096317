// The volunteer page rides out the death of its node: under a contributing tab (the WASM CPU path) the real
// `starling serve` is killed (-9) and restarted on the same address and database; the tab shows "reconnecting",
// reconnects with backoff as the same worker (its token) and goes on contributing verified results. A native CPU
// partner (reconnecting too) supplies the second replica of every micro-batch.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { ROOT, launchBrowser, pageView, waitFor } from './support.mjs';

const STARLING = path.join(ROOT, 'target/debug/starling');
const dir = mkdtempSync(path.join(tmpdir(), 'starling-browser-failover-'));
const running = new Set();

/** `starling serve --demo` on `addr` with the test's database; resolves with the process and its address. */
async function serve(addr) {
  const args = ['serve', '--addr', addr, '--db', path.join(dir, 'test.db'), '--demo', '--www', path.join(ROOT, 'www')];
  const proc = spawn(STARLING, args, { cwd: ROOT, env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' }, stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(proc);
  proc.on('exit', () => running.delete(proc));
  let log = '';
  const bound = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`coordinator did not start:\n${log}`)), 60_000);
    proc.stderr.on('data', (chunk) => {
      log += chunk.toString();
      const m = log.match(/coordinator listening: volunteer page http:\/\/([^/\s]+)\//);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`coordinator exited (${code}):\n${log}`)); });
  });
  proc.stderr.on('data', () => {}); // keep draining
  return { proc, addr: bound };
}

function kill9(proc) {
  return new Promise((r) => { if (proc.exitCode !== null || proc.signalCode) r(); else { proc.once('exit', r); proc.kill('SIGKILL'); } });
}

after(async () => {
  for (const p of [...running]) await kill9(p);
  rmSync(dir, { recursive: true, force: true });
});

test('a tab whose node is killed shows "reconnecting" and goes on contributing on the restarted node', async () => {
  let node = await serve('127.0.0.1:0');
  const { addr } = node;
  const partner = spawn(STARLING, ['worker', '--coordinator', `ws://${addr}/ws`, '--backend', 'cpu', '--name', 'native-partner', '--reconnect-secs', '120'],
    { cwd: ROOT, env: { ...process.env, RUST_LOG: 'warn' }, stdio: 'ignore' });
  running.add(partner);
  const browser = await launchBrowser({ webgpu: false });
  try {
    const page = await browser.newPage();
    await page.goto(`http://${addr}/?backend=cpu`);
    await page.getByRole('button', { name: 'Start contributing' }).click();
    const before = await waitFor(async () => {
      const v = await pageView(page);
      if (v.ended) throw new Error(`the page stopped: ${v.ended}`);
      return v.stats?.accepted >= 2 && v;
    }, { timeoutMs: 60_000, what: '2 accepted results before the kill' });

    await kill9(node.proc);
    const killed = Date.now();
    await waitFor(async () => (await pageView(page)).state === 'reconnecting', { timeoutMs: 10_000, interval: 50, what: 'the page to say it is reconnecting' });
    assert.match(await page.locator('#status').innerText(), /reconnecting/i);
    node = await serve(addr);
    const restarted = Date.now();

    const after = await waitFor(async () => {
      const v = await pageView(page);
      if (v.ended) throw new Error(`the page stopped: ${v.ended}`);
      return v.stats?.accepted >= before.stats.accepted + 2 && v;
    }, { timeoutMs: 45_000, what: '2 more accepted results after the restart' });
    assert.equal(after.stats.worker, before.stats.worker, 'the same worker (its token) after reconnecting');
    assert.ok(['running', 'waiting'].includes(after.state), `state ${after.state}`);
    console.log(`# kill -9 → restart ${((restarted - killed) / 1000).toFixed(1)} s; the tab was contributing again (2 more accepted) ${((Date.now() - restarted) / 1000).toFixed(1)} s after the restart`);
  } finally {
    await browser.close();
    await kill9(partner);
  }
});
