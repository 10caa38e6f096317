// A convolutional job in real headless Chromium against a real `starling serve`: the owner posts a CNN (model spec
// v2: conv2d, relu, max_pool2d, flatten, dense) on the demo's MNIST upload over the HTTP API, the MLP demo job is
// paused, and one tab runs its leases on WebGPU (SwiftShader, the WGSL conv kernels) and another on the WASM CPU
// path. Every result is checked against a native CPU worker's replica by the coordinator, and must be accepted.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { launchBrowser, pageView, startCoordinator, startNativeWorker, waitFor } from './support.mjs';

/** Small enough for SwiftShader to run a micro-batch in well under a second, with every kernel of a CNN. */
const CNN = {
  input: [1, 28, 28],
  layers: [
    { type: 'conv2d', out_channels: 6, kernel: 5, padding: 2 }, { type: 'relu' },
    { type: 'max_pool2d', kernel: 2 },
    { type: 'conv2d', out_channels: 8, kernel: 3, stride: 2 }, { type: 'relu' },
    { type: 'flatten' }, { type: 'dense', units: 10 },
  ],
};

let coord;
let partner;
let token;
let job;
before(async () => {
  coord = await startCoordinator();
  token = readFileSync(path.join(coord.dir, 'test.demo-token'), 'utf8').trim();
  const owner = async (method, p, body) => {
    const res = await fetch(`${coord.url}/api/v1${p}`, {
      method,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: body && JSON.stringify(body),
    });
    const json = await res.json();
    if (!res.ok) throw new Error(`${method} ${p}: HTTP ${res.status} ${JSON.stringify(json)}`);
    return json;
  };
  const [mnist] = await owner('GET', '/datasets');
  await owner('POST', '/jobs/1/pause');
  job = await owner('POST', '/jobs', {
    name: 'browser cnn',
    spec: CNN,
    dataset: mnist.id,
    hyper: { global_batch: 16, micro_batch: 8, steps: 1000, eval_every: 1000 },
  });
  partner = startNativeWorker(coord, 'native-cnn-partner');
});
after(async () => {
  await partner?.stop();
  await coord?.stop();
});

/** Clicks start, waits for `accepted` verified results on the CNN job, stops, and returns the page's view. */
async function runLeases(page, accepted) {
  await page.getByRole('button', { name: 'Start contributing' }).click();
  const view = await waitFor(async () => {
    const v = await pageView(page);
    if (v.ended) throw new Error(`the page stopped: ${v.ended}`);
    return v.stats?.accepted >= accepted && v;
  }, { timeoutMs: 180_000, what: `${accepted} accepted CNN results` });
  await page.getByRole('button', { name: 'Stop contributing' }).click();
  await waitFor(async () => !(await pageView(page)).running, { what: 'stop' });
  return view;
}

/** The coordinator's record of the page's worker: results accepted, none rejected. */
async function checkAccepted(view, accepted) {
  const me = (await coord.api('/workers')).find((w) => w.id === view.stats.worker);
  assert.ok(me, `worker ${view.stats.worker} is in the coordinator's records`);
  assert.ok(me.accepted >= accepted, `the coordinator accepted ${me.accepted} results`);
  assert.equal(me.rejected, 0, 'no honest result is rejected');
  assert.equal(view.stats.rejected, 0);
  const status = await coord.api(`/jobs/${job.id}`);
  assert.ok(status.step >= 1, `the CNN job advanced (step ${status.step})`);
}

test('a CNN lease on WebGPU (SwiftShader) is verified against a native CPU replica and accepted', async () => {
  const browser = await launchBrowser();
  try {
    const page = await browser.newPage();
    await page.goto(`${coord.url}/?backend=webgpu`);
    const view = await runLeases(page, 2);
    assert.equal(view.device.backend, 'webgpu');
    console.log(`# CNN on WebGPU (${view.device.adapter}): ${(view.stats.busy_ms / view.stats.results_sent).toFixed(0)} ms per micro-batch of 8`);
    await checkAccepted(view, 2);
  } finally {
    await browser.close();
  }
});

test('a CNN lease on the WASM CPU path is verified and accepted', async () => {
  const browser = await launchBrowser({ webgpu: false });
  try {
    const page = await browser.newPage();
    await page.goto(`${coord.url}/`);
    const view = await runLeases(page, 2);
    assert.equal(view.device.backend, 'cpu');
    console.log(`# CNN on the WASM CPU path: ${(view.stats.busy_ms / view.stats.results_sent).toFixed(1)} ms per micro-batch of 8`);
    await checkAccepted(view, 2);
  } finally {
    await browser.close();
  }
});
