// Which nodes are online, where the coordinator saw them connect from, and
// when they were last seen. last_seen changes on every stream open and close,
// so it is written in batches and may lag by one batch interval after a crash.
import type { Kysely } from 'kysely';
import type { Database } from '../store/schema.js';
import type { EventBus } from './events.js';
import type { NodeIndex } from './node-index.js';
import type { NodeRecord } from './records.js';

const SEEN_BATCH_MS = 5_000;

/** Where a coordinator sharing its database records which nodes stream to it (see replica.ts). */
export interface PresenceRecorder {
  streaming(id: string, online: boolean): void;
}

export class Presence {
  /** Streaming to this coordinator. */
  private readonly online = new Set<string>();
  /** Streaming to another coordinator on the same database: node id -> that coordinator. */
  private readonly remote = new Map<string, string>();
  recorder: PresenceRecorder | null = null;
  private readonly observed = new Map<string, string>();
  private readonly unsavedSeen = new Set<string>();
  private seenTimer: NodeJS.Timeout | null = null;
  private seenWrite: Promise<void> = Promise.resolve();
  private closed = false;

  constructor(
    private readonly db: Kysely<Database>,
    private readonly now: () => number,
    private readonly nodes: NodeIndex,
    private readonly events: EventBus,
    private readonly seenBatchMs = SEEN_BATCH_MS,
  ) {}

  isOnline(id: string): boolean {
    return this.online.has(id) || this.remote.has(id);
  }

  count(): number {
    let n = this.online.size;
    for (const id of this.remote.keys()) if (!this.online.has(id)) n++;
    return n;
  }

  /** A removed node: nothing of it is kept. */
  forget(id: string): void {
    this.online.delete(id);
    this.remote.delete(id);
    this.observed.delete(id);
  }

  set(id: string, online: boolean): void {
    const n = this.nodes.get(id);
    if (!n || this.online.has(id) === online) return;
    const before = this.isOnline(id);
    if (online) this.online.add(id);
    else this.online.delete(id);
    n.lastSeen = this.now();
    this.markSeen(id);
    this.recorder?.streaming(id, online);
    if (this.isOnline(id) !== before)
      this.events.emit({ type: 'node-patched', node: n, endpointsChanged: false });
  }

  /** Which other coordinator the node streams to, as the shared presence rows say; null: none. */
  setRemote(id: string, replica: string | null): void {
    const n = this.nodes.get(id);
    if (!n || (this.remote.get(id) ?? null) === replica) return;
    const before = this.isOnline(id);
    if (replica !== null) this.remote.set(id, replica);
    else this.remote.delete(id);
    // Seen until now elsewhere: the ephemeral reaper counts from here.
    n.lastSeen = this.now();
    if (this.isOnline(id) !== before)
      this.events.emit({ type: 'node-patched', node: n, endpointsChanged: false });
  }

  /** Nodes streaming to this coordinator. */
  localIds(): string[] {
    return [...this.online];
  }

  remoteIds(): string[] {
    return [...this.remote.keys()];
  }

  /** The other coordinator the node streams to, if it does not stream here. */
  remoteHome(id: string): string | undefined {
    return this.online.has(id) ? undefined : this.remote.get(id);
  }

  /** Endpoints peers should try: what the agent reported, then where the coordinator saw it come from. */
  endpointsOf(n: NodeRecord): string[] {
    const seen = this.observed.get(n.id);
    return seen && !n.endpoints.includes(seen) ? [...n.endpoints, seen] : n.endpoints;
  }

  setObservedEndpoint(id: string, endpoint: string | undefined): void {
    const n = this.nodes.get(id);
    if (!n || this.observed.get(id) === endpoint) return;
    if (endpoint) this.observed.set(id, endpoint);
    else this.observed.delete(id);
    this.events.emit({ type: 'node-patched', node: n, endpointsChanged: true });
  }

  touch(id: string): void {
    const n = this.nodes.get(id);
    if (n) n.lastSeen = this.now();
  }

  private markSeen(id: string): void {
    this.unsavedSeen.add(id);
    this.scheduleSeen();
  }

  private scheduleSeen(): void {
    if (this.seenTimer || this.closed) return;
    this.seenTimer = setTimeout(() => {
      this.seenTimer = null;
      // A failed batch stays unsaved and is tried again with the next one.
      this.saveSeen().catch(() => this.scheduleSeen());
    }, this.seenBatchMs);
    this.seenTimer.unref();
  }

  /** Writes the last_seen times changed since the previous batch, in one transaction. */
  private saveSeen(): Promise<void> {
    // Chained so that two batches never interleave and close() waits for one under way.
    this.seenWrite = this.seenWrite.catch(() => {}).then(() => this.writeSeen());
    return this.seenWrite;
  }

  private async writeSeen(): Promise<void> {
    // Nodes deleted meanwhile are skipped here; one deleted during the
    // transaction matches no row, which is no error either.
    const batch = [...this.unsavedSeen].flatMap((id) => {
      const n = this.nodes.get(id);
      return n ? [{ id, lastSeen: n.lastSeen }] : [];
    });
    this.unsavedSeen.clear();
    if (batch.length === 0) return;
    try {
      await this.db.transaction().execute(async (tx) => {
        for (const { id, lastSeen } of batch) {
          await tx.updateTable('nodes').set({ last_seen: lastSeen }).where('id', '=', id).execute();
        }
      });
    } catch (err) {
      for (const { id } of batch) this.unsavedSeen.add(id);
      throw err;
    }
  }

  /** Writes what is still only in memory; call it before the store closes. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.seenTimer) clearTimeout(this.seenTimer);
    this.seenTimer = null;
    await this.saveSeen();
  }
}
