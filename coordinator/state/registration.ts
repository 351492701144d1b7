// Registration: a machine joins with an auth key (a new node), comes back
// after expiry with a fresh key (same node, same addresses), or reconnects
// (usually nothing to write).
import { randomBytes } from 'node:crypto';
import { isTag, toDnsLabel } from '../../proto/names.js';
import { quote } from '../../proto/text.js';
import type { Counters } from './counters.js';
import { CoordinatorError, denied, invalid, unauthenticated } from './errors.js';
import type { EventBus } from './events.js';
import { type AddressPool, ipv4ForIndex, ipv6ForIndex } from './ipam.js';
import type { KeyStore } from './keys.js';
import { type NodeChanges, sameList } from './node-changes.js';
import { duplicateKeyOr, type NodeIndex } from './node-index.js';
import type { Projects } from './projects.js';
import { type AuthKeyRecord, isNodeExpired, type NodeRecord, nodeToRow } from './records.js';

export interface RegisterInput {
  authKey: string;
  machineKey: string;
  nodeKey: string;
  hostname: string;
  os: string;
  version: string;
  requestedTags: string[];
  endpoints: string[];
  advertisedRoutes: string[];
}

export class Registration {
  constructor(
    private readonly now: () => number,
    private readonly deps: {
      nodes: NodeIndex;
      projects: Projects;
      keys: KeyStore;
      counters: Counters;
      pool: AddressPool;
      changes: NodeChanges;
      events: EventBus;
      /**
       * Applies what other coordinators committed; set when they share the
       * database. A registration that collides with one of theirs (address,
       * name, machine) catches up and tries again.
       */
      catchUp?: () => Promise<void>;
    },
  ) {}

  async register(input: RegisterInput): Promise<{ node: NodeRecord; existing: boolean }> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.registerOnce(input);
      } catch (err) {
        if (!this.deps.catchUp || attempt >= MAX_ATTEMPTS || !collidedElsewhere(err)) throw err;
        // Coordinators that collided once tend to pick the same next address
        // again: a random pause spreads them out.
        await new Promise((r) => setTimeout(r, Math.random() * 20 * attempt));
        await this.deps.catchUp();
      }
    }
  }

  private async registerOnce(input: RegisterInput): Promise<{ node: NodeRecord; existing: boolean }> {
    const { nodes, keys, counters, pool, changes, events } = this.deps;
    const known = nodes.byMachine(input.machineKey);
    if (known && !isNodeExpired(known, this.now())) {
      const node = await this.refreshKnownNode(known, input);
      return { node, existing: true };
    }
    const key = await this.checkAuthKey(input.authKey, known);
    const tags = tagsFor(key, input.requestedTags);
    if (known) {
      // An expired node re-authorized with a fresh key keeps its identity and addresses.
      const keySetAt = input.nodeKey === known.nodeKey ? known.keySetAt : this.now();
      const release = nodes.claimNodeKey(input.nodeKey, known.id);
      try {
        await changes.write(known.id, async (tx) => {
          await keys.spend(tx, key);
          await tx
            .updateTable('nodes')
            .set({
              expires_at: null,
              tags: JSON.stringify(tags),
              node_key: input.nodeKey,
              key_set_at: keySetAt,
            })
            .where('id', '=', known.id)
            .execute();
        });
      } catch (err) {
        release();
        throw duplicateKeyOr(err);
      }
      const node = changes.apply(
        known,
        { expiresAt: null, tags, nodeKey: input.nodeKey, keySetAt },
        'node-added',
      );
      return { node, existing: true };
    }
    const numericId = await counters.next('nodes');
    const addressTurn = counters.shared ? await counters.next('addresses') : 0;
    // Registered meanwhile, here or (applied from the database) elsewhere: that node is this machine's.
    if (nodes.byMachine(input.machineKey)) return this.registerOnce(input);
    // From here to claiming the key and name nothing awaits.
    nodes.requireFreeNodeKey(input.nodeKey);
    const index = counters.shared ? pool.reserveFrom(addressTurn) : pool.reserve();
    const now = this.now();
    const node: NodeRecord = {
      id: randomBytes(8).toString('hex'),
      numericId,
      project: key.project,
      name: nodes.uniqueName(key.project, toDnsLabel(input.hostname) || 'node'),
      machineKey: input.machineKey,
      nodeKey: input.nodeKey,
      ipv4: ipv4ForIndex(index),
      ipv6: ipv6ForIndex(index),
      ipIndex: index,
      tags,
      ephemeral: key.ephemeral,
      authKeyId: key.id,
      hostname: input.hostname,
      os: input.os,
      version: input.version,
      endpoints: input.endpoints,
      advertisedRoutes: input.advertisedRoutes,
      approvedRoutes: [],
      createdAt: now,
      lastSeen: now,
      expiresAt: null,
      keySetAt: now,
      lockdownPorts: [],
    };
    // Claim the name before awaiting so a concurrent registration picks another.
    nodes.add(node);
    try {
      await changes.write(node.id, async (tx) => {
        await keys.spend(tx, key);
        await tx.insertInto('nodes').values(nodeToRow(node)).execute();
        await counters.save(tx, 'nodes', node.numericId);
      });
    } catch (err) {
      nodes.remove(node);
      pool.release(index);
      throw duplicateKeyOr(err);
    }
    events.emit({ type: 'node-added', node });
    return { node, existing: false };
  }

  /** Agents register again on every reconnect; usually nothing changed, and then nothing is written. */
  private async refreshKnownNode(known: NodeRecord, input: RegisterInput): Promise<NodeRecord> {
    const change = {
      nodeKey: input.nodeKey,
      keySetAt: input.nodeKey === known.nodeKey ? known.keySetAt : this.now(),
      hostname: input.hostname,
      os: input.os,
      version: input.version,
      advertisedRoutes: input.advertisedRoutes,
      endpoints: input.endpoints.length ? input.endpoints : known.endpoints,
    };
    const node: NodeRecord = { ...known, ...change };
    const changed =
      node.nodeKey !== known.nodeKey ||
      node.hostname !== known.hostname ||
      node.os !== known.os ||
      node.version !== known.version ||
      !sameList(node.advertisedRoutes, known.advertisedRoutes);
    const endpointsChanged = !sameList(node.endpoints, known.endpoints);
    if (!changed && !endpointsChanged) return known;
    const release = this.deps.nodes.claimNodeKey(node.nodeKey, known.id);
    try {
      await this.deps.changes.write(node.id, (tx) =>
        tx
          .updateTable('nodes')
          .set({
            node_key: node.nodeKey,
            key_set_at: node.keySetAt,
            hostname: node.hostname,
            os: node.os,
            version: node.version,
            advertised_routes: JSON.stringify(node.advertisedRoutes),
            endpoints: JSON.stringify(node.endpoints),
          })
          .where('id', '=', node.id)
          .execute(),
      );
    } catch (err) {
      release();
      throw duplicateKeyOr(err);
    }
    return this.deps.changes.apply(known, change, changed ? 'node-changed' : 'node-patched');
  }

  private async checkAuthKey(text: string, known: NodeRecord | undefined): Promise<AuthKeyRecord> {
    if (!text) {
      throw known
        ? unauthenticated(
            `node ${known.name} has expired; register again with a new auth key`,
            'node-expired',
          )
        : unauthenticated('an auth key is required to register a new machine', 'node-unknown');
    }
    const key = await this.deps.keys.usableAuthKey(text);
    if (known && known.project !== key.project)
      throw denied(`auth key ${key.id} belongs to another project than node ${known.name}`);
    if (!this.deps.projects.has(key.project))
      throw unauthenticated(`auth key ${key.id} belongs to a deleted project`);
    return key;
  }
}

const MAX_ATTEMPTS = 10;

/** A unique index other than the node key's refused the write: another coordinator got there first. */
function collidedElsewhere(err: unknown): boolean {
  const e = err as { code?: unknown; message?: unknown };
  if (e instanceof CoordinatorError) return false;
  return e?.code === '23505' && !String(e.message).includes('node_key');
}

function tagsFor(key: AuthKeyRecord, requested: string[]): string[] {
  for (const t of requested) {
    if (!isTag(t)) throw invalid(`${quote(t)} is not a tag (tag:NAME)`);
    if (!key.tags.includes(t))
      throw denied(`auth key ${key.id} does not allow ${t} (it allows: ${key.tags.join(', ') || 'no tags'})`);
  }
  return requested.length ? [...new Set(requested)].sort() : key.tags;
}
