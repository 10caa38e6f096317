// The browser worker's dataset cache (the Cache API, `starling-datasets`, one entry per dataset SHA-256) in real
// headless Chromium against a real `starling serve` on 127.0.0.1 (a secure context): a tab training a `local` job
// downloads the dataset once; a second tab of the same browser fetches no dataset bytes at all; a damaged cache
// entry is refused by its hash and the dataset fetched (and cached) again. Every lease is verified against a native
// CPU worker's replica, so each tab must also get accepted results from the rows it read from its cache.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { launchBrowser, pageView, startCoordinator, startNativeWorker, waitFor } from './support.mjs';

const ROWS = 512;
const DIM = 16;
const CLASSES = 4;

/** An SDS1 upload (docs/API.md): `SDS1`, u32 N, u32 D, N·D f32 features, N u32 labels; 8 distinct feature values. */
function sds1() {
  const buf = new ArrayBuffer(12 + 4 * ROWS * DIM + 4 * ROWS);
  const v = new DataView(buf);
  [0x53, 0x44, 0x53, 0x31].forEach((b, i) => v.setUint8(i, b));
  v.setUint32(4, ROWS, true);
  v.setUint32(8, DIM, true);
  let at = 12;
  for (let r = 0; r < ROWS; r++) {
    for (let d = 0; d < DIM; d++, at += 4) v.setFloat32(at, ((r * 7 + d * 3) % 8) / 8 + (d === r % DIM ? 1 : 0), true);
  }
  for (let r = 0; r < ROWS; r++, at += 4) v.setUint32(at, (r % DIM) % CLASSES, true);
  return new Uint8Array(buf);
}

let coord;
let partner;
before(async () => {
  coord = await startCoordinator();
  const token = readFileSync(path.join(coord.dir, 'test.demo-token'), 'utf8').trim();
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
  const ds = await owner('POST', '/datasets?name=cache-test', sds1(), 'application/octet-stream');
  await owner('POST', '/jobs/1/pause');
  await owner('POST', '/jobs', {
    name: 'cached local job',
    spec: { input: [DIM], layers: [{ type: 'dense', units: 8 }, { type: 'relu' }, { type: 'dense', units: CLASSES }] },
    dataset: ds.id,
    hyper: { mode: 'local', h: 4, inner_batch: 16, micro_batch: 64, global_batch: 128, steps: 100_000, eval_every: 1000 },
  });
  partner = startNativeWorker(coord, 'native-cache-partner');
});
after(async () => {
  await partner?.stop();
  await coord?.stop();
});

/** Opens the volunteer page in `context`, starts it, waits for `accepted` verified results, and closes the tab. */
async function contribute(context, accepted) {
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`tab: ${e.message}`));
  await page.goto(coord.url);
  await page.getByRole('button', { name: 'Start contributing' }).click();
  const view = await waitFor(async () => {
    const v = await pageView(page);
    if (v.ended) throw new Error(`the page stopped: ${v.ended}`);
    return v.stats?.accepted >= accepted && v;
  }, { timeoutMs: 120_000, what: `${accepted} accepted results` });
  await page.close();
  return view.stats;
}

/** The cache's entries: key path → bytes. */
async function cacheEntries(context) {
  const page = await context.newPage();
  await page.goto(coord.url);
  const entries = await page.evaluate(async () => {
    const cache = await caches.open('starling-datasets');
    const out = {};
    for (const req of await cache.keys()) out[new URL(req.url).pathname] = (await (await cache.match(req)).arrayBuffer()).byteLength;
    return out;
  });
  await page.close();
  return entries;
}

test('a second tab reads the dataset from the Cache API, and a damaged entry is refused by hash and fetched again', async () => {
  const browser = await launchBrowser({ webgpu: false });
  try {
    const context = await browser.newContext();
    const first = await contribute(context, 1);
    assert.equal(first.datasets, 1, 'the first tab fetched the dataset once');
    assert.ok(first.dataset_bytes > 0, 'the first tab received dataset bytes');
    assert.equal(first.datasets_cached, 0);
    const entries = await cacheEntries(context);
    const keys = Object.keys(entries);
    assert.equal(keys.length, 1, `one cache entry: ${JSON.stringify(entries)}`);
    assert.match(keys[0], /^\/starling-datasets\/[0-9a-f]{64}$/);

    const second = await contribute(context, 1);
    assert.equal(second.datasets, 0, 'the second tab fetched no dataset');
    assert.equal(second.dataset_bytes, 0, 'the second tab received no dataset bytes');
    assert.equal(second.datasets_cached, 1, 'the second tab used the cached dataset');

    // Damage the entry: same key, same encoding line, one payload byte changed (the hash no longer matches).
    const damage = await context.newPage();
    await damage.goto(coord.url);
    await damage.evaluate(async (key) => {
      const cache = await caches.open('starling-datasets');
      const bytes = new Uint8Array(await (await cache.match(key)).arrayBuffer());
      bytes[bytes.length >> 1] ^= 0x55;
      await cache.put(key, new Response(bytes));
    }, keys[0]);
    await damage.close();

    const third = await contribute(context, 1);
    assert.equal(third.datasets_cached, 0, 'the damaged entry was not used');
    assert.equal(third.datasets, 1, 'the dataset was fetched again');
    assert.equal(third.dataset_bytes, first.dataset_bytes, 'the same bytes as the first download');
    // And cached again, good this time: a fourth tab downloads nothing.
    const fourth = await contribute(context, 1);
    assert.equal(fourth.datasets, 0);
    assert.equal(fourth.datasets_cached, 1);
  } finally {
    await browser.close();
  }
});
