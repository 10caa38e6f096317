// One headless Chromium tab contributing to a coordinator from its volunteer page (the wasm CPU path: WebGPU off),
// for `cargo xtask bench lm` (cli/examples/lm_bench.rs starts it and kills it when the run ends).
// Usage: node cli/examples/lm_tab.mjs http://127.0.0.1:PORT/
import { chromium } from 'playwright-core';

const url = process.argv[2];
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const stop = async () => { await browser.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
const page = await browser.newPage();
page.on('pageerror', (e) => console.error(`tab: ${e.message}`));
await page.goto(url);
await page.getByRole('button', { name: 'Start contributing' }).click();
for (;;) {
  await new Promise((r) => setTimeout(r, 30_000));
  const v = await page.evaluate(() => JSON.parse(JSON.stringify(window.starlingVolunteer.view)));
  console.error(`tab: ${v.device?.backend} accepted ${v.stats?.accepted} rejected ${v.stats?.rejected}`);
}
