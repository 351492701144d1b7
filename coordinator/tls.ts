// The coordinator's TLS identity: an ECDSA P-256 key and a self-signed
// certificate made on first start in the data dir. Clients pin the SHA-256
// of the certificate's public key (SPKI), which survives re-issuing the
// certificate for the same key. Data dirs made before keep their RSA-3072
// identity (and their pin).
import { generateKeyPairSync, randomBytes, sign } from 'node:crypto';
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
  // Every agent connection costs the coordinator one handshake signature:
  // 0.03 ms with P-256, 1.8 ms with RSA-3072, which made TLS the largest cost
  // of registering a fleet.
  const { privateKey, publicKey } = generateKeyPairSync('ec', {
    namedCurve: 'P-256',
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'der' },
  });
  const isIp = (n: string) => isIP(n) !== 0;
  const dns = [...new Set(['localhost', hostname(), ...names.filter((n) => !isIp(n))])];
  const ips = [...new Set(['127.0.0.1', '::1', ...names.filter(isIp)])];
  const cert = forge.pki.createCertificate();
  cert.serialNumber = `01${randomBytes(15).toString('hex')}`;
  const now = Date.now();
  cert.validity.notBefore = new Date(now - 3_600_000);
  cert.validity.notAfter = new Date(now + 20 * 365 * 86_400_000);
  const subject = [{ name: 'commonName', value: `meshgate coordinator ${hostname()}` }];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.setExtensions([
    { name: 'basicConstraints', cA: false },
    { name: 'keyUsage', digitalSignature: true },
    { name: 'extKeyUsage', serverAuth: true },
    {
      name: 'subjectAltName',
      altNames: [...dns.map((value) => ({ type: 2, value })), ...ips.map((ip) => ({ type: 7, ip }))],
    },
  ]);
  writeFileSync(p.key, privateKey, { mode: 0o600, flag: 'wx' });
  writeFileSync(p.cert, signedWithEcdsa(cert, publicKey, privateKey), { mode: 0o644, flag: 'wx' });
  return { ...loadTlsIdentity(dataDir), created: true };
}

const ECDSA_WITH_SHA256 = '1.2.840.10045.4.3.2';

/**
 * The certificate in PEM, signed with the P-256 key. node-forge signs with
 * RSA only: it lays out the to-be-signed part (with a stand-in key), then its
 * key and signature algorithm are replaced and node:crypto signs it.
 */
function signedWithEcdsa(cert: forge.pki.Certificate, spki: Buffer, privateKey: string): string {
  const { asn1 } = forge;
  const one = new forge.jsbn.BigInteger('1');
  cert.publicKey = forge.pki.rsa.setPublicKey(one, one);
  (cert as unknown as { siginfo: { algorithmOid: string } }).siginfo.algorithmOid = ECDSA_WITH_SHA256;
  // ECDSA's AlgorithmIdentifier has no parameters (RFC 5758 3.2), not even NULL.
  const algorithm = () =>
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
      asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(ECDSA_WITH_SHA256).getBytes()),
    ]);
  // Exported by node-forge, missing from its type declarations.
  const { getTBSCertificate } = forge.pki as unknown as {
    getTBSCertificate(c: forge.pki.Certificate): forge.asn1.Asn1;
  };
  const tbs = getTBSCertificate(cert);
  const fields = tbs.value as forge.asn1.Asn1[];
  // version, serial, signature algorithm, issuer, validity, subject, public key, extensions
  fields[2] = algorithm();
  fields[6] = asn1.fromDer(forge.util.createBuffer(spki.toString('binary')));
  const tbsDer = Buffer.from(asn1.toDer(tbs).getBytes(), 'binary');
  const signature = sign('sha256', tbsDer, privateKey);
  const certificate = asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
    tbs,
    algorithm(),
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.BITSTRING, false, `\0${signature.toString('binary')}`),
  ]);
  return forge.pem.encode({ type: 'CERTIFICATE', body: asn1.toDer(certificate).getBytes() });
}
