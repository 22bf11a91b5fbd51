// A real OpenID provider for ztmesh's browser-login tests: `oidc-provider`
// (OpenID Certified) served over HTTPS, with plain interaction pages whose
// elements a test can drive (`#login`, `#password`, `#submit`, `#continue`).
//
//   node idp.mjs --config CONFIG.json --cert CERT.pem --key KEY.pem --listen IP:PORT [--issuer URL]
//
// CONFIG.json (written by tests/src/web.rs, `IdpConfig`):
//   { "clients": [{ "client_id", "client_secret" (null: public client),
//                   "redirect_uris": [...], "consent": false }],
//     "users":   [{ "login", "password", "sub", "email", "email_verified",
//                   "groups": [...], "amr": [...], "acr": null | "...",
//                   "tamper": null | { "shift_time_secs", "set_claims": {...},
//                                      "remove_claims": [...], "signature" } }],
//     "id_token_ttl_secs", "access_token_ttl_secs", "code_ttl_secs" }
//
// `tamper` makes the provider misbehave for that user, to test what a relying
// party refuses: the ID token from the token endpoint is rewritten (times
// shifted, claims set or removed) and signed again: `"provider"` with the
// provider's key, `"none"` as `alg: none` with no signature, `"foreign_key"`
// with another key under the provider's `kid`, `"unknown_kid"` with another
// key under a `kid` the JWKS does not have.
//
// Prints one JSON line `{"ready":true,"issuer":...}` on stdout once listening;
// everything else (one JSON object a line) goes to stderr.

import {
  createPrivateKey, generateKeyPairSync, randomBytes, sign, timingSafeEqual,
} from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import Provider from 'oidc-provider';

const MAX_BODY = 64 * 1024;

function log(event, fields = {}) {
  process.stderr.write(`${JSON.stringify({ event, ...fields })}\n`);
}

function fail(message) {
  log('fatal', { error: message });
  process.exit(2);
}

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    const value = argv[i + 1];
    if (!key?.startsWith('--') || value === undefined) {
      fail(`usage: idp.mjs --config FILE --cert FILE --key FILE --listen IP:PORT [--issuer URL] (bad argument ${key})`);
    }
    out[key.slice(2)] = value;
  }
  for (const need of ['config', 'cert', 'key', 'listen']) {
    if (!out[need]) fail(`missing --${need}`);
  }
  return out;
}

// "198.18.0.1:8443" or "[fd00::1]:8443" -> { host, port }.
function parseListen(listen) {
  const m = /^\[([0-9a-fA-F:.]+)\]:(\d+)$/.exec(listen) ?? /^([0-9.]+):(\d+)$/.exec(listen);
  if (!m) fail(`--listen must be IPV4:PORT or [IPV6]:PORT, got ${listen}`);
  const port = Number(m[2]);
  if (!(port > 0 && port < 65536)) fail(`bad port in --listen ${listen}`);
  return { host: m[1], port, v6: listen.startsWith('[') };
}

function loadConfig(path) {
  let cfg;
  try {
    cfg = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    fail(`read config ${path}: ${e.message}`);
  }
  if (!Array.isArray(cfg.clients) || cfg.clients.length === 0) fail('config: at least one client is needed');
  if (!Array.isArray(cfg.users)) fail('config: users must be a list');
  const logins = new Set();
  for (const u of cfg.users) {
    if (typeof u.login !== 'string' || typeof u.password !== 'string' || typeof u.sub !== 'string') {
      fail('config: every user needs login, password and sub (strings)');
    }
    if (logins.has(u.login)) fail(`config: duplicate login ${u.login}`);
    const signature = u.tamper?.signature ?? 'provider';
    if (!['provider', 'none', 'foreign_key', 'unknown_kid'].includes(signature)) {
      fail(`config: user ${u.login}: unknown tamper signature ${signature}`);
    }
    logins.add(u.login);
  }
  return cfg;
}

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// Every page: no script, no style, no frames; `form-action` is left out on
// purpose because Chromium applies it to the whole redirect chain that ends at
// the client's redirect_uri.
const PAGE_CSP = "default-src 'none'; base-uri 'none'; frame-ancestors 'none'";

function page(res, status, title, body) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'content-security-policy': PAGE_CSP,
    'cache-control': 'no-store',
    'x-content-type-options': 'nosniff',
  });
  res.end(`<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title></head>\n<body>\n<h1 id="title">${esc(title)}</h1>\n${body}\n</body></html>\n`);
}

function readForm(req) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(new URLSearchParams(Buffer.concat(chunks).toString('utf8'))));
    req.on('error', reject);
  });
}

function sameSecret(a, b) {
  const x = Buffer.from(a, 'utf8');
  const y = Buffer.from(b, 'utf8');
  return x.length === y.length && timingSafeEqual(x, y);
}

const args = parseArgs(process.argv.slice(2));
const listen = parseListen(args.listen);
const cfg = loadConfig(args.config);
const issuer = args.issuer ?? `https://${listen.v6 ? `[${listen.host}]` : listen.host}:${listen.port}`;

const usersByLogin = new Map(cfg.users.map((u) => [u.login, u]));
const usersBySub = new Map(cfg.users.map((u) => [u.sub, u]));
const askConsent = new Map(cfg.clients.map((c) => [c.client_id, c.consent === true]));

const signingKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
signingKey.kid = randomBytes(8).toString('hex');
signingKey.use = 'sig';
signingKey.alg = 'RS256';
const providerKey = createPrivateKey({ key: signingKey, format: 'jwk' });
const foreignKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;

const clients = cfg.clients.map((c) => ({
  client_id: c.client_id,
  ...(c.client_secret == null
    ? { token_endpoint_auth_method: 'none' }
    : { client_secret: c.client_secret, token_endpoint_auth_method: 'client_secret_basic' }),
  redirect_uris: c.redirect_uris,
  grant_types: ['authorization_code'],
  response_types: ['code'],
}));

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  // ID tokens carry the scope's claims (not only `sub`), as most providers do.
  conformIdTokenClaims: false,
  claims: {
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  responseTypes: ['code'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    userinfo: { enabled: true },
  },
  ttl: {
    AccessToken: cfg.access_token_ttl_secs ?? 300,
    AuthorizationCode: cfg.code_ttl_secs ?? 60,
    IdToken: cfg.id_token_ttl_secs ?? 300,
    Grant: 3600,
    Interaction: 600,
    Session: 3600,
  },
  async findAccount(_ctx, sub) {
    const user = usersBySub.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          email: user.email ?? undefined,
          email_verified: user.email_verified ?? undefined,
          groups: user.groups ?? [],
          name: user.name ?? user.login,
          preferred_username: user.login,
        };
      },
    };
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  async renderError(ctx, out, error) {
    log('render_error', { error: out.error, description: out.error_description, detail: String(error) });
    ctx.type = 'html';
    ctx.set('content-security-policy', PAGE_CSP);
    ctx.body = `<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Error</title></head>\n<body>\n<h1 id="title">Error</h1>\n<p id="error">${esc(out.error)}</p>\n<p id="error_description">${esc(out.error_description ?? '')}</p>\n</body></html>\n`;
  },
});

for (const event of ['server_error', 'authorization.error', 'grant.error', 'userinfo.error', 'end_session.error']) {
  provider.on(event, (ctx, err) => log(event, { error: err?.message, description: err?.error_description }));
}
provider.on('grant.success', (ctx) => log('grant.success', { client_id: ctx.oidc.client?.clientId }));
provider.on('authorization_code.consumed', (code) => log('code.consumed', { client_id: code.clientId }));

const b64url = (buf) => Buffer.from(buf).toString('base64url');

// The ID token `tamper` asks for (see the header), from the one the provider issued.
function tamperIdToken(idToken, tamper) {
  const [, payloadPart] = idToken.split('.');
  const claims = JSON.parse(Buffer.from(payloadPart, 'base64url').toString('utf8'));
  const shift = Number(tamper.shift_time_secs ?? 0);
  for (const claim of ['iat', 'exp', 'auth_time', 'nbf']) {
    if (typeof claims[claim] === 'number') claims[claim] += shift;
  }
  Object.assign(claims, tamper.set_claims ?? {});
  for (const claim of tamper.remove_claims ?? []) delete claims[claim];
  const signature = tamper.signature ?? 'provider';
  if (signature === 'none') {
    return `${b64url(JSON.stringify({ alg: 'none', typ: 'JWT' }))}.${b64url(JSON.stringify(claims))}.`;
  }
  const key = signature === 'provider' ? providerKey : foreignKey;
  const kid = signature === 'unknown_kid' ? `${signingKey.kid}-unknown` : signingKey.kid;
  const input = `${b64url(JSON.stringify({ alg: 'RS256', typ: 'JWT', kid }))}.${b64url(JSON.stringify(claims))}`;
  return `${input}.${b64url(sign('sha256', Buffer.from(input), key))}`;
}

provider.use(async (ctx, next) => {
  await next();
  const body = ctx.body;
  if (ctx.method !== 'POST' || ctx.path !== '/token' || ctx.status !== 200 || typeof body?.id_token !== 'string') {
    return;
  }
  const sub = JSON.parse(Buffer.from(body.id_token.split('.')[1], 'base64url').toString('utf8')).sub;
  const tamper = usersBySub.get(sub)?.tamper;
  if (tamper) {
    body.id_token = tamperIdToken(body.id_token, tamper);
    log('id_token.tampered', { sub, signature: tamper.signature ?? 'provider' });
  }
});

function loginForm(res, uid, clientId, error) {
  page(res, error ? 401 : 200, 'Sign in', `<p id="client">${esc(clientId)}</p>
${error ? `<p id="error">${esc(error)}</p>\n` : ''}<form method="post" action="/interaction/${esc(uid)}/login">
<label>Login <input id="login" name="login" autocomplete="username" autofocus></label>
<label>Password <input id="password" name="password" type="password" autocomplete="current-password"></label>
<button id="submit" type="submit">Sign in</button>
</form>
<form method="post" action="/interaction/${esc(uid)}/abort"><button id="abort" type="submit">Cancel</button></form>`);
}

async function grantConsent(req, res, details) {
  const { prompt, params, session, grantId } = details;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const d = prompt.details;
  if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
  if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(d.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const saved = await grant.save();
  const result = grantId ? {} : { consent: { grantId: saved } };
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
}

// GET /interaction/UID, POST /interaction/UID/{login,confirm,abort}.
async function interaction(req, res, url) {
  const parts = url.pathname.split('/').filter(Boolean);
  const [, uid, action] = parts;
  if (parts.length < 2 || parts.length > 3 || !/^[A-Za-z0-9_-]{1,64}$/.test(uid)) {
    page(res, 404, 'Not found', '<p id="error">no such page</p>');
    return;
  }
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (e) {
    page(res, 400, 'Error', `<p id="error">${esc(e.error ?? 'invalid_request')}</p><p id="error_description">${esc(e.error_description ?? e.message)}</p>`);
    return;
  }
  if (details.uid !== uid) {
    page(res, 400, 'Error', '<p id="error">interaction mismatch</p>');
    return;
  }
  const clientId = details.params.client_id;
  const prompt = details.prompt.name;
  if (req.method === 'GET' && !action) {
    if (prompt === 'login') {
      loginForm(res, uid, clientId);
    } else if (prompt === 'consent' && !askConsent.get(clientId)) {
      await grantConsent(req, res, details);
    } else if (prompt === 'consent') {
      const scopes = details.prompt.details.missingOIDCScope ?? [];
      page(res, 200, 'Authorize', `<p id="client">${esc(clientId)}</p>
<p id="scopes">${esc(scopes.join(' '))}</p>
<form method="post" action="/interaction/${esc(uid)}/confirm"><button id="continue" type="submit">Continue</button></form>
<form method="post" action="/interaction/${esc(uid)}/abort"><button id="abort" type="submit">Cancel</button></form>`);
    } else {
      page(res, 400, 'Error', `<p id="error">unexpected prompt ${esc(prompt)}</p>`);
    }
    return;
  }
  if (req.method !== 'POST' || !action) {
    page(res, 405, 'Error', '<p id="error">method not allowed</p>');
    return;
  }
  const form = await readForm(req);
  if (action === 'login' && prompt === 'login') {
    const user = usersByLogin.get(form.get('login') ?? '');
    if (!user || !sameSecret(user.password, form.get('password') ?? '')) {
      log('login.failed', { login: form.get('login') });
      loginForm(res, uid, clientId, 'wrong login or password');
      return;
    }
    log('login.success', { login: user.login, client_id: clientId });
    const amr = Array.isArray(user.amr) && user.amr.length ? user.amr : undefined;
    await provider.interactionFinished(
      req,
      res,
      { login: { accountId: user.sub, amr, acr: user.acr ?? undefined } },
      { mergeWithLastSubmission: false },
    );
  } else if (action === 'confirm' && prompt === 'consent') {
    await grantConsent(req, res, details);
  } else if (action === 'abort') {
    await provider.interactionFinished(
      req,
      res,
      { error: 'access_denied', error_description: 'the user cancelled the sign-in' },
      { mergeWithLastSubmission: false },
    );
  } else {
    page(res, 400, 'Error', `<p id="error">unexpected ${esc(action)} during ${esc(prompt)}</p>`);
  }
}

const callback = provider.callback();
const server = createServer(
  { cert: readFileSync(args.cert), key: readFileSync(args.key) },
  (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname.startsWith('/interaction/')) {
      interaction(req, res, url).catch((e) => {
        log('interaction.error', { error: e.message });
        if (!res.headersSent) page(res, 500, 'Error', `<p id="error">${esc(e.message)}</p>`);
        else res.end();
      });
      return;
    }
    callback(req, res);
  },
);
server.on('tlsClientError', (e) => log('tls.error', { error: e.message }));
server.on('error', (e) => fail(`listen ${args.listen}: ${e.message}`));
server.listen(listen.port, listen.host, () => {
  log('listening', { issuer, clients: cfg.clients.length, users: cfg.users.length });
  process.stdout.write(`${JSON.stringify({ ready: true, issuer })}\n`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
