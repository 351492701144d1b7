// Auth keys and API keys: "mgkey-<kind>-<prefix>-<secret>". The prefix is
// public and used for lookup; only SHA-256 of the 32-byte secret is stored
// (a random 256-bit secret needs no slow hash), and it is compared in
// constant time.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';

export type SecretKind = 'auth' | 'api';

export interface IssuedSecret {
  id: string;
  key: string;
  hash: string;
}

export function issueSecret(kind: SecretKind): IssuedSecret {
  const id = randomBytes(6).toString('hex');
  const secret = randomBytes(32).toString('base64url');
  return { id, key: `mgkey-${kind}-${id}-${secret}`, hash: hashSecret(secret) };
}

export interface ParsedSecret {
  id: string;
  secret: string;
}

const FORMAT = /^mgkey-(auth|api)-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$/;

/** Null when `text` is not a key of this kind; never echoes the text. */
export function parseSecret(kind: SecretKind, text: string): ParsedSecret | null {
  const m = FORMAT.exec(text.trim());
  if (!m || m[1] !== kind) return null;
  return { id: m[2]!, secret: m[3]! };
}

export function hashSecret(secret: string): string {
  return createHash('sha256').update(secret).digest('hex');
}

export function secretMatches(secret: string, storedHash: string): boolean {
  const given = Buffer.from(hashSecret(secret), 'hex');
  const stored = Buffer.from(storedHash, 'hex');
  return stored.length === given.length && timingSafeEqual(given, stored);
}
