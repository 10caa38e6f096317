// A language-model job in real headless Chromium against a real `starling serve`: the owner uploads a small STK1
// token dataset and creates a transformer job over the HTTP API (the MLP demo job paused); a tab on the WASM CPU
// path runs its leases (T token ids and T next-token labels per row), each checked against a native CPU worker's
// replica by the coordinator, and must be accepted; the owner dashboard then shows a text sample of the job.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { launchBrowser, pageView, startCoordinator, startNativeWorker, waitFor } from './support.mjs';

const CONTEXT = 8;
const TEXT = 'the cat sat on the mat. a dog ran to the sea. '.repeat(40);

/** The STK1 upload of TEXT, char-level (docs/API.md, "Token datasets"): u16 ids, sorted distinct characters. */
function stk1(text) {
  const vocab = [...new Set(text)].sort();
  const json = new TextEncoder().encode(JSON.stringify(vocab));
  const ids = [...text].map((c) => vocab.indexOf(c));
  const buf = new ArrayBuffer(36 + json.length + 2 * ids.length);
  const v = new DataView(buf);
  new Uint8Array(buf, 0, 4).set(new TextEncoder().encode('STK1'));
  v.setUint32(4, 2, true);
  v.setUint32(8, vocab.length, true);
  v.setUint32(12, CONTEXT, true);
  v.setBigUint64(16, BigInt(ids.length), true);
  v.setBigUint64(24, 0n, true);
  v.setUint32(32, json.length, true);
  new Uint8Array(buf, 36, json.length).set(json);
  ids.forEach((id, i) => v.setUint16(36 + json.length + 2 * i, id, true));
  return { bytes: new Uint8Array(buf), vocab };
}

let coord;
let partner;
let token;
let job;
before(async () => {
  coord = await startCoordinator();
  token = readFileSync(path.join(coord.dir, 'test.demo-token'), 'utf8').trim();
  const owner = async (method, p, body, type = 'application/json') => {
    const res = await fetch(`${coord.url}/api/v1${p}`, {
      method,
      headers: { authorization: `Bearer ${token}`, 'content-type': type },
      body: body && (type === 'application/json' ? JSON.stringify(body) : body),
    });
    const json = await res.json();
    if (!res.ok) throw new Error(`${method} ${p}: HTTP ${res.status} ${JSON.stringify(json)}`);
    return json;
  };
  const { bytes, vocab } = stk1(TEXT);
  const ds = await owner('POST', '/datasets?name=sentences', bytes, 'application/octet-stream');
  assert.equal(ds.kind, 'tokens');
  await owner('POST', '/jobs/1/pause');
  job = await owner('POST', '/jobs', {
    name: 'browser lm',
    spec: {
      input: [CONTEXT],
      layers: [
        { type: 'embedding', vocab: vocab.length, width: 16 }, { type: 'positional_embedding' },
        { type: 'transformer_block', heads: 2 }, { type: 'layer_norm' }, { type: 'lm_head', tied: true },
      ],
    },
    dataset: ds.id,
    hyper: { global_batch: 8, micro_batch: 4, steps: 1000, eval_every: 2 },
  });
  assert.equal(job.language_model, true);
  partner = startNativeWorker(coord, 'native-lm-partner');
});
after(async () => {
  await partner?.stop();
  await coord?.stop();
});

test('LM leases on the WASM CPU path are verified against a native CPU replica and accepted', async () => {
  const browser = await launchBrowser({ webgpu: false });
  try {
    const page = await browser.newPage();
    await page.goto(`${coord.url}/`);
    await page.getByRole('button', { name: 'Start contributing' }).click();
    const view = await waitFor(async () => {
      const v = await pageView(page);
      return v.stats?.accepted >= 2 && v;
    }, { timeoutMs: 180_000, what: '2 accepted LM results' });
    await page.getByRole('button', { name: 'Stop contributing' }).click();
    assert.equal(view.device.backend, 'cpu');
    console.log(`# LM on the WASM CPU path: ${(view.stats.busy_ms / view.stats.results_sent).toFixed(1)} ms per micro-batch of 4 windows`);
    const me = (await coord.api('/workers')).find((w) => w.id === view.stats.worker);
    assert.ok(me && me.accepted >= 2, `the coordinator accepted the tab's results: ${JSON.stringify(me)}`);
    assert.equal(me.rejected, 0, 'no honest result is rejected');
    assert.equal(view.stats.rejected, 0);
  } finally {
    await browser.close();
  }
});

test('the owner dashboard shows a text sample of the LM job', async () => {
  const browser = await launchBrowser({ webgpu: false });
  try {
    const page = await browser.newPage();
    await page.goto(`${coord.url}/dashboard.html#job=${job.id}`);
    await page.getByLabel('API token').fill(token);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.locator('#sample-prompt').fill('the ');
    await page.getByRole('button', { name: 'Sample', exact: true }).click();
    const text = await waitFor(async () => {
      const t = await page.locator('#sample-text').textContent();
      return t && t.startsWith('the ') && t.length > 100 && t;
    }, { timeoutMs: 60_000, what: 'a sample on the dashboard' });
    assert.ok([...text].every((c) => TEXT.includes(c)), `the sample is made of the corpus's characters: ${text}`);
  } finally {
    await browser.close();
  }
});
