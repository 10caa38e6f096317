// The owner dashboard in real Chromium: sign in with the demo owner's token, watch the curves grow over SSE while
// native workers train, pause and resume the job, and save a screenshot.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { SCREENSHOTS, launchBrowser, startCoordinator, startNativeWorker, waitFor } from './support.mjs';

test('owner dashboard: sign in, live curves, pause and resume', { timeout: 180_000 }, async () => {
  const coord = await startCoordinator();
  const token = readFileSync(path.join(coord.dir, 'test.demo-token'), 'utf8').trim();
  const workers = [startNativeWorker(coord, 'dash-a'), startNativeWorker(coord, 'dash-b')];
  const browser = await launchBrowser({ webgpu: false });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    await page.goto(`${coord.url}/dashboard`);
    // A wrong token is refused with a message.
    await page.fill('#token', 'stk_not-a-token');
    await page.click('#signin-form button');
    await page.waitForFunction(() => document.getElementById('signin-error').textContent.includes('failed'));
    await page.fill('#token', token);
    await page.click('#signin-form button');
    await page.waitForSelector('#job:not([hidden])');
    assert.match(await page.textContent('#who'), /signed in as demo/);

    // Live: the step shown climbs without reloading, and the chart gains points.
    const shownStep = async () => Number((await page.textContent('#s-step')).split('/')[0]);
    const first = await waitFor(async () => (await shownStep()) > 0 && shownStep(), { what: 'a step on the dashboard' });
    await waitFor(async () => (await shownStep()) >= first + 20, { what: 'the step to climb over SSE' });
    await waitFor(() => page.evaluate(() => document.querySelectorAll('#acc-chart canvas').length > 0), { what: 'the accuracy chart' });
    await waitFor(async () => Number(await page.textContent('#s-acc-n')) > 0, { what: 'accepted results' });
    assert.equal((await page.$$('#workers tr')).length, 2, 'both native workers are listed');

    // Pause: the coordinator stops leasing; the dashboard shows it.
    await page.click('#pause');
    await page.waitForFunction(() => document.getElementById('job-status').textContent === 'paused');
    await new Promise((r) => setTimeout(r, 600)); // in-flight results land
    const paused = (await coord.api('/jobs/1')).counters.leases_issued;
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal((await coord.api('/jobs/1')).counters.leases_issued, paused, 'no leases while paused');
    assert.equal((await coord.api('/jobs/1')).status, 'paused');

    // Resume: training continues and the page follows.
    await page.click('#resume');
    await page.waitForFunction(() => document.getElementById('job-status').textContent === 'running');
    const resumedAt = await shownStep();
    await waitFor(async () => (await shownStep()) >= resumedAt + 10, { what: 'training to continue after resume' });
    await waitFor(async () => (await page.$$('#leaders tr')).length >= 2, { what: 'the credits leaderboard' });
    await page.screenshot({ path: path.join(SCREENSHOTS, 'dashboard.png'), fullPage: true });
  } finally {
    await browser.close();
    for (const w of workers) await w.stop();
    await coord.stop();
  }
});
