// The release manifest: what an artifact is (version, size, sha256, the Node
// it needs) and an Ed25519 signature over that description. The coordinator
// serves it, install.sh and agents check it against a pinned public key
// before running anything they downloaded.
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  sign,
  verify,
} from 'node:crypto';
import { z } from 'zod';
import { isSemVer } from './semver.js';

export const MANIFEST_FORMAT = 'meshgate-release/1';
export const MANIFEST_FILE = 'manifest.json';

export class ReleaseError extends Error {
  override name = 'ReleaseError';
}

const ManifestSchema = z
  .object({
    format: z.literal(MANIFEST_FORMAT),
    name: z.literal('meshgate'),
    version: z.string().refine(isSemVer, 'expected a semantic version'),
    commit: z.string().regex(/^[0-9a-f]{0,40}$|^unknown$/, 'expected a git commit'),
    file: z.string().regex(/^meshgate-[0-9A-Za-z.+-]{5,64}\.mjs$/, 'expected meshgate-VERSION.mjs'),
    sha256: z.string().regex(/^[0-9a-f]{64}$/, 'expected 64 hex digits'),
    size: z.number().int().positive(),
    node: z.string().regex(/^>=\d{1,3}$/, 'expected >=MAJOR'),
    platform: z.string().regex(/^[a-z0-9]{1,16}$/),
    created: z.string().datetime(),
    keyId: z.string().regex(/^[0-9a-f]{16}$/),
    signature: z.string().regex(/^[A-Za-z0-9+/]{86}==$/, 'expected a base64 Ed25519 signature'),
  })
  .strict();

export type ReleaseManifest = z.infer<typeof ManifestSchema>;
export type UnsignedManifest = Omit<ReleaseManifest, 'signature'>;

/** The artifact's file name for a version. */
export const artifactFile = (version: string) => `meshgate-${version}.mjs`;

/**
 * The bytes that are signed: every field but the signature, keys sorted,
 * no whitespace. All values are strings or integers, so this is stable.
 */
export function canonicalManifest(m: UnsignedManifest | ReleaseManifest): Buffer {
  const entries = Object.entries(m)
    .filter(([k]) => k !== 'signature')
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return Buffer.from(JSON.stringify(Object.fromEntries(entries)), 'utf8');
}

// ---- keys

const PUBLIC_PREFIX = 'ed25519:';

export interface SigningKey {
  privateKey: KeyObject;
  publicKey: string;
}

/** A new signing key: PKCS#8 PEM for the 0600 file, and the public key as ed25519:BASE64. */
export function generateSigningKey(): { pem: string; publicKey: string } {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  return {
    pem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    publicKey: encodePublicKey(publicKey),
  };
}

function encodePublicKey(k: KeyObject): string {
  const jwk = k.export({ format: 'jwk' });
  return PUBLIC_PREFIX + Buffer.from(jwk.x!, 'base64url').toString('base64');
}

export function loadSigningKey(pem: string): SigningKey {
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(pem);
  } catch {
    throw new ReleaseError('the signing key file does not hold a PEM private key');
  }
  if (privateKey.asymmetricKeyType !== 'ed25519')
    throw new ReleaseError(`the signing key is ${privateKey.asymmetricKeyType}, not Ed25519`);
  return { privateKey, publicKey: encodePublicKey(createPublicKey(privateKey)) };
}

/** Parses ed25519:BASE64 (32 bytes). */
export function parsePublicKey(s: string): KeyObject {
  const b64 = s.startsWith(PUBLIC_PREFIX) ? s.slice(PUBLIC_PREFIX.length) : '';
  const raw = Buffer.from(b64, 'base64');
  if (raw.length !== 32 || raw.toString('base64') !== b64)
    throw new ReleaseError('invalid release key: expected ed25519: followed by 32 bytes in base64');
  return createPublicKey({
    key: { kty: 'OKP', crv: 'Ed25519', x: raw.toString('base64url') },
    format: 'jwk',
  });
}

/** Short name of a public key, so a manifest says which key signed it. */
export function keyId(publicKey: string): string {
  return createHash('sha256').update(publicKey).digest('hex').slice(0, 16);
}

// ---- sign and verify

export function signManifest(m: Omit<UnsignedManifest, 'keyId'>, key: SigningKey): ReleaseManifest {
  const unsigned: UnsignedManifest = { ...m, keyId: keyId(key.publicKey) };
  const signature = sign(null, canonicalManifest(unsigned), key.privateKey).toString('base64');
  return { ...unsigned, signature };
}

/** Parses manifest JSON from an untrusted source; throws ReleaseError naming the first problem. */
export function parseManifest(text: string): ReleaseManifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw new ReleaseError('the release manifest is not JSON');
  }
  const r = ManifestSchema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new ReleaseError(
      `invalid release manifest: ${issue.path.join('.') || 'manifest'}: ${issue.message}`,
    );
  }
  if (r.data.file !== artifactFile(r.data.version))
    throw new ReleaseError(`invalid release manifest: file must be ${artifactFile(r.data.version)}`);
  return r.data;
}

/** Checks the signature against the pinned public key (ed25519:BASE64). */
export function verifyManifest(m: ReleaseManifest, publicKey: string): void {
  const key = parsePublicKey(publicKey);
  const ok = verify(null, canonicalManifest(m), key, Buffer.from(m.signature, 'base64'));
  if (!ok) {
    const hint = m.keyId === keyId(publicKey) ? '' : ' (it was signed by another key)';
    throw new ReleaseError(
      `release ${m.version}: the manifest signature does not match the release key${hint}`,
    );
  }
}

/** Checks that the artifact bytes are the ones the manifest describes. */
export function verifyArtifact(m: ReleaseManifest, bytes: Buffer): void {
  if (bytes.length !== m.size)
    throw new ReleaseError(
      `release ${m.version}: artifact has ${bytes.length} bytes, the manifest says ${m.size}`,
    );
  const sha = createHash('sha256').update(bytes).digest('hex');
  if (sha !== m.sha256)
    throw new ReleaseError(`release ${m.version}: artifact sha256 ${sha} does not match the manifest`);
}
