// Auth keys and API keys: "mgkey_<kind>_<prefix>_<secret>". The prefix is
// public and used for lookup; only SHA-256 of the secret is stored (a random
// 256-bit secret needs no slow hash), and it is compared in constant time.
// Secrets are 43 base62 characters (256 bits), and '_' joins the parts:
// terminals and browsers count letters, digits and '_' as one word, so a
// double-click selects the whole key. Keys issued before were
// "mgkey-<kind>-<prefix>-<secret>" with base64url secrets of the same length;
// they still parse, and their stored hashes still match.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';

export type SecretKind = 'auth' | 'api';

export interface IssuedSecret {
  id: string;
  key: string;
  hash: string;
}

export function issueSecret(kind: SecretKind): IssuedSecret {
  const id = randomBytes(6).toString('hex');
  const secret = randomBase62(SECRET_LENGTH);
  return { id, key: `mgkey_${kind}_${id}_${secret}`, hash: hashSecret(secret) };
}

export interface ParsedSecret {
  id: string;
  secret: string;
}

const BASE62 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
/** 62^43 > 2^256. */
const SECRET_LENGTH = 43;

/** Uniform: bytes at or above 248 (4 x 62) are dropped rather than folded, which would bias the first letters. */
function randomBase62(length: number): string {
  let out = '';
  while (out.length < length) {
    for (const b of randomBytes(length)) {
      if (b < 248 && out.length < length) out += BASE62[b % 62];
    }
  }
  return out;
}

const FORMAT = /^mgkey_(auth|api)_([0-9a-f]{12})_([A-Za-z0-9]{43})$/;
/** The earlier form, whose secret class is base64url's. */
const DASHED_FORMAT = /^mgkey-(auth|api)-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$/;

/** Null when `text` is not a key of this kind; never echoes the text. */
export function parseSecret(kind: SecretKind, text: string): ParsedSecret | null {
  const trimmed = text.trim();
  const m = FORMAT.exec(trimmed) ?? DASHED_FORMAT.exec(trimmed);
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
