// The coordinator's TLS identity: an RSA key and a self-signed
// certificate made on first start in the data dir. Clients pin the SHA-256
// of the certificate's public key (SPKI), which survives re-issuing the
// certificate for the same key.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { createSecureContext } from 'node:tls';
import forge from 'node-forge';
import { spkiOf } from '../proto/fingerprint.js';
import { readSecretFile } from './secret-file.js';

export class TlsError extends Error {
  override name = 'TlsError';
}

export interface TlsIdentity {
  key: Buffer;
  cert: Buffer;
  fingerprint: string;
}

export function tlsPaths(dataDir: string) {
  return { key: join(dataDir, 'tls.key'), cert: join(dataDir, 'tls.crt') };
}

export function loadTlsIdentity(dataDir: string): TlsIdentity {
  const p = tlsPaths(dataDir);
  if (!existsSync(p.cert))
    throw new TlsError(`no TLS certificate in ${dataDir}; start the coordinator once to create it`);
  const cert = readFileSync(p.cert);
  return { key: readFileSync(p.key), cert, fingerprint: spkiOf(cert) };
}

/**
 * An identity made elsewhere, e.g. one key and certificate for every
 * coordinator sharing a database, so that one fingerprint pins them all.
 * The key must be readable by its owner only.
 */
export function loadTlsFiles(keyFile: string, certFile: string): TlsIdentity {
  const key = Buffer.from(`${readSecretFile(keyFile, 'TLS key')}\n`);
  let cert: Buffer;
  try {
    cert = readFileSync(certFile);
  } catch (err) {
    throw new TlsError(
      `cannot read TLS certificate ${certFile}: ${(err as NodeJS.ErrnoException).code ?? err}`,
    );
  }
  try {
    createSecureContext({ key, cert });
  } catch (err) {
    throw new TlsError(
      `TLS key ${keyFile} and certificate ${certFile} do not fit together: ${(err as Error).message}`,
    );
  }
  return { key, cert, fingerprint: spkiOf(cert) };
}

/** Loads the identity, creating key and certificate when the data dir has none. */
export async function ensureTlsIdentity(
  dataDir: string,
  names: string[] = [],
): Promise<TlsIdentity & { created: boolean }> {
  const p = tlsPaths(dataDir);
  if (existsSync(p.key) && existsSync(p.cert)) return { ...loadTlsIdentity(dataDir), created: false };
  const { privateKey, publicKey } = generateKeyPairSync('rsa', {
    modulusLength: 3072,
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'pem' },
  });
  const isIp = (n: string) => isIP(n) !== 0;
  const dns = [...new Set(['localhost', hostname(), ...names.filter((n) => !isIp(n))])];
  const ips = [...new Set(['127.0.0.1', '::1', ...names.filter(isIp)])];
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(publicKey);
  cert.serialNumber = `01${randomBytes(15).toString('hex')}`;
  const now = Date.now();
  cert.validity.notBefore = new Date(now - 3_600_000);
  cert.validity.notAfter = new Date(now + 20 * 365 * 86_400_000);
  const subject = [{ name: 'commonName', value: `meshgate coordinator ${hostname()}` }];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.setExtensions([
    { name: 'basicConstraints', cA: false },
    { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
    { name: 'extKeyUsage', serverAuth: true },
    {
      name: 'subjectAltName',
      altNames: [...dns.map((value) => ({ type: 2, value })), ...ips.map((ip) => ({ type: 7, ip }))],
    },
  ]);
  cert.sign(forge.pki.privateKeyFromPem(privateKey) as forge.pki.rsa.PrivateKey, forge.md.sha256.create());
  writeFileSync(p.key, privateKey, { mode: 0o600, flag: 'wx' });
  writeFileSync(p.cert, forge.pki.certificateToPem(cert), { mode: 0o644, flag: 'wx' });
  return { ...loadTlsIdentity(dataDir), created: true };
}
