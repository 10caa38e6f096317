// The embeddable Starling widget: one self-contained script for partner sites.
//   <script src="https://COORD/widget.js" data-coordinator="https://COORD" data-job="1" data-theme="light|dark"></script>
// It renders a small card in a shadow root (no CSS clash either way) and runs the worker in an iframe served by the
// coordinator (/embed.html), so the partner page can neither read nor tamper with the work: the card only sends
// start/stop and shows the stats the iframe posts back. Nothing runs before the visitor clicks.
(() => {
  const script = document.currentScript;
  if (!script) return;
  const coordinator = new URL(script.dataset.coordinator || new URL(script.src).origin).origin;
  const job = script.dataset.job || '';
  const theme = script.dataset.theme === 'dark' ? 'dark' : 'light';

  const host = document.createElement('div');
  host.className = 'starling-widget';
  script.after(host);
  const root = host.attachShadow({ mode: 'open' });
  root.innerHTML = `
    <style>
      :host { all: initial; display: block; max-width: 22rem; }
      .card { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; border-radius: 14px; padding: 1rem 1.1rem;
              border: 1px solid var(--line); background: var(--bg); color: var(--ink); box-shadow: 0 2px 8px rgb(0 0 0 / .06); }
      .light { --bg: #fff; --ink: #17202e; --muted: #5b6476; --line: #dfe3ec; --accent: #2f5bea; --stop: #b3261e; --chip: #eef2ff; }
      .dark  { --bg: #1a1f2b; --ink: #e8ebf2; --muted: #a2aabb; --line: #2c3342; --accent: #5b7cff; --stop: #ff6b61; --chip: #22305e; }
      h3 { margin: 0 0 .2rem; font-size: 1rem; }
      p { margin: 0 0 .7rem; color: var(--muted); }
      button { font: inherit; font-weight: 600; border: 0; border-radius: 999px; padding: .55rem 1.1rem; color: #fff; background: var(--accent); cursor: pointer; }
      button[aria-pressed="true"] { background: var(--stop); }
      button:disabled { opacity: .5; cursor: not-allowed; }
      button:focus-visible { outline: 3px solid #9db4ff; outline-offset: 2px; }
      dl { display: grid; grid-template-columns: auto 1fr; gap: .15rem .8rem; margin: .8rem 0 0; font-variant-numeric: tabular-nums; }
      dt { color: var(--muted); } dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
      .chip { display: inline-block; padding: 0 .5rem; border-radius: 999px; background: var(--chip); }
      .status { margin-top: .6rem; font-size: .85rem; color: var(--muted); }
      iframe { display: none; }
      a { color: inherit; }
    </style>
    <div class="card ${theme}" role="region" aria-label="Starling volunteer computing">
      <h3>Help train <span class="job">an open model</span></h3>
      <p>Lend this tab's GPU (or CPU) to <a href="${coordinator}/" target="_blank" rel="noopener">Starling</a>.
         Nothing runs until you click; results are verified independently.</p>
      <button type="button" class="toggle" aria-pressed="false" disabled>Start contributing</button>
      <dl hidden>
        <dt>Backend</dt><dd class="backend">—</dd>
        <dt>Micro-batches</dt><dd class="done">0</dd>
        <dt>Accepted</dt><dd class="accepted">0</dd>
        <dt>Credits</dt><dd class="credits">—</dd>
      </dl>
      <div class="status" role="status" aria-live="polite">Loading…</div>
    </div>`;
  const $ = (sel) => root.querySelector(sel);
  const toggle = $('.toggle');
  const status = $('.status');
  let running = false;
  let greeted = false;

  const frame = document.createElement('iframe');
  frame.title = 'Starling volunteer worker';
  frame.src = `${coordinator}/embed.html${job ? `?job=${encodeURIComponent(job)}` : ''}`;
  root.querySelector('.card').append(frame);

  // The coordinator refuses to be framed by sites not on its allow-list (CSP frame-ancestors): no hello arrives.
  setTimeout(() => {
    if (!greeted) { status.textContent = 'This site is not allowed to host the Starling widget.'; status.dataset.state = 'refused'; }
  }, 8000);

  window.addEventListener('message', (e) => {
    if (e.source !== frame.contentWindow || e.origin !== coordinator || typeof e.data !== 'object' || e.data === null) return;
    const msg = e.data;
    if (msg.starling === 'refused') {
      greeted = true;
      status.textContent = `Refused: ${msg.reason}.`;
      status.dataset.state = 'refused';
    } else if (msg.starling === 'hello') {
      greeted = true;
      toggle.disabled = false;
      status.textContent = 'Ready when you are.';
      status.dataset.state = 'idle';
      if (msg.job?.name) $('.job').textContent = msg.job.name;
    } else if (msg.starling === 'view') {
      const v = msg.view;
      running = v.running;
      toggle.textContent = running ? 'Stop' : 'Start contributing';
      toggle.setAttribute('aria-pressed', String(running));
      $('dl').hidden = !v.backend && !v.stats;
      if (v.backend) {
        const chip = document.createElement('span');
        chip.className = 'chip';
        chip.textContent = v.backend === 'webgpu' ? 'WebGPU' : 'CPU (WebAssembly)';
        $('.backend').replaceChildren(chip);
      }
      if (v.stats) {
        $('.done').textContent = v.stats.done;
        $('.accepted').textContent = `${v.stats.accepted}${v.stats.rejected ? ` (${v.stats.rejected} rejected)` : ''}`;
        $('.credits').textContent = v.stats.worker != null ? `${v.stats.credits.toFixed(2)} GFLOP` : '—';
      }
      status.dataset.state = v.state;
      status.textContent = !v.running && v.ended ? `Stopped: ${v.ended}.` : v.state === 'running' ? 'Contributing — thank you!' : `${v.state[0].toUpperCase()}${v.state.slice(1)}…`;
    }
  });

  toggle.addEventListener('click', () => {
    frame.contentWindow?.postMessage({ starling: running ? 'stop' : 'start' }, coordinator);
  });
})();
