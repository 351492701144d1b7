// One coordinator among several on a PostgreSQL database. It announces
// itself with a lease it renews (replicas), records which nodes stream to it
// (presence), applies the changes the others commit (changelog.ts: NOTIFY
// for speed, the changes table for what a broken connection missed), and
// takes turns with them on the periodic jobs (leases).
import { randomBytes } from 'node:crypto';
import type { Kysely } from 'kysely';
import type { Logger } from '../log.js';
import { PgListener } from '../store/listener.js';
import type { Database } from '../store/schema.js';
import {
  CHANGES_CHANNEL,
  type Change,
  changeBounds,
  type LoggedChange,
  pruneChanges,
  readChanges,
  SharedChangeLog,
} from './changelog.js';
import type { PresenceRecorder } from './presence.js';
import type { State } from './state.js';

export interface ReplicationOptions {
  url: string;
  /** This coordinator's id (the state's `replica` option). */
  replica: string;
  /** How long a coordinator counts as alive after its last renewal. */
  leaseMs?: number;
  /** How often the lease is renewed and the changes table read, notification or not. */
  heartbeatMs?: number;
  /** How long changes are kept for coordinators that were cut off. */
  keepChangesMs?: number;
  /** grpcs://HOST:PORT where the others reach this coordinator to forward relay datagrams; '' for nowhere. */
  address?: string;
  log: Logger;
}

const KINDS = new Set(['node', 'project', 'policy', 'global-policy', 'versions', 'presence']);

export class Replication implements PresenceRecorder {
  private readonly changeLog: SharedChangeLog;
  private readonly listener: PgListener;
  private readonly leaseMs: number;
  private readonly heartbeatMs: number;
  private readonly keepChangesMs: number;
  private heartbeat: NodeJS.Timeout | null = null;
  /** Changes are applied one at a time, in order. */
  private applying: Promise<void> = Promise.resolve();
  private presenceWrites: Promise<void> = Promise.resolve();
  private closed = false;
  /** Live coordinators' forwarding addresses, as of the last heartbeat. */
  private addresses = new Map<string, string>();
  private sharedSecret: Promise<string> | null = null;

  /** `lastSeq`: the newest change already in the state (read before it was loaded). */
  constructor(
    private readonly db: Kysely<Database>,
    private readonly state: State,
    private readonly opts: ReplicationOptions,
    private lastSeq: number,
  ) {
    this.changeLog = new SharedChangeLog(opts.replica, state.now);
    this.leaseMs = opts.leaseMs ?? 10_000;
    this.heartbeatMs = opts.heartbeatMs ?? 2_000;
    this.keepChangesMs = opts.keepChangesMs ?? 3_600_000;
    this.listener = new PgListener(opts.url, CHANGES_CHANNEL, {
      notified: (payload) => this.notified(payload),
      connected: () => this.enqueue(() => this.resume()),
      failed: (err) => opts.log.warn({ err: err.message }, 'lost the change notifications; reconnecting'),
    });
  }

  get id(): string {
    return this.opts.replica;
  }

  /** Before streams are served: the others see this coordinator alive and its changes flow both ways. */
  async start(): Promise<void> {
    await this.announce(this.db, this.state.now());
    await this.readAddresses();
    await this.state.remote?.syncPresence();
    this.state.catchUp = () => this.enqueue(() => this.readLog());
    this.state.recordPresence(this);
    this.listener.start();
    this.heartbeat = setInterval(() => void this.beat(), this.heartbeatMs);
    this.heartbeat.unref();
  }

  private async beat(): Promise<void> {
    try {
      const now = this.state.now();
      const renewed = await this.db
        .updateTable('replicas')
        .set({ expires_at: now + this.leaseMs })
        .where('id', '=', this.id)
        .executeTakeFirst();
      // Cut off from the database longer than the lease: the others cleared
      // this coordinator and its streams. It comes back with them.
      if (renewed.numUpdatedRows === 0n) await this.rejoin(now);
      await this.readAddresses();
    } catch (err) {
      this.opts.log.warn({ err: (err as Error).message }, 'could not renew this coordinator lease');
    }
    // A notification can be lost without the connection breaking (the
    // listener's server restarted between two reads); the log cannot.
    await this.enqueue(() => this.readLog()).catch(() => {});
  }

  private async rejoin(now: number): Promise<void> {
    this.opts.log.warn(
      'this coordinator lost its lease (database unreachable for too long); registering again',
    );
    const online = this.state.localOnline();
    await this.db.transaction().execute(async (tx) => {
      await this.announce(tx, now);
      for (const id of online)
        await tx
          .insertInto('presence')
          .values({ node_id: id, replica: this.id, since: now })
          .onConflict((oc) => oc.columns(['node_id', 'replica']).doNothing())
          .execute();
      await this.changeLog.record(tx, ...online.map((id): Change => ({ kind: 'presence', ref: id })));
    });
  }

  /** This coordinator's row: alive until the lease ends, reachable at its address for relay forwarding. */
  private async announce(db: Kysely<Database>, now: number): Promise<void> {
    await db
      .insertInto('replicas')
      .values({
        id: this.id,
        started_at: now,
        expires_at: now + this.leaseMs,
        address: this.opts.address ?? '',
      })
      .execute();
  }

  private async readAddresses(): Promise<void> {
    const rows = await this.db
      .selectFrom('replicas')
      .select(['id', 'address'])
      .where('expires_at', '>', this.state.now())
      .where('address', '!=', '')
      .execute();
    this.addresses = new Map(rows.map((r) => [r.id, r.address]));
  }

  /** Where another live coordinator takes forwarded relay datagrams. */
  addressOf(replica: string): string | undefined {
    return this.addresses.get(replica);
  }

  /** The secret coordinators on this database present to each other; made by the first one. */
  secret(): Promise<string> {
    this.sharedSecret ??= (async () => {
      await this.db
        .insertInto('replica_secret')
        .values({ id: 1, secret: randomBytes(32).toString('base64url') })
        .onConflict((oc) => oc.column('id').doNothing())
        .execute();
      const row = await this.db.selectFrom('replica_secret').select('secret').executeTakeFirstOrThrow();
      return row.secret;
    })().catch((err) => {
      this.sharedSecret = null;
      throw err;
    });
    return this.sharedSecret;
  }

  private enqueue(step: () => Promise<void>): Promise<void> {
    const run = this.applying.then(step);
    this.applying = run.catch((err) => {
      if (!this.closed)
        this.opts.log.warn(
          { err: (err as Error).message },
          'applying changes of other coordinators failed; retrying',
        );
    });
    return run;
  }

  private notified(payload: string): void {
    const c = parseChange(payload);
    if (!c) return;
    void this.enqueue(async () => {
      if (c.seq <= this.lastSeq) return;
      // The next one in order is applied from the notification; after a gap
      // the table says what came between.
      if (c.seq !== this.lastSeq + 1) return this.readLog();
      await this.applyLogged(c);
    }).catch(() => {});
  }

  /** After (re)connecting: what was committed while not listening. */
  private async resume(): Promise<void> {
    const { first, last } = await changeBounds(this.db);
    if (first > this.lastSeq + 1 && this.state.remote) {
      // Pruned before this coordinator read them: compare everything instead.
      await this.state.remote.reload();
      this.lastSeq = Math.max(this.lastSeq, last);
      return;
    }
    await this.readLog();
  }

  private async readLog(): Promise<void> {
    for (;;) {
      const batch = await readChanges(this.db, this.lastSeq);
      for (const c of batch) await this.applyLogged(c);
      if (batch.length < 1000) return;
    }
  }

  private async applyLogged(c: LoggedChange): Promise<void> {
    if (c.origin !== this.id) await this.state.remote?.apply(c);
    this.lastSeq = Math.max(this.lastSeq, c.seq);
  }

  /** Records a stream opened or closed here, in order per coordinator. */
  streaming(id: string, online: boolean): void {
    this.presenceWrites = this.presenceWrites.then(async () => {
      try {
        await this.db.transaction().execute(async (tx) => {
          if (online)
            await tx
              .insertInto('presence')
              .values({ node_id: id, replica: this.id, since: this.state.now() })
              .onConflict((oc) => oc.columns(['node_id', 'replica']).doNothing())
              .execute();
          else
            await tx
              .deleteFrom('presence')
              .where('node_id', '=', id)
              .where('replica', '=', this.id)
              .execute();
          await this.changeLog.record(tx, { kind: 'presence', ref: id });
        });
      } catch (err) {
        this.opts.log.warn(
          { err: (err as Error).message, node: id },
          'could not record a stream for other coordinators',
        );
      }
    });
  }

  /**
   * Whether this coordinator runs the periodic job `name` now: it holds the
   * job's lease, renewed here, until it stops renewing it for a lease time.
   */
  async holds(name: string): Promise<boolean> {
    const now = this.state.now();
    const r = await this.db
      .insertInto('leases')
      .values({ name, holder: this.id, expires_at: now + this.leaseMs })
      .onConflict((oc) =>
        oc
          .column('name')
          .doUpdateSet({ holder: this.id, expires_at: now + this.leaseMs })
          .where((eb) => eb.or([eb('leases.holder', '=', this.id), eb('leases.expires_at', '<', now)])),
      )
      .executeTakeFirst();
    return Number(r.numInsertedOrUpdatedRows ?? 0) > 0;
  }

  /**
   * The lease holder's job: coordinators that stopped renewing died without
   * saying so; their streams are gone, so their nodes are offline unless
   * they stream elsewhere. Old changes are pruned.
   */
  async reapDead(): Promise<string[]> {
    const now = this.state.now();
    const dead = await this.db
      .selectFrom('replicas')
      .select('id')
      .where('expires_at', '<', now)
      .where('id', '!=', this.id)
      .execute();
    for (const { id } of dead) await this.forgetReplica(id);
    await pruneChanges(this.db, now - this.keepChangesMs);
    return dead.map((d) => d.id);
  }

  private async forgetReplica(id: string): Promise<void> {
    await this.db.transaction().execute(async (tx) => {
      const gone = await tx.deleteFrom('presence').where('replica', '=', id).returning('node_id').execute();
      await tx.deleteFrom('replicas').where('id', '=', id).execute();
      await this.changeLog.record(tx, ...gone.map((g): Change => ({ kind: 'presence', ref: g.node_id })));
    });
  }

  /** After the streams closed: the others learn at once that this coordinator's nodes left it. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    await this.listener.close();
    await this.presenceWrites;
    await this.applying;
    try {
      await this.forgetReplica(this.id);
    } catch (err) {
      // The others clear this coordinator when its lease runs out.
      this.opts.log.warn(
        { err: (err as Error).message },
        'could not tell the other coordinators that this one stops',
      );
    }
  }
}

function parseChange(payload: string): LoggedChange | null {
  try {
    const v = JSON.parse(payload) as Partial<LoggedChange>;
    if (
      typeof v.seq === 'number' &&
      Number.isSafeInteger(v.seq) &&
      typeof v.origin === 'string' &&
      typeof v.kind === 'string' &&
      KINDS.has(v.kind) &&
      typeof v.ref === 'string'
    )
      return { seq: v.seq, origin: v.origin, kind: v.kind, ref: v.ref };
  } catch {
    // Not ours: ignored, the changes table is read on the next heartbeat anyway.
  }
  return null;
}
