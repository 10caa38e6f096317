// The volunteer's dedicated Web Worker (an ES module worker): loads the Rust worker from pkg/ and forwards
// messages between the page and Rust. All state (session, socket, throttle, pause) lives in Rust (web-worker/src/wasm.rs).
import init, { command } from './pkg/starling_worker.js';

const early = [];
let loaded = false;
self.onmessage = (event) => (loaded ? command(event.data) : early.push(event.data));
init().then(
  () => {
    loaded = true;
    for (const msg of early.splice(0)) command(msg);
  },
  (err) => self.postMessage({ type: 'ended', reason: `could not load the worker: ${err}` }),
);
