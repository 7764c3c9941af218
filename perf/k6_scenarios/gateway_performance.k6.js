// stellagw — k6 scenarios A–G (perf/README.md, "k6 scenarios"), with their SLO thresholds.
//
//   k6 run --env BASE_URL=http://127.0.0.1:8080 perf/k6_scenarios/gateway_performance.k6.js
//   k6 run --env BASE_URL=... --env SCENARIO=scenario_c_routing_throughput perf/k6_scenarios/gateway_performance.k6.js
//   k6 run --env BASE_URL=... --env SCENARIO=A,C --env SHORT=1 perf/k6_scenarios/gateway_performance.k6.js
//
// Usually started by `python -m perf k6`, which brings up the stack on loopback, aims this
// script at it and turns the output into a PerformanceTestSummary (models.py holds
// the same scenario table; tests/benchmarks/test_k6_short.py checks both agree through `k6 inspect`).
//
// Environment:
//   BASE_URL        gateway origin (default http://127.0.0.1:8080); must equal the
//                   gateway's gateway.http.publicOrigin when DPoP is on (it is the htu)
//   SCENARIO        all (default; run one after the other) | a comma list of names
//                   (scenario_c_routing_throughput), letters (C) or name parts (routing)
//   SHORT=1         CI mode: seconds per scenario, fewer VUs
//   RATE            override the offered rate (req/s) of C and G
//   RATE_LIMIT      the instance limit the gateway enforces for E (req/s, default 100);
//                   E offers twice this
//   ROUTES          "GET /a,POST /b": the routed scenarios send these instead of the demo
//                   services' routes (C and G pick one at random per request; D, E and F
//                   use the first)
//   THRESHOLD_SCALE multiply every latency threshold's limit (default 1); python -m perf k6
//                   sets it on machines too small to give k6 and the services CPUs of
//                   their own (perf/README.md)
//   RUN_ID          the middle of every request's X-Correlation-Id, k6.<RUN_ID>.<VU>.<n>,
//                   also put in its samples' metadata (the runner matches k6's samples to
//                   the gateway's access log by it)
//   DPoP (routed scenarios C–G; the health and OpenAPI built-ins are anonymous):
//     TOKEN_URL + CLIENT_ID + CLIENT_SECRET [+ SCOPE]: setup() makes a P-256 key, gets a
//                   DPoP-bound token (client_credentials) and every request signs a proof
//     ACCESS_TOKEN + DPOP_JWK: a token minted elsewhere, bound to this private JWK
//     none of these: requests go without Authorization
//     NONCE_PROBE_PATH: a routed path setup() asks once for a DPoP-Nonce (default
//                   /api/v1/policies), for gateways with dpopNonce.enabled
//   SUMMARY_JSON    where handleSummary writes the machine-readable summary
//
// DPoP: proofs are signed here, per request, with k6's WebCrypto (ECDSA P-256, ES256;
// ~50 µs of k6 CPU per proof), never pre-minted: a proof is single-use (jti), names the
// method and the exact URL, and is only accepted within the gateway's iat window, which
// rules out pools for the 2–10 minute scenarios and the per-id URLs of C. perf/README.md.

import http from 'k6/http';
import { check, sleep } from 'k6';
import encoding from 'k6/encoding';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const SHORT = /^(1|true|yes|on)$/i.test(__ENV.SHORT || '');
const RATE = __ENV.RATE ? parseInt(__ENV.RATE, 10) : null;
const RATE_LIMIT = parseInt(__ENV.RATE_LIMIT || '100', 10);
const GAP_S = 5; // between scenarios when several run in one k6 invocation
const THRESHOLD_SCALE = parseFloat(__ENV.THRESHOLD_SCALE || '1');
const RUN_ID = __ENV.RUN_ID || 'local';
const ROUTES = (__ENV.ROUTES || '').split(',').map((r) => r.trim()).filter(Boolean).map((r) => {
  const [method, ...path] = r.split(/\s+/);
  return { method: method.toUpperCase(), path: path.join(' ') };
});

// ---------------------------------------------------------------------------- metrics

const openapiNotModified = new Rate('openapi_not_modified'); // B: 304 share of conditional GETs
const openapiUnavailable = new Counter('openapi_unavailable'); // B: 404 (no /openapi.json yet)
const cidEchoed = new Rate('cid_echoed'); // D: X-Correlation-Id echoed unchanged
const cidWith = new Trend('cid_with_duration', true); // D: with the header
const cidWithout = new Trend('cid_without_duration', true); // D: without it
const ratelimited = new Rate('ratelimited'); // E: share of 429
const retryAfter = new Rate('ratelimit_retry_after'); // E: 429 carrying Retry-After
const status503 = new Counter('status_503'); // F (and everywhere): saturation
const authRejected = new Counter('auth_rejected'); // 401/403: a DPoP or token problem

// ---------------------------------------------------------------------------- scenarios
// Same table as models.py SCENARIOS beside it (VUs, durations, key metrics).

// Latencies only (models.py LATENCY_METRICS): error rates and shares are not excused by a
// small machine. The limit is printed as models.format_limit prints it.
const LATENCY_METRICS = ['http_req_duration', 'cid_overhead_p95_ms'];

function scaled(metric, expr) {
  if (THRESHOLD_SCALE === 1 || !LATENCY_METRICS.includes(metric)) return expr;
  const m = expr.match(/^(.*?)(<=|>=|===|==|!=|<|>)(-?\d+(?:\.\d+)?)$/);
  return `${m[1]}${m[2]}${Number((parseFloat(m[3]) * THRESHOLD_SCALE).toFixed(6))}`;
}

const NO_ERRORS = ['http_req_failed', 'rate<0.001'];

const TABLE = {
  scenario_a_health_baseline: {
    key: 'A', exec: 'healthBaseline', routed: false,
    full: { executor: 'constant-vus', vus: 10, duration: 60 },
    short: { executor: 'constant-vus', vus: 5, duration: 5 },
    thresholds: [['http_req_duration', 'p(95)<10'], NO_ERRORS],
  },
  scenario_b_openapi_etag: {
    key: 'B', exec: 'openapiEtag', routed: false,
    full: { executor: 'constant-vus', vus: 50, duration: 75 },
    short: { executor: 'constant-vus', vus: 10, duration: 5 },
    thresholds: [['http_req_duration', 'p(95)<200'], ['http_req_failed', 'rate<0.01']],
  },
  scenario_c_routing_throughput: {
    key: 'C', exec: 'routingThroughput', routed: true,
    full: { executor: 'constant-arrival-rate', vus: 200, duration: 120, rate: 1000 },
    short: { executor: 'constant-arrival-rate', vus: 20, duration: 5, rate: 200 },
    thresholds: [['http_req_duration', 'p(50)<2'], ['http_req_duration', 'p(99)<5'], NO_ERRORS],
  },
  scenario_d_correlation_id: {
    key: 'D', exec: 'correlationId', routed: true,
    full: { executor: 'constant-vus', vus: 20, duration: 60 },
    short: { executor: 'constant-vus', vus: 10, duration: 5 },
    thresholds: [['cid_echoed', 'rate>0.999', false], NO_ERRORS],
    derived: [['cid_overhead_p95_ms', 'value<5']],
  },
  scenario_e_rate_limit_boundary: {
    key: 'E', exec: 'rateLimitBoundary', routed: true,
    full: { executor: 'constant-arrival-rate', vus: 100, duration: 60, rate: 2 * RATE_LIMIT },
    short: { executor: 'constant-arrival-rate', vus: 20, duration: 5, rate: 2 * RATE_LIMIT },
    thresholds: [['ratelimit_retry_after', 'rate>0.999', false], ['ratelimited', 'rate>0.3', false],
      ['ratelimited', 'rate<0.7', false], ['http_req_failed', 'rate<0.001']],
  },
  scenario_f_connection_ramp: {
    key: 'F', exec: 'connectionRamp', routed: true,
    full: { executor: 'ramping-vus', vus: 1000, duration: 120 },
    short: { executor: 'ramping-vus', vus: 100, duration: 10 },
    thresholds: [['status_503', 'count<1', false], ['http_req_failed', 'rate<0.01']],
  },
  scenario_g_soak: {
    key: 'G', exec: 'soak', routed: true,
    full: { executor: 'constant-arrival-rate', vus: 50, duration: 600, rate: 500 },
    short: { executor: 'constant-arrival-rate', vus: 10, duration: 10, rate: 100 },
    thresholds: [['http_req_duration', 'p(99)<50'], NO_ERRORS],
    // gateway RSS growth is measured by `python -m perf k6` (it sees the processes).
  },
};

function selectScenarios(spec) {
  const names = Object.keys(TABLE);
  if (!spec || spec.toLowerCase() === 'all') return names;
  const out = [];
  for (const raw of spec.split(',')) {
    const ref = raw.trim();
    if (!ref) continue;
    let hit = names.filter((n) => n === ref);
    if (!hit.length) hit = names.filter((n) => TABLE[n].key === ref.toUpperCase());
    if (!hit.length) hit = names.filter((n) => n.includes(ref.toLowerCase()));
    if (hit.length !== 1) {
      throw new Error(`SCENARIO: unknown or ambiguous ${JSON.stringify(ref)}; one of ${names.join(', ')}`);
    }
    if (!out.includes(hit[0])) out.push(hit[0]);
  }
  return names.filter((n) => out.includes(n)); // table order
}

const SELECTED = selectScenarios(__ENV.SCENARIO || 'all');

function k6Scenario(name, startS) {
  const t = TABLE[name];
  const c = SHORT ? t.short : t.full;
  const common = { exec: t.exec, startTime: `${startS}s`, gracefulStop: '5s', tags: { sc: t.key } };
  let rate = c.rate;
  if (RATE && (t.key === 'C' || t.key === 'G')) rate = RATE;
  switch (c.executor) {
    case 'constant-vus':
      return { ...common, executor: 'constant-vus', vus: c.vus, duration: `${c.duration}s` };
    case 'constant-arrival-rate':
      return {
        ...common, executor: 'constant-arrival-rate', rate, timeUnit: '1s',
        duration: `${c.duration}s`, preAllocatedVUs: c.vus, maxVUs: c.vus,
      };
    case 'ramping-vus': {
      // Half the time ramping up, a third holding the peak, the rest ramping down.
      const up = Math.round(c.duration * 0.5);
      const hold = Math.round(c.duration / 3);
      return {
        ...common, executor: 'ramping-vus', startVUs: 0, gracefulRampDown: '3s',
        stages: [{ duration: `${up}s`, target: c.vus }, { duration: `${hold}s`, target: c.vus },
          { duration: `${c.duration - up - hold}s`, target: 0 }],
      };
    }
    default:
      throw new Error(`executor ${c.executor}`);
  }
}

function buildOptions() {
  const scenarios = {};
  const thresholds = {};
  let start = 0;
  for (const name of SELECTED) {
    scenarios[name] = k6Scenario(name, start);
    const c = SHORT ? TABLE[name].short : TABLE[name].full;
    start += c.duration + GAP_S;
    for (const [metric, expr, filtered] of TABLE[name].thresholds) {
      const key = filtered === false ? metric : `${metric}{scenario:${name}}`;
      (thresholds[key] = thresholds[key] || []).push(scaled(metric, expr));
    }
  }
  return {
    scenarios,
    thresholds,
    // Keep the JSON output small: no per-URL tags (C has one URL per scan id).
    systemTags: ['status', 'method', 'name', 'scenario', 'expected_response', 'check', 'error_code'],
    summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(50)', 'p(90)', 'p(95)', 'p(99)', 'count'],
    discardResponseBodies: true,
    setupTimeout: '30s',
    teardownTimeout: '10s',
    noConnectionReuse: false,
    userAgent: 'stellagw-k6/1',
  };
}

export const options = buildOptions();

// ---------------------------------------------------------------------------- requests

let requestSeq = 0;

function newCid() {
  requestSeq += 1;
  return `k6.${RUN_ID}.${exec.vu.idInTest}.${requestSeq}`;
}

// Every request carries a correlation id of its own (cid undefined: a new one; null: none),
// put in its samples' metadata as well, so the runner can match k6's duration and the
// gateway's access-log line of the same request.
function send(method, url, body, params, cid) {
  const id = cid === undefined ? newCid() : cid;
  const p = Object.assign({}, params);
  if (id) {
    p.headers = Object.assign({}, p.headers, { 'X-Correlation-Id': id });
    exec.vu.metrics.metadata.cid = id;
  }
  try {
    return http.request(method, url, body, p);
  } finally {
    delete exec.vu.metrics.metadata.cid;
  }
}

// The route D, E and F send (and setup's nonce probe asks): the first of ROUTES if given.
function singleRoute(method, path) {
  return ROUTES.length ? ROUTES[0] : { method, path };
}

// ---------------------------------------------------------------------------- bytes

// String to bytes for WebCrypto (k6 has no TextEncoder). A base64 round trip runs in Go:
// 10× faster than a JS loop over the characters (~12 µs vs ~120 µs for a proof's input).
function ascii(s) {
  return encoding.b64decode(encoding.b64encode(s));
}

function b64u(data) {
  return encoding.b64encode(data, 'rawurl');
}

function randomId(n) {
  const u = new Uint8Array(n);
  crypto.getRandomValues(u);
  return b64u(u.buffer);
}

// k6's exportKey drops a coordinate's leading zero bytes (about one key in a hundred); RFC
// 7518 §6.2.1.2 wants all 32, and an Authority that checks refuses the proof's jwk.
function fullLength(b64, n) {
  const raw = new Uint8Array(encoding.b64decode(b64, 'rawurl'));
  if (raw.length >= n) return b64;
  const out = new Uint8Array(n);
  out.set(raw, n - raw.length);
  return b64u(out.buffer);
}

function jwtClaims(token) {
  try {
    return JSON.parse(encoding.b64decode(token.split('.')[1], 'rawurl', 's'));
  } catch (e) {
    return {};
  }
}

// ---------------------------------------------------------------------------- DPoP (RFC 9449)

const EC = { name: 'ECDSA', namedCurve: 'P-256' };
const SIG = { name: 'ECDSA', hash: 'SHA-256' };

async function sha256b64u(text) {
  return b64u(await crypto.subtle.digest('SHA-256', ascii(text)));
}

// One signer per VU (a VU's CryptoKey cannot cross into another VU).
class Dpop {
  constructor(privateJwk) {
    this.jwk = privateJwk;
    this.key = null;
    this.header = b64u(JSON.stringify({
      typ: 'dpop+jwt', alg: 'ES256',
      jwk: { kty: 'EC', crv: 'P-256', x: privateJwk.x, y: privateJwk.y },
    }));
    this.nonce = null;
  }

  async proof(method, url, ath) {
    if (this.key === null) {
      this.key = await crypto.subtle.importKey('jwk', this.jwk, EC, false, ['sign']);
    }
    const claims = {
      jti: randomId(16), htm: method, htu: url.split('?')[0].split('#')[0],
      iat: Math.floor(Date.now() / 1000),
    };
    if (ath) claims.ath = ath;
    if (this.nonce) claims.nonce = this.nonce;
    const input = `${this.header}.${b64u(JSON.stringify(claims))}`;
    const sig = await crypto.subtle.sign(SIG, this.key, ascii(input));
    return `${input}.${b64u(sig)}`;
  }
}

async function fetchToken(dpop) {
  const form = {
    grant_type: 'client_credentials',
    client_id: __ENV.CLIENT_ID || 'demo-client',
    client_secret: __ENV.CLIENT_SECRET || 'demo-secret',
  };
  if (__ENV.SCOPE) form.scope = __ENV.SCOPE;
  for (let attempt = 0; attempt < 2; attempt++) {
    const res = http.post(__ENV.TOKEN_URL, form, {
      headers: { DPoP: await dpop.proof('POST', __ENV.TOKEN_URL, null), Accept: 'application/json' },
      tags: { name: 'token' }, responseType: 'text',
      responseCallback: http.expectedStatuses(200, 400),
    });
    let body = {};
    try { body = JSON.parse(res.body); } catch (e) { /* reported below */ }
    if (res.status === 400 && body.error === 'use_dpop_nonce' && res.headers['Dpop-Nonce'] && attempt === 0) {
      dpop.nonce = res.headers['Dpop-Nonce'];
      continue;
    }
    if (res.status !== 200 || !body.access_token) {
      throw new Error(`token endpoint ${__ENV.TOKEN_URL} answered ${res.status}: ${res.body}`);
    }
    return body.access_token;
  }
  throw new Error('token endpoint kept asking for a DPoP nonce');
}

// ---------------------------------------------------------------------------- setup

export async function setup() {
  const data = { auth: null, openapi: { available: null } };
  if (SELECTED.includes('scenario_b_openapi_etag')) {
    const r = http.get(`${BASE_URL}/openapi.json`, {
      tags: { name: 'setup' }, responseCallback: http.expectedStatuses(200, 404),
    });
    data.openapi = { available: r.status === 200, status: r.status, etag: r.headers.Etag || null };
    if (r.status === 404) {
      console.warn('B: /openapi.json answers 404 (not served by this gateway build): counted as openapi_unavailable');
    }
  }
  if (!SELECTED.some((n) => TABLE[n].routed)) return data;
  if (__ENV.ACCESS_TOKEN && __ENV.DPOP_JWK) {
    data.auth = { token: __ENV.ACCESS_TOKEN, jwk: JSON.parse(__ENV.DPOP_JWK), refresh: false };
  } else if (__ENV.TOKEN_URL) {
    const pair = await crypto.subtle.generateKey(EC, true, ['sign', 'verify']);
    const jwk = await crypto.subtle.exportKey('jwk', pair.privateKey);
    for (const c of ['x', 'y', 'd']) jwk[c] = fullLength(jwk[c], 32);
    const token = await fetchToken(new Dpop(jwk));
    data.auth = { token, jwk, refresh: true };
  }
  if (data.auth) {
    const c = jwtClaims(data.auth.token);
    data.auth.exp = c.exp || 0;
    data.auth.jkt = c.cnf ? c.cnf.jkt : null;
    data.auth.nonce = await gatewayNonce(data.auth);
  }
  return data;
}

// A gateway with dpopNonce.enabled answers a proof without a nonce 401 use_dpop_nonce +
// DPoP-Nonce. Ask once here, so VUs start with a nonce (they are stateless and shared) and
// the challenge does not show up as a failed request in the scenario; later nonces come on
// successful responses (RFC 9449 §8.2) and a VU still retries once on a challenge.
async function gatewayNonce(auth) {
  const url = `${BASE_URL}${__ENV.NONCE_PROBE_PATH || singleRoute('GET', '/api/v1/policies').path}`;
  const dpop = new Dpop(auth.jwk);
  const res = http.get(url, {
    headers: { Authorization: `DPoP ${auth.token}`, DPoP: await dpop.proof('GET', url, await sha256b64u(auth.token)) },
    tags: { name: 'setup' }, responseCallback: http.expectedStatuses({ min: 200, max: 499 }),
  });
  return (res.status === 401 && res.headers['Dpop-Nonce']) ? res.headers['Dpop-Nonce'] : null;
}

// ---------------------------------------------------------------------------- per-VU auth

let vuAuth = null; // { dpop, token, ath, exp, refresh }

async function authHeaders(data, method, url) {
  if (!data.auth) return {};
  if (vuAuth === null) {
    vuAuth = { dpop: new Dpop(data.auth.jwk), token: data.auth.token, exp: data.auth.exp, refresh: data.auth.refresh };
    vuAuth.ath = await sha256b64u(vuAuth.token);
    vuAuth.dpop.nonce = data.auth.nonce || null;
  }
  // Short-lived tokens (2–5 min at the real Authority) outlive a soak: renew per VU.
  if (vuAuth.refresh && vuAuth.exp && vuAuth.exp - Date.now() / 1000 < 30) {
    vuAuth.token = await fetchToken(vuAuth.dpop);
    vuAuth.exp = jwtClaims(vuAuth.token).exp || 0;
    vuAuth.ath = await sha256b64u(vuAuth.token);
  }
  return { Authorization: `DPoP ${vuAuth.token}`, DPoP: await vuAuth.dpop.proof(method, url, vuAuth.ath) };
}

// One routed request, DPoP-signed when auth is on; retried once on a DPoP-Nonce challenge.
async function routed(data, method, path, { body = null, headers = {}, name = path, params = {}, cid } = {}) {
  const url = `${BASE_URL}${path}`;
  let res;
  for (let attempt = 0; attempt < 2; attempt++) {
    const h = Object.assign({}, headers, await authHeaders(data, method, url));
    if (body !== null) h['Content-Type'] = 'application/json';
    res = send(method, url, body, Object.assign({ headers: h, tags: { name } }, params), cid);
    if (res.status === 401 && vuAuth && res.headers['Dpop-Nonce'] && attempt === 0
        && /use_dpop_nonce/.test(res.headers['Www-Authenticate'] || '')) {
      vuAuth.dpop.nonce = res.headers['Dpop-Nonce'];
      continue;
    }
    break;
  }
  if (vuAuth && res.headers['Dpop-Nonce']) vuAuth.dpop.nonce = res.headers['Dpop-Nonce'];
  common(res);
  return res;
}

function common(res) {
  if (res.status === 503) status503.add(1);
  if (res.status === 401 || res.status === 403) authRejected.add(1);
}

// ---------------------------------------------------------------------------- A

export function healthBaseline() {
  const res = send('GET', `${BASE_URL}/health/live`, null, { tags: { name: '/health/live' } });
  common(res);
  check(res, { 'health 200': (r) => r.status === 200 });
}

// ---------------------------------------------------------------------------- B

let etag = null;

export function openapiEtag(data) {
  const headers = {};
  if (etag) headers['If-None-Match'] = etag;
  const accept = data.openapi.available === false ? [200, 304, 404] : [200, 304];
  const res = send('GET', `${BASE_URL}/openapi.json`, null, {
    headers, tags: { name: '/openapi.json' }, responseCallback: http.expectedStatuses(...accept),
  });
  common(res);
  if (res.status === 404) {
    openapiUnavailable.add(1);
    return;
  }
  if (etag) openapiNotModified.add(res.status === 304);
  if (res.status === 200 && res.headers.Etag) etag = res.headers.Etag;
  check(res, { 'openapi 200/304': (r) => r.status === 200 || r.status === 304 });
}

// ---------------------------------------------------------------------------- C and G

const JSON_BODY = JSON.stringify({ image: 'alpine:3.20' });

async function mixedRequest(data) {
  const roll = Math.random();
  let res;
  if (ROUTES.length) {
    const route = ROUTES[Math.floor(roll * ROUTES.length)];
    const body = ['POST', 'PUT', 'PATCH'].includes(route.method) ? JSON_BODY : null;
    res = await routed(data, route.method, route.path, { body, name: `${route.method} ${route.path}` });
  } else if (roll < 0.5) {
    const id = 1 + Math.floor(Math.random() * 1000);
    res = await routed(data, 'GET', `/api/v1/scans/${id}`, { name: 'GET /api/v1/scans/{id}' });
  } else if (roll < 0.7) {
    res = await routed(data, 'POST', '/api/v1/scans', { body: JSON_BODY, name: 'POST /api/v1/scans' });
  } else if (roll < 0.9) {
    res = await routed(data, 'GET', '/api/v1/policies', { name: 'GET /api/v1/policies' });
  } else {
    res = await routed(data, 'GET', '/bench/hello', { name: 'GET /bench/hello' });
  }
  check(res, { 'routed 2xx': (r) => r.status >= 200 && r.status < 300 });
}

export async function routingThroughput(data) {
  await mixedRequest(data);
}

export async function soak(data) {
  await mixedRequest(data);
}

// ---------------------------------------------------------------------------- D

export async function correlationId(data) {
  const withHeader = __ITER % 2 === 0;
  const cid = withHeader ? newCid() : null;
  const route = singleRoute('GET', '/api/v1/policies');
  const name = `${route.method} ${route.path}`;
  const res = await routed(data, route.method, route.path, {
    cid, name, params: { tags: { name, cid: withHeader ? 'with' : 'without' } },
  });
  const echoed = res.headers['X-Correlation-Id'];
  if (withHeader) {
    cidWith.add(res.timings.duration);
    cidEchoed.add(echoed === cid);
  } else {
    cidWithout.add(res.timings.duration);
    cidEchoed.add(typeof echoed === 'string' && echoed.length > 0); // one is made up for us
  }
  check(res, { 'routed 2xx': (r) => r.status >= 200 && r.status < 300 });
  // Paced (~20 req/s per VU): an overhead of microseconds is invisible under saturation,
  // where queueing sets the p95.
  sleep(0.05);
}

// ---------------------------------------------------------------------------- E

export async function rateLimitBoundary(data) {
  const route = singleRoute('GET', '/bench/hello');
  const res = await routed(data, route.method, route.path, {
    name: `${route.method} ${route.path}`, params: { responseCallback: http.expectedStatuses({ min: 200, max: 299 }, 429) },
  });
  ratelimited.add(res.status === 429);
  if (res.status === 429) {
    const ra = res.headers['Retry-After'];
    retryAfter.add(ra !== undefined && /^\d+$/.test(ra) && parseInt(ra, 10) >= 1);
  }
  check(res, { '200 or 429': (r) => r.status === 200 || r.status === 429 });
}

// ---------------------------------------------------------------------------- F

export async function connectionRamp(data) {
  const route = singleRoute('GET', '/bench/hello');
  const res = await routed(data, route.method, route.path, { name: `${route.method} ${route.path}` });
  check(res, { 'no 503': (r) => r.status !== 503, 'routed 2xx': (r) => r.status >= 200 && r.status < 300 });
  sleep(1); // hold the keep-alive connection: F is about connections, not request rate
}

// ---------------------------------------------------------------------------- summary

function metricValue(data, name, stat) {
  const m = data.metrics[name];
  return m && m.values && m.values[stat] !== undefined ? m.values[stat] : null;
}

function derived(data) {
  const out = {};
  if (SELECTED.includes('scenario_d_correlation_id')) {
    const w = metricValue(data, 'cid_with_duration', 'p(95)');
    const wo = metricValue(data, 'cid_without_duration', 'p(95)');
    const v = w !== null && wo !== null ? w - wo : null;
    const expression = scaled('cid_overhead_p95_ms', 'value<5');
    const limit = parseFloat(expression.split('<')[1]);
    out.cid_overhead_p95_ms = { value: v, expression, ok: v !== null && v < limit, with_p95_ms: w, without_p95_ms: wo };
  }
  return out;
}

function textSummary(data, d) {
  const lines = [`stellagw k6: ${SELECTED.join(', ')}${SHORT ? ' (short)' : ''} against ${BASE_URL}`];
  for (const [name, m] of Object.entries(data.metrics)) {
    if (!m.thresholds) continue;
    for (const [expr, t] of Object.entries(m.thresholds)) {
      const stat = expr.split(/[<>=!]/)[0].trim();
      const v = m.values[stat === 'p(50)' ? 'p(50)' : stat];
      lines.push(`  ${t.ok ? 'ok  ' : 'FAIL'} ${name} ${expr}   observed ${v === undefined ? '-' : Number(v).toFixed(3)}`);
    }
  }
  for (const [name, r] of Object.entries(d)) {
    lines.push(`  ${r.ok ? 'ok  ' : 'FAIL'} ${name} ${r.expression}   observed ${r.value === null ? '-' : r.value.toFixed(3)} (derived)`);
  }
  const reqs = metricValue(data, 'http_reqs', 'count');
  const rate = metricValue(data, 'http_reqs', 'rate');
  const p50 = metricValue(data, 'http_req_duration', 'p(50)');
  const p99 = metricValue(data, 'http_req_duration', 'p(99)');
  lines.push(`  ${reqs} requests, ${rate === null ? '-' : rate.toFixed(0)} req/s, p50 ${p50 === null ? '-' : p50.toFixed(2)} ms, p99 ${p99 === null ? '-' : p99.toFixed(2)} ms`);
  return `${lines.join('\n')}\n`;
}

export function handleSummary(data) {
  const d = derived(data);
  const out = {
    stdout: textSummary(data, d),
  };
  if (__ENV.SUMMARY_JSON) {
    out[__ENV.SUMMARY_JSON] = JSON.stringify({
      selected: SELECTED, short: SHORT, base_url: BASE_URL, options: { scenarios: options.scenarios, thresholds: options.thresholds },
      derived: d, metrics: data.metrics, state: data.state, setup_data: data.setup_data ? { auth: !!data.setup_data.auth, openapi: data.setup_data.openapi } : null,
    }, null, 1);
  }
  return out;
}
