// Semantic versions (semver.org 2.0.0): parsing and precedence. Agent
// versions, desired versions and release artifacts all speak this form.

export interface SemVer {
  major: number;
  minor: number;
  patch: number;
  prerelease: string[];
}

const NUMBER = '(0|[1-9]\\d{0,15})';
const IDENT = '(?:0|[1-9]\\d*|\\d*[A-Za-z-][0-9A-Za-z-]*)';
const SEMVER = new RegExp(
  `^${NUMBER}\\.${NUMBER}\\.${NUMBER}(?:-(${IDENT}(?:\\.${IDENT})*))?(?:\\+([0-9A-Za-z-]+(?:\\.[0-9A-Za-z-]+)*))?$`,
);

export class SemVerError extends Error {
  override name = 'SemVerError';
}

/** Parses MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]; null when it is not one. */
export function parseSemVer(v: string): SemVer | null {
  if (v.length > 64) return null;
  const m = SEMVER.exec(v);
  if (!m) return null;
  return {
    major: Number(m[1]),
    minor: Number(m[2]),
    patch: Number(m[3]),
    prerelease: m[4] ? m[4].split('.') : [],
  };
}

export function isSemVer(v: string): boolean {
  return parseSemVer(v) !== null;
}

export function requireSemVer(v: string, what = 'version'): SemVer {
  const parsed = parseSemVer(v);
  if (!parsed)
    throw new SemVerError(
      `${what} "${v.slice(0, 64)}" is not a semantic version such as 1.2.3 or 1.3.0-rc.1`,
    );
  return parsed;
}

function compareIdent(a: string, b: string): number {
  const na = /^\d+$/.test(a);
  const nb = /^\d+$/.test(b);
  if (na && nb) return Math.sign(Number(a) - Number(b));
  if (na) return -1;
  if (nb) return 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Precedence: negative when a < b, 0 when equal (build metadata ignored), positive when a > b. */
export function compareSemVer(a: SemVer, b: SemVer): number {
  const core = a.major - b.major || a.minor - b.minor || a.patch - b.patch;
  if (core) return Math.sign(core);
  if (!a.prerelease.length || !b.prerelease.length)
    return Math.sign(b.prerelease.length - a.prerelease.length);
  for (let i = 0; i < Math.max(a.prerelease.length, b.prerelease.length); i++) {
    const x = a.prerelease[i];
    const y = b.prerelease[i];
    if (x === undefined) return -1;
    if (y === undefined) return 1;
    const c = compareIdent(x, y);
    if (c) return c;
  }
  return 0;
}

/** Compares two version strings; throws when one is not semver. */
export function compareVersions(a: string, b: string): number {
  return compareSemVer(requireSemVer(a), requireSemVer(b));
}

/**
 * Whether a node running `running` drifts from `desired`: it is older, or
 * newer with a downgrade allowed. A version that is not semver drifts; a
 * desired one that is not (stored before versions were checked) is compared
 * as a plain string.
 */
export function drifts(running: string, desired: string, allowDowngrade: boolean): boolean {
  if (!desired) return false;
  const target = parseSemVer(desired);
  if (!target) return desired !== running;
  const have = parseSemVer(running);
  if (!have) return true;
  const c = compareSemVer(have, target);
  return c < 0 || (c > 0 && allowDowngrade);
}
