// The embeddable widget on partner pages served from other origins: it starts only after the visitor's click and
// contributes verified results from the coordinator's iframe; an origin not on the allow-list is refused, both for
// framing (CSP frame-ancestors) and for browser sockets (403 on the `/ws` upgrade).
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { SCREENSHOTS, browserWorkers, launchBrowser, startCoordinator, startNativeWorker, startPartnerSite, upgradeStatus, waitFor } from './support.mjs';

let partnerSite;
let otherSite;
let coord;
let native;
before(async () => {
  partnerSite = await startPartnerSite('');
  otherSite = await startPartnerSite('');
  coord = await startCoordinator({ allowOrigins: [partnerSite.origin] });
  const page = (theme) => `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Partner lab</title>
    <style>body{font:16px Georgia,serif;background:${theme === 'dark' ? '#0d1117;color:#e6edf3' : '#fdfaf3;color:#222'};max-width:40rem;margin:2rem auto}
    button{all:unset} .starling-widget{margin:1.5rem 0}</style></head>
    <body><h1>Partner lab</h1><p>We train open models with Starling. Lend us your tab:</p>
    <script src="${coord.url}/widget.js" data-coordinator="${coord.url}" data-job="1" data-theme="${theme}"></script>
    <p>Thank you for helping science.</p></body></html>`;
  partnerSite.setHtml(page('light'));
  otherSite.setHtml(page('dark'));
  native = startNativeWorker(coord);
});
after(async () => {
  await native?.stop();
  await coord?.stop();
  await partnerSite?.close();
  await otherSite?.close();
});

test('the widget on an allowed partner origin starts only after the click and contributes accepted results', async () => {
  const browser = await launchBrowser();
  try {
    const page = await browser.newPage({ viewport: { width: 800, height: 620 } });
    await page.goto(partnerSite.origin);
    const status = page.locator('.starling-widget .status');
    await waitFor(async () => (await status.getAttribute('data-state')) === 'idle', { what: 'the widget to be ready' });
    await page.waitForTimeout(1000);
    assert.equal((await browserWorkers(coord)).length, 0, 'nothing runs before the click');
    await page.locator('.starling-widget button.toggle').click();
    await waitFor(async () => Number(await page.locator('.starling-widget .accepted').innerText().then((t) => t.split(' ')[0])) >= 2,
      { timeoutMs: 120_000, what: 'two accepted results in the widget' });
    const rows = await coord.api('/workers');
    const me = rows.find((w) => w.name === `widget on ${partnerSite.origin}`);
    assert.ok(me && me.accepted >= 2, `the coordinator credits the widget's worker: ${JSON.stringify(rows)}`);
    assert.match(await page.locator('.starling-widget .backend').innerText(), /CPU \(WebAssembly\)|WebGPU/);
    await page.screenshot({ path: path.join(SCREENSHOTS, 'widget-partner.png') });
    await page.locator('.starling-widget button.toggle').click();
    await waitFor(async () => (await browserWorkers(coord)).length === 0, { what: 'the widget to stop' });
  } finally {
    await browser.close();
  }
});

test('an origin not on the allow-list is refused: no framing, no socket', async () => {
  assert.equal(await upgradeStatus(coord, otherSite.origin), 403, 'a socket from another origin');
  assert.equal(await upgradeStatus(coord, partnerSite.origin), 101, 'a socket from the partner');
  assert.equal(await upgradeStatus(coord, null), 101, 'a native worker (no Origin)');
  // The worker's wasm is served precompressed (the `.gz` written by `cargo xtask wasm`), with its own MIME type.
  const wasm = await fetch(`${coord.url}/pkg/starling_worker_bg.wasm`, { headers: { 'accept-encoding': 'gzip' } });
  assert.equal(wasm.headers.get('content-encoding'), 'gzip');
  assert.equal(wasm.headers.get('content-type'), 'application/wasm');
  const embed = await fetch(`${coord.url}/embed.html`);
  assert.equal(embed.headers.get('content-security-policy'), `frame-ancestors 'self' ${partnerSite.origin}`);
  const browser = await launchBrowser();
  try {
    const page = await browser.newPage();
    await page.goto(otherSite.origin);
    const status = page.locator('.starling-widget .status');
    await waitFor(async () => (await status.getAttribute('data-state')) === 'refused', { timeoutMs: 20_000, what: 'the refusal' });
    assert.match(await status.innerText(), /not allowed/);
    assert.equal(await page.locator('.starling-widget button.toggle').isDisabled(), true);
    assert.equal((await browserWorkers(coord)).length, 0);
  } finally {
    await browser.close();
  }
});
