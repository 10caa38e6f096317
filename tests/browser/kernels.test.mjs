// The matmul kernels on WebGPU in real headless Chromium (SwiftShader, no GPU here): the wasm export
// `kernel_selftest` runs every variant (old tiled, each register-blocked tile, the blocked shape table) in all three
// backprop forms on shapes that are not tile multiples against the CPU backend's SGEMM, and one full training step
// of the blocked engine and one of a small language model (embeddings, causal attention, tied head) against the CPU
// engine (web-worker/src/gpu/selftest.rs). Needs www/pkg (`cargo xtask wasm`).
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { ROOT, launchBrowser } from './support.mjs';

const TYPES = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html; charset=utf-8' };
const WWW = path.join(ROOT, 'www');

let server;
let origin;
before(async () => {
  // A blank page plus www/ on 127.0.0.1:0: the self-test needs only the wasm package, not a coordinator.
  server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/') {
      res.writeHead(200, { 'content-type': TYPES['.html'] });
      return res.end('<!doctype html><title>kernel self-test</title>');
    }
    const file = path.join(WWW, path.normalize(url.pathname));
    if (!file.startsWith(WWW + path.sep)) { res.writeHead(403); return res.end(); }
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
      res.end(body);
    } catch {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  origin = `http://127.0.0.1:${server.address().port}`;
});
after(() => new Promise((r) => server?.close(r)));

test('every matmul variant, the blocked training step and an LM step agree with the CPU path on WebGPU (SwiftShader)', async () => {
  const browser = await launchBrowser();
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`${origin}/`);
    const started = Date.now();
    const report = await page.evaluate(async () => {
      const wasm = await import('/pkg/starling_worker.js');
      await wasm.default();
      return JSON.parse(await wasm.kernel_selftest());
    });
    console.log(`# ${report.adapter}: ${report.checks} matmul checks over ${report.variants.join(', ')}; worst |gpu-cpu|/tol ${report.worst_ratio.toFixed(3)}; step rel L2 ${report.step_rel_l2.toExponential(2)}; LM step rel L2 ${report.lm_step_rel_l2.toExponential(2)}; 784-128-10 step at batch 64 ${report.step_ms.map(([v, ms]) => `${v} ${ms} ms`).join(', ')}; ${((Date.now() - started) / 1000).toFixed(1)} s`);
    assert.deepEqual(report.failures, [], 'every check within tolerance');
    assert.deepEqual(errors, [], 'no page errors');
    for (const v of ['tiled', 'blocked32x32k16r4x4', 'blocked64x64k16r4x4', 'blocked128x128k16r8x8', 'blocked(<=128x128k16r8x8)']) {
      assert.ok(report.variants.includes(v), `${v} was checked`);
    }
    assert.equal(report.checks, report.variants.length * 3 * 7);
    assert.ok(report.worst_ratio <= 1 && report.step_rel_l2 < 1e-4);
    // The LM step (embeddings, causal attention, tied head) on WebGPU against the wasm CPU engine.
    assert.ok(report.lm_step_rel_l2 < 1e-4, `LM step rel L2 ${report.lm_step_rel_l2}`);
  } finally {
    await browser.close();
  }
});
