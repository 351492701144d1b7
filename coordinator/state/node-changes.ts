// Changes to registered nodes: by admins (delete, expire, rename, tags,
// routes) and by their agents (endpoints, version, key rotation, logout).
// Each is written first and then applied to memory and announced.
import type { Kysely, Transaction } from 'kysely';
import { isDnsLabel, isTag } from '../../proto/names.js';
import { quote } from '../../proto/text.js';
import type { Database } from '../store/schema.js';
import { audit } from './audit.js';
import type { ChangeLog } from './changelog.js';
import { exists, invalid, notFound, precondition } from './errors.js';
import type { EventBus } from './events.js';
import type { AddressPool } from './ipam.js';
import { duplicateKeyOr, type NodeIndex } from './node-index.js';
import type { Presence } from './presence.js';
import { type NodeRecord, nodeFromRow } from './records.js';

export class NodeChanges {
  constructor(
    private readonly db: Kysely<Database>,
    private readonly now: () => number,
    private readonly nodes: NodeIndex,
    private readonly pool: AddressPool,
    private readonly presence: Presence,
    private readonly events: EventBus,
    private readonly log: ChangeLog,
  ) {}

  /** One transaction that changes node `id` and records that it did. */
  async write(id: string, fn: (tx: Transaction<Database>) => Promise<unknown>): Promise<void> {
    await this.db.transaction().execute(async (tx) => {
      await fn(tx);
      await this.log.record(tx, { kind: 'node', ref: id });
    });
  }

  // ---- by agents

  async updateEndpoints(id: string, endpoints: string[]): Promise<void> {
    const n = this.nodes.get(id);
    if (!n || sameList(endpoints, n.endpoints)) return;
    n.endpoints = endpoints;
    await this.write(id, (tx) =>
      tx
        .updateTable('nodes')
        .set({ endpoints: JSON.stringify(endpoints) })
        .where('id', '=', id)
        .execute(),
    );
    this.events.emit({ type: 'node-patched', node: n, endpointsChanged: true });
  }

  /** Peers do not see it; only policy changes are checked against it. */
  async updateLockdownPorts(id: string, ports: number[]): Promise<void> {
    const n = this.nodes.get(id);
    if (!n || sameList(ports, n.lockdownPorts)) return;
    await this.write(id, (tx) =>
      tx
        .updateTable('nodes')
        .set({ lockdown_ports: JSON.stringify(ports) })
        .where('id', '=', id)
        .execute(),
    );
    n.lockdownPorts = ports;
  }

  async updateVersion(id: string, version: string): Promise<void> {
    const n = this.nodes.get(id);
    if (!n || n.version === version) return;
    await this.write(id, (tx) => tx.updateTable('nodes').set({ version }).where('id', '=', id).execute());
    this.apply(n, { version }, 'node-changed');
  }

  async rotateNodeKey(id: string, nodeKey: string): Promise<NodeRecord> {
    const n = this.nodes.get(id);
    if (!n) throw notFound('node does not exist');
    if (n.nodeKey === nodeKey) return n;
    const release = this.nodes.claimNodeKey(nodeKey, id);
    const keySetAt = this.now();
    try {
      await this.write(id, (tx) =>
        tx
          .updateTable('nodes')
          .set({ node_key: nodeKey, key_set_at: keySetAt })
          .where('id', '=', id)
          .execute(),
      );
    } catch (err) {
      release();
      throw duplicateKeyOr(err);
    }
    return this.apply(n, { nodeKey, keySetAt }, 'node-changed');
  }

  /** `meshgate logout`: the node leaves for good, ephemeral or not; its machine forgets its identity. */
  async logout(id: string): Promise<void> {
    const n = this.nodes.get(id);
    if (n) await this.remove('node', n, 'node.logout');
  }

  // ---- by admins

  async delete(actor: string, ref: string, project?: string): Promise<NodeRecord> {
    const n = this.nodes.resolve(ref, project);
    await this.remove(actor, n, 'node.delete');
    return n;
  }

  async remove(actor: string, n: NodeRecord, action: string): Promise<void> {
    await this.write(n.id, async (tx) => {
      await tx.deleteFrom('nodes').where('id', '=', n.id).execute();
      await audit(tx, this.now(), actor, action, n.id, { project: n.project, name: n.name });
    });
    this.forget(n);
    this.events.emit({ type: 'node-removed', node: n });
  }

  /** A node deleted from memory: its address is free again, its presence gone. Not announced. */
  forget(n: NodeRecord): void {
    this.nodes.remove(n);
    this.pool.release(n.ipIndex);
    this.presence.forget(n.id);
  }

  /**
   * The stored row of a node as another coordinator left it (undefined:
   * deleted), applied and announced as if the change had been made here.
   */
  applyRow(id: string, row: Database['nodes'] | undefined): void {
    const old = this.nodes.get(id);
    if (!row) {
      if (!old) return;
      this.forget(old);
      this.events.emit({ type: 'node-removed', node: old });
      return;
    }
    const node = nodeFromRow(row);
    if (!old) {
      this.nodes.add(node);
      this.pool.use(node.ipIndex);
      this.events.emit({ type: 'node-added', node });
      return;
    }
    // last_seen is kept in memory where the node streams; the stored one lags.
    node.lastSeen = Math.max(old.lastSeen ?? 0, node.lastSeen ?? 0) || null;
    if (sameNode(old, node)) return;
    const visible = !sameNode({ ...old, endpoints: node.endpoints, lastSeen: node.lastSeen }, node);
    this.nodes.replace(node);
    if (visible) this.events.emit({ type: 'node-changed', node });
    else this.events.emit({ type: 'node-patched', node, endpointsChanged: true });
  }

  async expire(
    actor: string,
    ref: string,
    project: string | undefined,
    at: number | null,
  ): Promise<NodeRecord> {
    const n = this.nodes.resolve(ref, project);
    return this.change(actor, n, 'node.expire', { expiresAt: at }, { expires_at: at });
  }

  async rename(actor: string, ref: string, project: string | undefined, name: string): Promise<NodeRecord> {
    const n = this.nodes.resolve(ref, project);
    if (!isDnsLabel(name))
      throw invalid(`node name ${quote(name)} must be a DNS label (a-z, 0-9, -; at most 63)`);
    const holder = this.nodes.nameHolder(n.project, name);
    if (holder !== undefined && holder !== n.id) {
      throw exists(`project ${quote(n.project)} already has a node named ${quote(name)}`);
    }
    return this.change(actor, n, 'node.rename', { name }, { name });
  }

  async setTags(
    actor: string,
    ref: string,
    project: string | undefined,
    tags: string[],
  ): Promise<NodeRecord> {
    const n = this.nodes.resolve(ref, project);
    for (const t of tags) if (!isTag(t)) throw invalid(`${quote(t)} is not a tag (tag:NAME)`);
    const sorted = [...new Set(tags)].sort();
    return this.change(actor, n, 'node.tag', { tags: sorted }, { tags: JSON.stringify(sorted) });
  }

  async setRoutes(
    actor: string,
    ref: string,
    project: string | undefined,
    routes: string[],
  ): Promise<NodeRecord> {
    const n = this.nodes.resolve(ref, project);
    const notAdvertised = routes.filter((r) => !n.advertisedRoutes.includes(r));
    if (notAdvertised.length)
      throw precondition(`node ${n.name} does not advertise ${notAdvertised.join(', ')}`);
    return this.change(
      actor,
      n,
      'node.routes',
      { approvedRoutes: routes },
      { approved_routes: JSON.stringify(routes) },
    );
  }

  private async change(
    actor: string,
    n: NodeRecord,
    action: string,
    change: Partial<NodeRecord>,
    row: Partial<Database['nodes']>,
  ): Promise<NodeRecord> {
    await this.write(n.id, async (tx) => {
      await tx.updateTable('nodes').set(row).where('id', '=', n.id).execute();
      await audit(tx, this.now(), actor, action, n.id, { project: n.project, ...change });
    });
    return this.apply(n, change, 'node-changed');
  }

  /**
   * Applies a written change to memory and announces it. Built from the
   * record as it is after the write, not as it was before the await: a node
   * deleted meanwhile must not come back, and a concurrent change to another
   * field must not be undone.
   */
  apply(
    before: NodeRecord,
    change: Partial<NodeRecord>,
    event: 'node-added' | 'node-changed' | 'node-patched',
  ): NodeRecord {
    const current = this.nodes.get(before.id);
    const node = { ...(current ?? before), ...change };
    if (!current) return node;
    this.nodes.replace(node);
    if (event === 'node-patched') this.events.emit({ type: event, node, endpointsChanged: true });
    else this.events.emit({ type: event, node });
    return node;
  }
}

function sameNode(a: NodeRecord, b: NodeRecord): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

export function sameList<T>(a: readonly T[], b: readonly T[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
