// A line-oriented JSON driver for a headless Chromium (Debian's, through
// playwright-core), for ztmesh's browser-login tests.
//
//   node driver.mjs [--chromium PATH] [-- EXTRA CHROMIUM ARGS...]
//
// Reads one JSON command a line on stdin and answers each with one JSON line
// on stdout, in order: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
// Every command may carry `timeout_ms` (default 15000; no command waits
// longer) and an `id`, echoed in its answer. Commands (`op`):
//   goto {url}          load a page (waits for `load`)     -> {status, url}
//   fill {sel, value}   type into an input
//   click {sel}         click; if a navigation starts, waits for it
//                       -> {navigated, url, failed: null | {url, error}} (a load that failed,
//                       e.g. a redirect to a port nothing listens on: its URL is kept here)
//   text {sel}          innerText of the one matching element -> {text}
//   attr {sel, name}    an attribute (null when absent)    -> {value}
//   count {sel}         how many elements match            -> {count}
//   wait {sel}          wait until an element is visible
//   wait_url {contains} wait until the page URL contains a string -> {url}
//   url                 the current URL                    -> {url}
//   content             the page's HTML                    -> {html}
//   status              HTTP status of the last main-frame navigation -> {status} (null: none / failed)
//   navigations         every main-frame request URL so far, redirects included,
//                       and the loads that failed -> {urls, failed: [{url, error}]}
//   cookies             the browser's cookies              -> {cookies: [...]}
//   clear_cookies       forget them all (a new visitor, as far as servers can tell)
//   reload / back       reload the page / go back          -> {status, url}
//   screenshot {path}   full-page PNG (for a person to look at)
//   violations {clear?} what went wrong in pages so far -> {violations: [{kind, text, url}]},
//                       kind: csp (securitypolicyviolation), console (console.error),
//                       pageerror (uncaught exception), resource (a load that failed)
//   close               close the browser and exit
// The first line on stdout is `{"ready":true,"version":...}` once Chromium runs.

import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const DEFAULT_TIMEOUT_MS = 15000;
// How long after a click a navigation may take to start and still be waited for.
const NAV_START_WINDOW_MS = 1000;
const MAX_RECORDED = 1000;

function reply(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function log(event, fields = {}) {
  process.stderr.write(`${JSON.stringify({ event, ...fields })}\n`);
}

function parseArgs(argv) {
  let executablePath = '/usr/bin/chromium';
  let extra = [];
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--chromium' && argv[i + 1]) {
      executablePath = argv[i + 1];
      i += 1;
    } else if (argv[i] === '--') {
      extra = argv.slice(i + 1);
      break;
    } else {
      log('fatal', { error: `unknown argument ${argv[i]}` });
      process.exit(2);
    }
  }
  return { executablePath, extra };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Rejects after `ms` whatever `promise` does, so no command hangs the driver.
function bounded(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function waitFor(cond, ms) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() >= deadline) return false;
    await sleep(10);
  }
  return true;
}

function need(cmd, ...fields) {
  for (const f of fields) {
    if (typeof cmd[f] !== 'string') throw new Error(`"${cmd.op}" needs a string "${f}"`);
  }
}

const { executablePath, extra } = parseArgs(process.argv.slice(2));
const browser = await chromium.launch({
  executablePath,
  headless: true,
  // Without the background-networking flags Chromium keeps dialing the
  // closed network; without --no-sandbox it refuses to run as root.
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
    ...extra,
  ],
  timeout: DEFAULT_TIMEOUT_MS * 2,
}).catch((e) => {
  log('fatal', { error: `launch ${executablePath}: ${e.message}` });
  process.exit(3);
});
const context = await browser.newContext();
const page = await context.newPage();

const state = {
  status: null,
  navRequests: 0,
  commits: 0,
  urls: [],
  failed: [],
  violations: [],
};

function record(list, item) {
  if (list.length < MAX_RECORDED) list.push(item);
}

const isMainNav = (request) => request.isNavigationRequest() && request.frame() === page.mainFrame();

page.on('request', (request) => {
  if (isMainNav(request)) {
    state.navRequests += 1;
    record(state.urls, request.url());
  }
});
page.on('response', (response) => {
  if (isMainNav(response.request())) state.status = response.status();
});
page.on('requestfailed', (request) => {
  if (isMainNav(request)) {
    const failure = { url: request.url(), error: request.failure()?.errorText ?? 'failed' };
    state.status = null;
    record(state.failed, failure);
    log('navigation.failed', failure);
  }
});
// A new document in the main frame: the end of a redirect chain, or
// Chromium's error page for a load that failed.
page.on('framenavigated', (frame) => {
  if (frame === page.mainFrame()) state.commits += 1;
});
page.on('console', (msg) => {
  if (msg.type() !== 'error') return;
  const url = msg.location()?.url || page.url();
  const text = msg.text();
  // Chromium asks for /favicon.ico by itself; its 404 is not the page's doing.
  if (new URL(url, 'https://x.invalid').pathname === '/favicon.ico') return;
  // "Failed to load resource: ... 404" (also logged for an error page's own
  // document) is kept apart from script errors so a test can tell them apart.
  const kind = text.startsWith('Failed to load resource') ? 'resource' : 'console';
  record(state.violations, { kind, text, url });
});
page.on('pageerror', (err) => {
  record(state.violations, { kind: 'pageerror', text: String(err?.message ?? err), url: page.url() });
});
// A CSP violation in the page calls back into the driver through a binding;
// both the binding and the init script go through DevTools, so the page's
// own CSP does not block them.
await page.exposeBinding('__ztmCspViolation', (_source, v) => {
  record(state.violations, {
    kind: 'csp',
    text: `${v.effectiveDirective} blocked ${v.blockedURI || '(inline)'}`,
    url: v.documentURI,
  });
});
await page.addInitScript(() => {
  document.addEventListener('securitypolicyviolation', (e) => {
    globalThis.__ztmCspViolation({
      effectiveDirective: e.effectiveDirective,
      blockedURI: e.blockedURI,
      documentURI: e.documentURI,
    });
  });
});

// Waits until a navigation that started after `commits` documents and
// `failed` failures has put a new document in place (its page or Chromium's
// error page) and that document has loaded; a load that was aborted (a 204,
// a download) puts none.
async function settle(commits, failed, timeout) {
  const aborted = () => state.failed.slice(failed).some((f) => f.error === 'net::ERR_ABORTED');
  if (!(await waitFor(() => state.commits > commits || aborted(), timeout))) {
    throw new Error(`the navigation did not finish within ${timeout} ms`);
  }
  await page.waitForLoadState('load', { timeout });
}

async function navigation(fn, timeout) {
  const commits = state.commits;
  const failed = state.failed.length;
  try {
    const response = await fn();
    return { status: response ? response.status() : null, url: page.url() };
  } catch (e) {
    // Playwright reports a failed load before Chromium shows its error
    // page; let that happen now rather than cut into the next command.
    if (state.failed.length > failed) await settle(commits, failed, Math.min(timeout, 3000)).catch(() => {});
    throw e;
  }
}

const ops = {
  async goto(cmd, timeout) {
    need(cmd, 'url');
    return navigation(() => page.goto(cmd.url, { timeout, waitUntil: 'load' }), timeout);
  },
  async fill(cmd, timeout) {
    need(cmd, 'sel', 'value');
    await page.locator(cmd.sel).fill(cmd.value, { timeout });
    return {};
  },
  async click(cmd, timeout) {
    need(cmd, 'sel');
    const started = state.navRequests;
    const commits = state.commits;
    const failedBefore = state.failed.length;
    await page.locator(cmd.sel).click({ timeout });
    const navigated = await waitFor(() => state.navRequests > started, NAV_START_WINDOW_MS);
    if (navigated) await settle(commits, failedBefore, timeout);
    const failed = state.failed.length > failedBefore ? state.failed[state.failed.length - 1] : null;
    return { navigated, url: page.url(), failed };
  },
  async text(cmd, timeout) {
    need(cmd, 'sel');
    return { text: await page.locator(cmd.sel).innerText({ timeout }) };
  },
  async attr(cmd, timeout) {
    need(cmd, 'sel', 'name');
    return { value: await page.locator(cmd.sel).getAttribute(cmd.name, { timeout }) };
  },
  async count(cmd) {
    need(cmd, 'sel');
    return { count: await page.locator(cmd.sel).count() };
  },
  async wait(cmd, timeout) {
    need(cmd, 'sel');
    await page.locator(cmd.sel).waitFor({ state: 'visible', timeout });
    return {};
  },
  async wait_url(cmd, timeout) {
    need(cmd, 'contains');
    if (!(await waitFor(() => page.url().includes(cmd.contains), timeout))) {
      throw new Error(`url still ${page.url()} after ${timeout} ms (wanted it to contain ${cmd.contains})`);
    }
    return { url: page.url() };
  },
  async url() {
    return { url: page.url() };
  },
  async content() {
    return { html: await page.content() };
  },
  async status() {
    return { status: state.status };
  },
  async navigations() {
    return { urls: [...state.urls], failed: [...state.failed] };
  },
  async cookies() {
    return { cookies: await context.cookies() };
  },
  async clear_cookies() {
    await context.clearCookies();
    return {};
  },
  async reload(_cmd, timeout) {
    return navigation(() => page.reload({ timeout, waitUntil: 'load' }), timeout);
  },
  async back(_cmd, timeout) {
    return navigation(() => page.goBack({ timeout, waitUntil: 'load' }), timeout);
  },
  async screenshot(cmd, timeout) {
    need(cmd, 'path');
    await page.screenshot({ path: cmd.path, fullPage: true, timeout });
    return {};
  },
  async violations(cmd) {
    const violations = [...state.violations];
    if (cmd.clear === true) state.violations.length = 0;
    return { violations };
  },
};

let closing = false;
async function shutdown(code) {
  if (closing) return;
  closing = true;
  await bounded(browser.close(), 5000, 'close').catch((e) => log('close.error', { error: e.message }));
  process.exit(code);
}
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.on(sig, () => shutdown(0));

reply({ ready: true, version: browser.version() });

// Commands run one at a time, in order.
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    reply({ ok: false, error: `not JSON: ${e.message}` });
    continue;
  }
  if (cmd === null || typeof cmd !== 'object' || typeof cmd.op !== 'string') {
    reply({ ok: false, error: 'a command is a JSON object with a string "op"' });
    continue;
  }
  // An `id` is echoed, so a client that gave up on a slow answer can tell
  // it from the next one.
  const id = cmd.id ?? null;
  if (cmd.op === 'close') {
    reply({ ok: true, id });
    await shutdown(0);
    continue;
  }
  const op = Object.hasOwn(ops, cmd.op) ? ops[cmd.op] : undefined;
  if (!op) {
    reply({ ok: false, id, error: `unknown op ${JSON.stringify(cmd.op)}` });
    continue;
  }
  const timeout = Number.isInteger(cmd.timeout_ms) && cmd.timeout_ms > 0 ? cmd.timeout_ms : DEFAULT_TIMEOUT_MS;
  try {
    // A little more than the op's own timeout, so Playwright's clearer
    // message wins when it is the one that expires.
    const out = await bounded(op(cmd, timeout), timeout + 1000, cmd.op);
    reply({ ok: true, id, ...out });
  } catch (e) {
    reply({ ok: false, id, error: String(e?.message ?? e).split('\n')[0] });
  }
}
await shutdown(0);
