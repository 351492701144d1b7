// How agents and the CLI reach the coordinator: grpcs://HOST:PORT (TLS,
// pinned by SPKI fingerprint or verified against the system CAs),
// grpc://HOST:PORT (plaintext, only when asked for) or unix:///PATH (the
// coordinator's local admin socket).
import { X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { checkServerIdentity, connect } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { spkiOf } from './fingerprint.js';

export class DialError extends Error {
  override name = 'DialError';
}

export interface Endpoint {
  target: string;
  credentials: grpc.ChannelCredentials;
  /** What to name in messages. */
  display: string;
  options: grpc.ChannelOptions;
}

export interface DialOptions {
  /** "sha256:HEX" of the coordinator's public key; empty to trust the system CAs. */
  fingerprint?: string;
  timeoutMs?: number;
}

export function parseCoordinatorUrl(url: string): {
  scheme: 'grpcs' | 'grpc' | 'unix';
  host: string;
  port: number;
  path: string;
} {
  const unix = /^unix:\/\/(\/.+)$/.exec(url);
  if (unix) return { scheme: 'unix', host: '', port: 0, path: unix[1]! };
  const m = /^(grpcs?|https):\/\/(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?\/?$/.exec(url);
  if (!m)
    throw new DialError(
      `invalid coordinator address "${url}": use grpcs://HOST:PORT, grpc://HOST:PORT or unix:///PATH`,
    );
  const scheme = m[1] === 'grpc' ? 'grpc' : 'grpcs';
  return { scheme, host: m[2]!, port: Number(m[3] ?? 7443), path: '' };
}

function normalizeFingerprint(fp: string): string {
  const hex = fp
    .toLowerCase()
    .replace(/^sha256:/, '')
    .replace(/:/g, '');
  if (!/^[0-9a-f]{64}$/.test(hex))
    throw new DialError('invalid fingerprint: expected sha256: followed by 64 hex digits');
  return `sha256:${hex}`;
}

/** Fetches the server certificate once, to trust it as its own root when its key matches the pin. */
function fetchPinnedCertificate(
  host: string,
  port: number,
  fingerprint: string,
  timeoutMs: number,
): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({
      host: host.replace(/^\[|\]$/g, ''),
      port,
      rejectUnauthorized: false,
      ALPNProtocols: ['h2'],
      servername: /^[\d.:[\]]+$/.test(host) ? undefined : host,
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(
        new DialError(`cannot reach coordinator at ${host}:${port}: timed out after ${timeoutMs / 1000}s`),
      );
    }, timeoutMs);
    socket.once('secureConnect', () => {
      clearTimeout(timer);
      const raw = socket.getPeerCertificate(false)?.raw;
      socket.end();
      if (!raw) return reject(new DialError(`coordinator at ${host}:${port} sent no certificate`));
      const pem = new X509Certificate(raw).toString();
      const got = spkiOf(pem);
      if (got !== fingerprint) {
        return reject(
          new DialError(
            `fingerprint mismatch for ${host}:${port}: expected ${fingerprint}, server has ${got}`,
          ),
        );
      }
      resolve(pem);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(
        NOT_TLS.has(err.code ?? '')
          ? notTls(`${host}:${port}`)
          : new DialError(`cannot reach coordinator at ${host}:${port}: ${err.code ?? err.message}`),
      );
    });
  });
}

export async function dial(url: string, opts: DialOptions = {}): Promise<Endpoint> {
  const u = parseCoordinatorUrl(url);
  if (u.scheme === 'unix')
    return {
      target: `unix://${u.path}`,
      credentials: grpc.credentials.createInsecure(),
      display: u.path,
      options: {},
    };
  const target = `${u.host}:${u.port}`;
  if (u.scheme === 'grpc')
    return { target, credentials: grpc.credentials.createInsecure(), display: target, options: {} };
  const ip = isIP(u.host.replace(/^\[|\]$/g, '')) !== 0;
  if (!opts.fingerprint) {
    if (!ip) return { target, credentials: grpc.credentials.createSsl(), display: target, options: {} };
    // SNI must not be an IP address (Node warns); the certificate is still checked against the IP itself.
    const address = u.host.replace(/^\[|\]$/g, '');
    const credentials = grpc.credentials.createSsl(null, null, null, {
      checkServerIdentity: (_host, cert) => checkServerIdentity(address, cert),
    });
    return { target, credentials, display: target, options: { 'grpc.ssl_target_name_override': SNI } };
  }
  const pin = normalizeFingerprint(opts.fingerprint);
  const pem = await fetchPinnedCertificate(u.host, u.port, pin, opts.timeoutMs ?? 10_000);
  const credentials = grpc.credentials.createSsl(Buffer.from(pem), null, null, {
    // The pin replaces the host name check: the key is what identifies the coordinator.
    checkServerIdentity: (_host, cert) =>
      spkiOf(new X509Certificate(cert.raw).toString()) === pin
        ? undefined
        : new DialError('coordinator key changed during connect'),
  });
  // SNI must not be an IP address; with a pin the name is not checked anyway.
  const options = ip ? { 'grpc.ssl_target_name_override': SNI } : {};
  return { target, credentials, display: target, options };
}

const SNI = 'meshgate-coordinator';

/** What a TLS client sees when the other side answers its hello with plaintext, or hangs up on it. */
const NOT_TLS = new Set(['ERR_SSL_WRONG_VERSION_NUMBER', 'ERR_SSL_PACKET_LENGTH_TOO_LONG', 'ECONNRESET']);

const notTls = (at: string) =>
  new DialError(
    `coordinator at ${at} does not speak TLS: use grpc://${at} if it was started with --plaintext`,
  );

/** What one TLS handshake with rejectUnauthorized off tells about an address. */
type Probe =
  | { kind: 'tls'; authorizationError: string | null }
  | { kind: 'not-tls' }
  | { kind: 'unreachable'; reason: string };

function probeTls(host: string, port: number, timeoutMs: number): Promise<Probe> {
  return new Promise((resolve) => {
    const address = host.replace(/^\[|\]$/g, '');
    const socket = connect({
      host: address,
      port,
      rejectUnauthorized: false,
      ALPNProtocols: ['h2'],
      servername: isIP(address) ? undefined : address,
    });
    const done = (p: Probe) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(p);
    };
    const timer = setTimeout(
      () => done({ kind: 'unreachable', reason: `timed out after ${timeoutMs / 1000}s` }),
      timeoutMs,
    );
    socket.once('secureConnect', () => {
      const e = socket.authorizationError as (Error & { code?: string }) | string | null;
      done({
        kind: 'tls',
        authorizationError: e ? (typeof e === 'string' ? e : (e.code ?? e.message)) : null,
      });
    });
    socket.once('error', (err: NodeJS.ErrnoException) =>
      done(
        NOT_TLS.has(err.code ?? '')
          ? { kind: 'not-tls' }
          : { kind: 'unreachable', reason: err.code ?? err.message },
      ),
    );
  });
}

const SELF_SIGNED = new Set(['DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN']);

/**
 * Why a call to `url` found the coordinator unavailable, in words a person can act on: one TLS handshake
 * tells a closed port from a TLS port dialled as plaintext, a plaintext port dialled as TLS, and a
 * certificate that needs a pinned fingerprint. Null when the probe sees nothing wrong.
 */
export async function explainUnavailable(url: string, opts: DialOptions = {}): Promise<DialError | null> {
  const u = parseCoordinatorUrl(url);
  if (u.scheme === 'unix') return null;
  const at = `${u.host}:${u.port}`;
  const probe = await probeTls(u.host, u.port, opts.timeoutMs ?? 5_000);
  if (probe.kind === 'unreachable')
    return new DialError(`cannot reach coordinator at ${at}: ${probe.reason}`);
  if (u.scheme === 'grpc')
    return probe.kind === 'tls'
      ? new DialError(
          `coordinator at ${at} speaks TLS: use grpcs://${at} with --fingerprint (grpc:// is for a coordinator started with --plaintext)`,
        )
      : null;
  if (probe.kind === 'not-tls') return notTls(at);
  if (opts.fingerprint || !probe.authorizationError) return null;
  const pin =
    'pin its key with --fingerprint sha256:… (or MESHGATE_FINGERPRINT): the coordinator prints it when it starts, and "meshgate coordinator fingerprint" prints it on its host';
  return SELF_SIGNED.has(probe.authorizationError)
    ? new DialError(`coordinator at ${at} has a self-signed certificate: ${pin}`)
    : new DialError(
        `coordinator at ${at} has a certificate this host does not trust (${probe.authorizationError}): ${pin}`,
      );
}
