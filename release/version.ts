// The version of this build. A release artifact has its version and commit
// written in when it is bundled; a checkout reads package.json and asks git.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

// Replaced by `meshgate release pack` (esbuild define); absent in a checkout.
declare const MESHGATE_BUILD_VERSION: string | undefined;
declare const MESHGATE_BUILD_COMMIT: string | undefined;

/** The checkout this module belongs to (its package.json), or null inside a release artifact. */
export function packageRoot(): string | null {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        if ((JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'meshgate') return dir;
      } catch {
        // not ours; keep looking upwards
      }
    }
    const up = dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}

function checkoutVersion(): string {
  const root = packageRoot();
  if (!root) return '0.0.0';
  return (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version;
}

export const VERSION: string =
  typeof MESHGATE_BUILD_VERSION === 'string' ? MESHGATE_BUILD_VERSION : checkoutVersion();

/** The git commit of this build; asked from git only when needed. */
export function buildCommit(): string {
  if (typeof MESHGATE_BUILD_COMMIT === 'string') return MESHGATE_BUILD_COMMIT;
  const root = packageRoot();
  if (!root) return 'unknown';
  try {
    return execFileSync('git', ['-C', root, 'rev-parse', 'HEAD'], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    }).trim();
  } catch {
    return 'unknown';
  }
}

/** One line for `meshgate version` and `--version`. */
export function versionLine(): string {
  return `meshgate ${VERSION} (commit ${buildCommit().slice(0, 12)}, node ${process.version})`;
}
