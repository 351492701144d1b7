// Downloads a release over HTTPS: from the coordinator's HTTPS port pinned by
// the fingerprint the agent already uses for the control API, or from an
// artifact URL elsewhere checked against the system CAs. What arrives is
// verified against the signed manifest afterwards either way.

import { createHash, X509Certificate } from 'node:crypto';
import { get as httpsGet, type RequestOptions } from 'node:https';
import type { TLSSocket } from 'node:tls';
import { ReleaseError } from '../../release/manifest.js';

export interface DownloadOptions {
  /** "sha256:HEX" of the server's key; unset: the system CAs decide. */
  fingerprint?: string;
  maxBytes: number;
  timeoutMs?: number;
}

function spkiOfDer(cert: Buffer): string {
  const spki = new X509Certificate(cert).publicKey.export({ type: 'spki', format: 'der' });
  return `sha256:${createHash('sha256').update(spki).digest('hex')}`;
}

export function download(url: string, opts: DownloadOptions): Promise<Buffer> {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return Promise.reject(new ReleaseError(`invalid release URL ${url}`));
  }
  if (parsed.protocol !== 'https:')
    return Promise.reject(new ReleaseError(`release URL ${url} is not https`));
  const pin =
    opts.fingerprint &&
    `sha256:${opts.fingerprint
      .toLowerCase()
      .replace(/^sha256:/, '')
      .replace(/:/g, '')}`;
  const options: RequestOptions = {
    timeout: opts.timeoutMs ?? 60_000,
    // With a pin the key is checked below, before a byte of the body is used.
    rejectUnauthorized: !pin,
    // No shared agent: a resumed TLS session shows no certificate to check the pin against.
    agent: false,
  };
  return new Promise((resolve, reject) => {
    const req = httpsGet(parsed, options, (res) => {
      if (pin) {
        const raw = (res.socket as TLSSocket).getPeerCertificate?.()?.raw;
        if (!raw || spkiOfDer(raw) !== pin) {
          res.destroy();
          reject(new ReleaseError(`${parsed.host} does not hold the pinned key ${opts.fingerprint}`));
          return;
        }
      }
      if (res.statusCode !== 200) {
        res.resume();
        reject(new ReleaseError(`GET ${url}: HTTP ${res.statusCode}`));
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (c: Buffer) => {
        size += c.length;
        if (size > opts.maxBytes) {
          res.destroy();
          reject(new ReleaseError(`GET ${url}: larger than ${opts.maxBytes} bytes`));
          return;
        }
        chunks.push(c);
      });
      res.on('end', () => resolve(Buffer.concat(chunks)));
      res.on('error', (err) => reject(new ReleaseError(`GET ${url}: ${err.message}`)));
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', (err) => reject(new ReleaseError(`GET ${url}: ${err.message}`)));
  });
}
