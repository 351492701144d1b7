// Secrets the coordinator reads from files (the /metrics token, the
// database key): refused when others may read them, never taken from argv.
import { readFileSync, statSync } from 'node:fs';
import { ConfigError } from './config.js';

export function readSecretFile(path: string, what: string): string {
  let mode: number;
  try {
    mode = statSync(path).mode;
  } catch (err) {
    throw new ConfigError(`cannot read ${what} file ${path}: ${(err as NodeJS.ErrnoException).code ?? err}`);
  }
  if (mode & 0o077)
    throw new ConfigError(`${what} file ${path} is accessible by group or others; run: chmod 600 ${path}`);
  const text = readFileSync(path, 'utf8').trim();
  if (!text) throw new ConfigError(`${what} file ${path} is empty`);
  return text;
}
