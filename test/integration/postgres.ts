// A throwaway PostgreSQL cluster on a unix socket in a fresh directory, run
// as the postgres user; for tests that run the coordinator on PostgreSQL.
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function pgBin(): string | null {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return null;
  const version = readdirSync(root).sort().pop();
  return version && existsSync(join(root, version, 'bin', 'initdb')) ? join(root, version, 'bin') : null;
}

const bin = pgBin();

/** Why PostgreSQL tests cannot run here, or false; with MESHGATE_E2E=1 a reason is an error. */
export function postgresSkip(what: string): string | false {
  const skip = !bin
    ? 'PostgreSQL server binaries not installed'
    : process.getuid?.() !== 0
      ? 'needs root to run the cluster as postgres'
      : false;
  if (skip && process.env.MESHGATE_E2E === '1') throw new Error(`${what}: ${skip}`);
  return skip;
}

export interface PostgresCluster {
  /** A connection URL for a new, empty database `name`. */
  createDatabase(name: string): string;
  stop(): void;
}

export function startPostgres(): PostgresCluster {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-pg-'));
  const as = (cmd: string, args: string[]) =>
    execFileSync('runuser', ['-u', 'postgres', '--', join(bin!, cmd), ...args], { stdio: 'pipe' });
  const stop = () => {
    try {
      as('pg_ctl', ['-D', join(dir, 'data'), '-m', 'immediate', 'stop']);
    } catch {
      // Not started, or already gone.
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
  try {
    chmodSync(dir, 0o777);
    as('initdb', ['-D', join(dir, 'data'), '-A', 'trust', '-U', 'postgres']);
    as('pg_ctl', [
      '-D',
      join(dir, 'data'),
      '-l',
      join(dir, 'log'),
      '-w',
      '-o',
      `-k ${dir} -p 55432 -c listen_addresses=''`,
      'start',
    ]);
  } catch (err) {
    stop();
    throw err;
  }
  return {
    createDatabase(name) {
      as('createdb', ['-h', dir, '-p', '55432', name]);
      return `postgres://postgres@/${name}?host=${encodeURIComponent(dir)}&port=55432`;
    },
    stop,
  };
}
