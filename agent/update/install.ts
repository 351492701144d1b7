// The filesystem steps of an update, in the layout install.sh makes:
//   PREFIX/VERSION/meshgate.mjs, PREFIX/VERSION/manifest.json, PREFIX/current -> VERSION
// A release is unpacked next to the running one and `current` is switched
// with one rename, so /usr/local/bin/meshgate (-> PREFIX/current/meshgate.mjs)
// names either the old release or the new one, never half of one.
import { createHash } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import {
  parseManifest,
  ReleaseError,
  type ReleaseManifest,
  verifyArtifact,
  verifyManifest,
} from '../../release/manifest.js';
import { isSemVer } from '../../release/semver.js';

export const DEFAULT_INSTALL_PREFIX = '/opt/meshgate';
export const ENTRY = 'meshgate.mjs';

export interface Expected {
  version: string;
  /** From the coordinator; empty when it did not name one. */
  sha256: string;
}

/**
 * Checks a downloaded release against the pinned release key and what the
 * coordinator asked for. Throws ReleaseError naming the first problem.
 */
export function verifyRelease(
  manifestText: string,
  bytes: Buffer,
  releaseKey: string,
  want: Expected,
): ReleaseManifest {
  const m = parseManifest(manifestText);
  verifyManifest(m, releaseKey);
  if (m.version !== want.version)
    throw new ReleaseError(
      `the signed manifest is for ${m.version}, the coordinator asked for ${want.version}`,
    );
  if (want.sha256 && m.sha256 !== want.sha256)
    throw new ReleaseError(
      `release ${m.version}: the signed manifest names sha256 ${m.sha256}, the coordinator ${want.sha256}`,
    );
  verifyArtifact(m, bytes);
  const needs = Number(m.node.replace(/^>=/, ''));
  if (Number(process.versions.node.split('.')[0]) < needs)
    throw new ReleaseError(`release ${m.version} needs Node ${m.node}, this is ${process.version}`);
  return m;
}

/** The version `current` points to, or null without one. */
export function currentVersion(prefix: string): string | null {
  try {
    const v = readlinkSync(join(prefix, 'current'));
    return isSemVer(v) ? v : null;
  } catch {
    return null;
  }
}

/** Whether PREFIX/VERSION holds that release, intact. */
export function installed(prefix: string, version: string): boolean {
  try {
    const m = parseManifest(readFileSync(join(prefix, version, 'manifest.json'), 'utf8'));
    const bytes = readFileSync(join(prefix, version, ENTRY));
    return m.version === version && createHash('sha256').update(bytes).digest('hex') === m.sha256;
  } catch {
    return false;
  }
}

/** Unpacks a verified release to PREFIX/VERSION (written aside, then renamed into place). */
export function installRelease(
  prefix: string,
  m: ReleaseManifest,
  manifestText: string,
  bytes: Buffer,
): string {
  const dest = join(prefix, m.version);
  if (installed(prefix, m.version)) return dest;
  const tmp = join(prefix, `.${m.version}.new`);
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true, mode: 0o755 });
  writeFileSync(join(tmp, ENTRY), bytes, { mode: 0o755 });
  chmodSync(join(tmp, ENTRY), 0o755);
  writeFileSync(join(tmp, 'manifest.json'), manifestText, { mode: 0o644 });
  rmSync(dest, { recursive: true, force: true });
  renameSync(tmp, dest);
  return dest;
}

/** Points `current` at VERSION with one rename; returns the version it pointed to before. */
export function switchCurrent(prefix: string, version: string): string | null {
  if (!existsSync(join(prefix, version, ENTRY)))
    throw new ReleaseError(`meshgate ${version} is not installed in ${prefix}`);
  const before = currentVersion(prefix);
  const tmp = join(prefix, '.current.new');
  rmSync(tmp, { force: true });
  symlinkSync(version, tmp);
  renameSync(tmp, join(prefix, 'current'));
  return before;
}
