// The coordinator's TLS identity: an ECDSA P-256 key and a self-signed
// certificate made on first start in the data dir. Clients pin the SHA-256
// of the certificate's public key (SPKI), which survives re-issuing the
// certificate for the same key.
import { webcrypto } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { spkiOf } from '../proto/fingerprint.js';

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
  if (!existsSync(p.cert)) throw new Error(`no TLS certificate in ${dataDir}; start the coordinator once to create it`);
  const cert = readFileSync(p.cert);
  return { key: readFileSync(p.key), cert, fingerprint: spkiOf(cert) };
}

/** Loads the identity, creating key and certificate when the data dir has none. */
export async function ensureTlsIdentity(dataDir: string, names: string[] = []): Promise<TlsIdentity & { created: boolean }> {
  const p = tlsPaths(dataDir);
  if (existsSync(p.key) && existsSync(p.cert)) return { ...loadTlsIdentity(dataDir), created: false };
  x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const keys = await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify']);
  const dns = [...new Set(['localhost', hostname(), ...names.filter((n) => !/^[\d.:]+$/.test(n))])];
  const ips = [...new Set(['127.0.0.1', '::1', ...names.filter((n) => /^[\d.:]+$/.test(n))])];
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: Buffer.from(webcrypto.getRandomValues(new Uint8Array(16))).toString('hex').replace(/^[89a-f]/, '1'),
    name: `CN=meshgate coordinator ${hostname()}`,
    notBefore: new Date(now - 3_600_000),
    notAfter: new Date(now + 20 * 365 * 86_400_000),
    keys: keys as unknown as Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[0]['keys'],
    signingAlgorithm: alg,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension([
        ...dns.map((value) => ({ type: 'dns' as const, value })),
        ...ips.map((value) => ({ type: 'ip' as const, value })),
      ]),
    ],
  });
  const pkcs8 = await webcrypto.subtle.exportKey('pkcs8', keys.privateKey);
  const keyPem = `-----BEGIN PRIVATE KEY-----\n${Buffer.from(pkcs8).toString('base64').replace(/(.{64})/g, '$1\n').trim()}\n-----END PRIVATE KEY-----\n`;
  writeFileSync(p.key, keyPem, { mode: 0o600, flag: 'wx' });
  writeFileSync(p.cert, cert.toString('pem'), { mode: 0o644, flag: 'wx' });
  return { ...loadTlsIdentity(dataDir), created: true };
}
