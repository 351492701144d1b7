// Decides whether an end-to-end test can run here. Without root or a tool the test is skipped, so
// `npm test` works on any machine; with MESHGATE_E2E=1 (CI) the same gap fails the test instead.
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import type { TestContext } from 'node:test';

export class PrerequisiteError extends Error {
  constructor(reason: string) {
    super(`end-to-end test cannot run: ${reason}; install what is missing or unset MESHGATE_E2E to skip`);
    this.name = 'PrerequisiteError';
  }
}

/** Why the tests cannot run on this machine, or null when they can. */
export function missingPrerequisites(tools: string[]): string | null {
  if (process.getuid?.() !== 0) return 'needs root for network namespaces';
  const missing = tools.filter((t) => !onPath(t));
  return missing.length > 0 ? `missing ${missing.join(', ')} on PATH` : null;
}

/** Skips the test (returns false) or, with MESHGATE_E2E=1, throws; returns true when it can run. */
export function requireTools(t: TestContext, tools: string[]): boolean {
  const reason = missingPrerequisites(tools);
  if (reason === null) return true;
  if (process.env.MESHGATE_E2E === '1') throw new PrerequisiteError(reason);
  t.skip(reason);
  return false;
}

export function onPath(tool: string): boolean {
  return (process.env.PATH ?? '').split(delimiter).some((dir) => {
    try {
      accessSync(join(dir, tool), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/**
 * For a `describe` that needs `tools`: the reason to skip it, or false.
 * With MESHGATE_E2E=1 a missing tool fails the run instead.
 */
export function suiteSkip(tools: string[]): string | false {
  const reason = missingPrerequisites(tools);
  if (reason && process.env.MESHGATE_E2E === '1') throw new PrerequisiteError(reason);
  return reason ?? false;
}
