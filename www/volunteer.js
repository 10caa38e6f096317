// Page-side control of one browser volunteer, shared by the volunteer page (index.html) and the widget's iframe
// (embed.html): creates the Web Worker on start (never before), relays commands and stats, keeps the token in
// localStorage, pauses while the tab is hidden and stops on battery power when asked to.

const TOKEN_KEY = 'starling.token';

/** One volunteer session at a time; `onUpdate(view)` is called with everything the page shows. */
export class Volunteer {
  constructor({ coordinator, fallbacks = [], backend = 'auto', name = null, onUpdate = () => {} }) {
    this.coordinator = coordinator;
    // Other nodes' sockets, tried in turn when the connection is lost (the worker reconnects with backoff).
    this.fallbacks = fallbacks;
    this.backend = backend;
    this.name = name;
    this.onUpdate = onUpdate;
    this.worker = null;
    this.throttle = 1;
    this.pauseWhenHidden = true;
    this.stopOnBattery = true;
    this.battery = null;
    this.view = { running: false, state: 'idle', device: null, stats: null, ended: null, error: null, bench: null };
    document.addEventListener('visibilitychange', () => this.#applyPause());
  }

  get running() {
    return this.worker !== null;
  }

  /** Starts the worker; only ever called from the volunteer's click. */
  start() {
    if (this.worker) return;
    if (this.#onBattery()) {
      this.#update({ ended: 'not started: this device is on battery power (untick "Stop on battery" to allow it)' });
      return;
    }
    this.worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'starling-volunteer' });
    this.worker.onmessage = (e) => this.#onMessage(e.data);
    this.worker.onerror = (e) => this.#finish(`the worker failed: ${e.message || 'unknown error'}`);
    let token = null;
    try { token = localStorage.getItem(TOKEN_KEY); } catch { /* storage disabled: a fresh identity each time */ }
    this.worker.postMessage({
      type: 'start', coordinator: this.coordinator, fallbacks: this.fallbacks, token, name: this.name, backend: this.backend,
      throttle: this.throttle, paused: this.#shouldPause(),
    });
    this.#update({ running: true, state: 'starting', ended: null, error: null, device: null, stats: null });
    this.#watchBattery();
  }

  /** Closes the socket; the worker reports `ended` and is then terminated. */
  stop() {
    if (!this.worker) return;
    this.worker.postMessage({ type: 'stop' });
    this.#update({ state: 'stopping' });
    // A worker stuck in a long computation still goes away.
    const w = this.worker;
    setTimeout(() => { if (this.worker === w) this.#finish('stopped by the volunteer'); }, 5000);
  }

  /** Share of time spent computing, 0.05..1. */
  setThrottle(share) {
    this.throttle = share;
    this.worker?.postMessage({ type: 'throttle', share });
  }

  setPauseWhenHidden(on) {
    this.pauseWhenHidden = on;
    this.#applyPause();
  }

  setStopOnBattery(on) {
    this.stopOnBattery = on;
    if (on && this.#onBattery()) this.stop();
  }

  /** Whether the Battery API is available (it is not in Firefox or Safari). */
  static batterySupported() {
    return typeof navigator.getBattery === 'function';
  }

  #shouldPause() {
    return this.pauseWhenHidden && document.visibilityState === 'hidden';
  }

  #applyPause() {
    this.worker?.postMessage({ type: 'pause', paused: this.#shouldPause() });
  }

  #onBattery() {
    return this.stopOnBattery && this.battery !== null && !this.battery.charging;
  }

  async #watchBattery() {
    if (this.battery || !Volunteer.batterySupported()) return;
    try {
      this.battery = await navigator.getBattery();
      this.battery.addEventListener('chargingchange', () => {
        if (this.#onBattery()) { this.stop(); this.#update({ ended: 'stopped: the device switched to battery power' }); }
      });
      if (this.#onBattery()) this.stop();
    } catch { this.battery = null; }
  }

  #onMessage(msg) {
    if (!msg || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'device': this.#update({ device: msg }); break;
      case 'stats': this.#update({ state: msg.state, stats: msg.stats }); break;
      case 'token':
        try { localStorage.setItem(TOKEN_KEY, msg.token); } catch { /* storage disabled */ }
        break;
      case 'error': this.#update({ error: msg.message }); break;
      case 'bench': this.#update({ bench: msg }); break;
      case 'ended': this.#finish(msg.reason); break;
      default: break;
    }
  }

  #finish(reason) {
    this.worker?.terminate();
    this.worker = null;
    this.#update({ running: false, state: 'stopped', ended: this.view.ended && reason === 'stopped by the volunteer' ? this.view.ended : reason });
  }

  #update(patch) {
    Object.assign(this.view, patch);
    this.onUpdate(this.view);
  }
}

/** `ws://host/ws` (or `wss://`) for the page's own origin. */
export function socketUrl(loc = location) {
  return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/ws`;
}

/** Formats a number of GFLOP as credits. */
export function formatCredits(gflop) {
  if (!Number.isFinite(gflop)) return '—';
  return gflop >= 1000 ? `${(gflop / 1000).toFixed(2)} TFLOP` : `${gflop.toFixed(gflop < 10 ? 2 : 1)} GFLOP`;
}

/** Formats a byte count (the session's `bytes_received` / `bytes_sent`). */
export function formatBytes(n) {
  if (!Number.isFinite(n)) return '—';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MiB`;
}
