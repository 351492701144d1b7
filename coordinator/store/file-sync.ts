// Makes what was written to a file durable without stopping the event loop:
// fdatasync runs in libuv's thread pool, and callers that ask while one is
// under way share the next one, so a burst of commits costs two syncs, not
// one each.
import { type FileHandle, open } from 'node:fs/promises';
import { dirname } from 'node:path';
import { StoreUnavailableError } from './unavailable.js';

/**
 * Runs `op` for whoever asks; who asks while it runs gets the run after it,
 * because what they wrote may have missed the one under way.
 */
export class Coalesced {
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;

  constructor(private readonly op: () => Promise<void>) {}

  run(): Promise<void> {
    if (!this.running) {
      this.running = this.op().finally(() => {
        this.running = null;
      });
      return this.running;
    }
    this.queued ??= this.running
      .catch(() => {})
      .then(() => {
        this.queued = null;
        return this.run();
      });
    return this.queued;
  }
}

async function datasync(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await handle.datasync();
  } finally {
    await handle.close();
  }
}

export interface LogSync {
  /** Resolves once everything written to the log before the call is on disk. */
  sync(): Promise<void>;
  close(): Promise<void>;
}

/**
 * fdatasync of SQLite's write-ahead log. The log stays open: SQLite removes
 * and recreates it only when its last connection closes, and the driver's
 * connection is open as long as this is. The first sync also syncs the
 * directory, so that the log file itself is found after a power loss.
 */
export function walSync(walPath: string): LogSync {
  let handle: FileHandle | null = null;
  let directorySynced = false;
  const sync = new Coalesced(async () => {
    try {
      handle ??= await open(walPath, 'r');
      await handle.datasync();
      if (!directorySynced) {
        await datasync(dirname(walPath));
        directorySynced = true;
      }
    } catch (err) {
      const code = (err as { code?: string }).code ?? String(err);
      throw new StoreUnavailableError(
        `the coordinator cannot write its database to disk (${code} on ${walPath}); the last change may be lost: check the disk`,
      );
    }
  });
  return {
    sync: () => sync.run(),
    async close() {
      await handle?.close();
      handle = null;
    },
  };
}
