// The volunteer page in real headless Chromium against a real `starling serve`: WebGPU (SwiftShader) forced, the
// WASM CPU path by default and without WebGPU, consent before anything runs, pause while hidden, and stop. Every
// result is verified against a native CPU worker's replica, and the page's counters must match the coordinator's.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { SCREENSHOTS, browserWorkers, launchBrowser, pageView, startCoordinator, startNativeWorker, waitFor } from './support.mjs';

let coord;
let partner;
before(async () => {
  coord = await startCoordinator();
  partner = startNativeWorker(coord);
});
after(async () => {
  await partner?.stop();
  await coord?.stop();
});

/** Waits until every result the page sent has its verdict, then checks the page against `GET /api/v1/workers`. */
async function countersMatchCoordinator(page) {
  const view = await waitFor(async () => {
    const v = await pageView(page);
    const s = v.stats;
    return s && s.results_sent === s.accepted + s.rejected + s.late && v;
  }, { what: 'every verdict of the page' });
  const me = (await coord.api('/workers')).find((w) => w.id === view.stats.worker);
  assert.ok(me, `worker ${view.stats.worker} is in the coordinator's records`);
  assert.equal(me.accepted, view.stats.accepted, 'accepted: page vs coordinator');
  assert.equal(me.rejected, view.stats.rejected, 'rejected: page vs coordinator');
  assert.ok(Math.abs(me.credits - view.stats.credits) <= 1e-6 * Math.max(1, me.credits), `credits: page ${view.stats.credits} vs coordinator ${me.credits}`);
  return view;
}

/** Starts the page by clicking, waits for `accepted` verified results, and returns the view. */
async function contribute(page, accepted) {
  await page.getByRole('button', { name: 'Start contributing' }).click();
  return waitFor(async () => {
    const v = await pageView(page);
    if (v.ended) throw new Error(`the page stopped: ${v.ended}`);
    return v.stats?.accepted >= accepted && v;
  }, { timeoutMs: 120_000, what: `${accepted} accepted results` });
}

test('forced WebGPU (SwiftShader) contributes verified results; pause while hidden and stop take no more leases', async () => {
  const browser = await launchBrowser();
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 1000 } });
    await page.goto(`${coord.url}/?backend=webgpu`);
    // Consent: nothing runs before the click — no Worker, no socket, no browser worker at the coordinator.
    await page.waitForTimeout(1000);
    assert.equal((await browserWorkers(coord)).length, 0, 'no browser worker before the click');
    assert.equal(await page.evaluate(() => window.starlingVolunteer.running), false);

    const started = Date.now();
    const view = await contribute(page, 3);
    assert.equal(view.device.backend, 'webgpu');
    assert.match(await page.locator('#backend').innerText(), /WebGPU/);
    const perBatch = view.stats.busy_ms / view.stats.results_sent;
    console.log(`# WebGPU (${view.device.adapter}): ${perBatch.toFixed(0)} ms per micro-batch, ${view.stats.rows_per_s.toFixed(0)} rows/s, 3 accepted in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    const seen = (await browserWorkers(coord)).find((w) => w.worker === view.stats.worker);
    assert.equal(seen?.backend, 'gpu', 'the coordinator sees a GPU browser worker');
    await page.screenshot({ path: path.join(SCREENSHOTS, 'volunteer-page.png'), fullPage: true });

    // Hidden tab: the page pauses (the worker finishes its lease, then withholds `ready`).
    await page.evaluate(() => {
      Object.defineProperty(document, 'visibilityState', { value: 'hidden', configurable: true });
      Object.defineProperty(document, 'hidden', { value: true, configurable: true });
      document.dispatchEvent(new Event('visibilitychange'));
    });
    await waitFor(async () => (await pageView(page)).state === 'paused', { what: 'the paused state' });
    const paused = await countersMatchCoordinator(page);
    await page.waitForTimeout(2500);
    const later = await pageView(page);
    assert.equal(later.stats.leases, paused.stats.leases, 'no lease is taken while hidden');

    // Visible again: work resumes.
    await page.evaluate(() => {
      Object.defineProperty(document, 'visibilityState', { value: 'visible', configurable: true });
      Object.defineProperty(document, 'hidden', { value: false, configurable: true });
      document.dispatchEvent(new Event('visibilitychange'));
    });
    await waitFor(async () => (await pageView(page)).stats.leases > paused.stats.leases, { what: 'a lease after resuming' });

    // Stop closes the socket: the coordinator loses the worker, its lease count stops growing.
    await page.getByRole('button', { name: 'Stop contributing' }).click();
    await waitFor(async () => !(await pageView(page)).running, { what: 'the page to stop' });
    assert.match(await page.locator('#status').innerText(), /Stopped/);
    await waitFor(async () => (await browserWorkers(coord)).length === 0, { what: 'the coordinator to drop the browser worker' });
    const stopped = await pageView(page);
    const rows = await coord.api('/workers');
    const atStop = rows.find((w) => w.id === stopped.stats.worker);
    await page.waitForTimeout(2000);
    const after2 = (await coord.api('/workers')).find((w) => w.id === stopped.stats.worker);
    assert.equal(after2.accepted, atStop.accepted, 'nothing more is credited after stop');
    assert.equal(after2.connected, false);
  } finally {
    await browser.close();
  }
});

test('default choice on SwiftShader uses the WASM CPU path, labelled, and keeps its identity by token', async () => {
  const browser = await launchBrowser();
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(`${coord.url}/`);
    const view = await contribute(page, 3);
    assert.equal(view.device.backend, 'cpu', 'a fallback adapter is slower than the CPU path');
    assert.match(view.device.note, /software \(fallback\) adapter/);
    assert.match(await page.locator('#backend').innerText(), /CPU \(WebAssembly\)/);
    console.log(`# WASM CPU (auto on SwiftShader): ${(view.stats.busy_ms / view.stats.results_sent).toFixed(1)} ms per micro-batch, ${view.stats.rows_per_s.toFixed(0)} rows/s`);
    const bench = await page.evaluate(() => new Promise((resolve) => {
      const w = new Worker('/worker.js', { type: 'module' });
      w.onmessage = (e) => { if (e.data.type === 'bench') { resolve(e.data); w.terminate(); } };
      w.postMessage({ type: 'bench', n: 512 });
    }));
    console.log(`# WASM CPU matmul 512³: ${bench.ms.toFixed(1)} ms, ${bench.gflops.toFixed(2)} GFLOP/s`);
    await page.getByRole('button', { name: 'Stop contributing' }).click();
    await waitFor(async () => !(await pageView(page)).running, { what: 'stop' });
    const first = (await pageView(page)).stats;
    // The token in localStorage keeps the identity (and credits) across restarts.
    assert.ok(await page.evaluate(() => localStorage.getItem('starling.token')));
    await page.getByRole('button', { name: 'Start contributing' }).click();
    const again = await waitFor(async () => { const v = await pageView(page); return v.stats?.worker != null && v; }, { what: 'welcome' });
    assert.equal(again.stats.worker, first.worker, 'same worker id with the stored token');
    assert.ok(again.stats.credits >= first.credits);
    // Whom the job trains for is public.
    assert.match(await page.locator('#jobs').innerText(), /for demo/);
    await page.getByRole('button', { name: 'Stop contributing' }).click();
    await waitFor(async () => !(await pageView(page)).running, { what: 'stop' });
  } finally {
    await browser.close();
  }
});

test('without WebGPU the WASM CPU path is used, labelled, and its results are accepted', async () => {
  const browser = await launchBrowser({ webgpu: false });
  try {
    const page = await browser.newPage();
    await page.goto(`${coord.url}/?backend=webgpu`);
    const view = await contribute(page, 2);
    assert.equal(view.device.backend, 'cpu');
    assert.match(view.device.note, /WebGPU/);
    const seen = (await browserWorkers(coord)).find((w) => w.worker === view.stats.worker);
    assert.equal(seen?.backend, 'cpu');
    assert.equal(seen?.platform, 'browser');
    await page.evaluate(() => window.starlingVolunteer.setPauseWhenHidden(false));
    await page.evaluate(() => window.starlingVolunteer.worker.postMessage({ type: 'pause', paused: true }));
    await countersMatchCoordinator(page);
    // Bad input from the page is answered, not fatal.
    await page.evaluate(() => window.starlingVolunteer.worker.postMessage({ type: 'launch_rockets' }));
    await page.evaluate(() => window.starlingVolunteer.worker.postMessage(42));
    await waitFor(async () => /bad command/.test((await pageView(page)).error ?? ''), { what: 'an error for a bad command' });
    assert.equal((await pageView(page)).running, true, 'the worker survives bad commands');
  } finally {
    await browser.close();
  }
});
