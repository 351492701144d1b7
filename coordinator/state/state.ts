// The coordinator's in-memory model of projects, nodes, keys, policies and
// desired versions. Every mutation goes through here: it is written to the
// store in one transaction (with its audit entry) and only then applied to
// memory and announced to listeners, so what listeners see is durable.
// The exception is last_seen: it changes on every stream open and close, so
// it is written in batches (see saveSeen) and may lag by one batch interval
// after a crash.
import { randomBytes } from 'node:crypto';
import type { Kysely, Transaction } from 'kysely';
import { isDnsLabel, isTag, toDnsLabel } from '../../proto/names.js';
import { quote, unsafeCharacter } from '../../proto/text.js';
import { drifts, requireSemVer, type SemVerError } from '../../release/semver.js';
import {
  type CompiledPolicy,
  compilePolicy,
  type Policy,
  PolicyError,
  type PolicyNode,
  type PolicyTestOutcome,
  parsePolicy,
  runPolicyTests,
  TcpPaths,
} from '../policy/index.js';
import type { Database } from '../store/schema.js';
import { type AuditEntry, type AuditQuery, audit, readAudit } from './audit.js';
import {
  CoordinatorError,
  denied,
  exists,
  invalid,
  notFound,
  precondition,
  unauthenticated,
} from './errors.js';
import { AddressPool, ipv4ForIndex, ipv6ForIndex } from './ipam.js';
import { KeyStore } from './keys.js';
import { type AuthKeyRecord, type NodeRecord, nodeFromRow, nodeToRow, storedTime } from './records.js';
import { type NodeView, type RolloutNode, Rollouts } from './rollout.js';

export type StateEvent =
  | { type: 'node-added'; node: NodeRecord }
  /** Something peers see changed (key, name, tags, routes, addresses). */
  | { type: 'node-changed'; node: NodeRecord }
  /** Only online state, last seen or endpoints changed. */
  | { type: 'node-patched'; node: NodeRecord; endpointsChanged: boolean }
  | { type: 'node-removed'; node: NodeRecord }
  | { type: 'policy-changed'; project: string }
  | { type: 'versions-changed'; project: string };

export interface ProjectRecord {
  name: string;
  /** Stable and never reused; how Headscale's API addresses the project (a "user"). */
  numericId: number;
  createdAt: number;
  /** Nodes whose key is older are cut off the mesh until they rotate it; null: no limit. */
  maxKeyAgeMs: number | null;
}

export interface PolicyRecord {
  source: string;
  parsed: Policy;
  updatedAt: number;
}

export interface DesiredVersionRecord {
  project: string;
  tag: string;
  version: string;
  updatedAt: number;
  /** Empty when the coordinator serves the artifact from its releases dir. */
  artifactUrl: string;
  sha256: string;
  /** Nodes running a newer version drift too: they are to go back to this one. */
  allowDowngrade: boolean;
  /** The signed manifest (JSON) of a served release, as it was when the entry was set. */
  manifest: string;
  /** At most this many nodes update at once (see rollout.ts). */
  maxUnavailable: number;
}

export interface DesiredArtifact {
  artifactUrl: string;
  sha256: string;
  allowDowngrade: boolean;
  manifest?: string;
  maxUnavailable?: number;
}

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

export interface StateOptions {
  ephemeralTimeoutMs: number;
  now?: () => number;
  /** How long changed last_seen times wait in memory before one transaction writes them all. */
  seenBatchMs?: number;
}

const SEEN_BATCH_MS = 5_000;

type Counter = 'projects' | 'nodes';

export class State {
  private readonly projects = new Map<string, ProjectRecord>();
  private readonly nodes = new Map<string, NodeRecord>();
  private readonly byMachineKey = new Map<string, string>();
  /** WireGuard public key -> node id: a key listed twice in a netmap stops every agent that sees it. */
  private readonly byNodeKey = new Map<string, string>();
  private readonly byProject = new Map<string, Set<string>>();
  /** project -> node name -> node id, so picking a free name does not scan the project. */
  private readonly names = new Map<string, Map<string, string>>();
  private readonly policies = new Map<string, PolicyRecord>();
  /** Applies to every project without a policy of its own (set through Headscale's API). */
  private globalPolicy: PolicyRecord | undefined;
  private readonly projectsByNumber = new Map<number, string>();
  private readonly nodesByNumber = new Map<number, string>();
  private readonly lastNumber: Record<Counter, number> = { projects: 0, nodes: 0 };
  /** Names being created, so that two concurrent creates of one name cannot both pass the check. */
  private readonly creating = new Set<string>();
  private readonly versions = new Map<string, Map<string, DesiredVersionRecord>>();
  private readonly rollout = new Rollouts();
  private readonly compiledCache = new Map<string, CompiledPolicy>();
  private readonly online = new Set<string>();
  private readonly observed = new Map<string, string>();
  private readonly unsavedSeen = new Set<string>();
  private seenTimer: NodeJS.Timeout | null = null;
  private seenWrite: Promise<void> = Promise.resolve();
  private closed = false;
  private readonly listeners: ((e: StateEvent) => void)[] = [];
  private pool = new AddressPool([]);
  private lastExpirySweep = 0;
  readonly now: () => number;
  readonly keys: KeyStore;

  private constructor(
    private readonly db: Kysely<Database>,
    readonly options: StateOptions,
  ) {
    this.now = options.now ?? Date.now;
    this.keys = new KeyStore(db, this.now, (name) => this.requireProject(name));
  }

  static async load(db: Kysely<Database>, options: StateOptions): Promise<State> {
    const s = new State(db, options);
    s.lastExpirySweep = s.now();
    for (const c of await db.selectFrom('id_counters').selectAll().execute()) {
      s.lastNumber[c.name as Counter] = Number(c.last);
    }
    for (const p of await db.selectFrom('projects').selectAll().execute()) {
      s.indexProject({
        name: p.name,
        numericId: Number(p.numeric_id),
        createdAt: storedTime(p.created_at),
        maxKeyAgeMs: p.max_key_age_ms === null ? null : Number(p.max_key_age_ms),
      });
    }
    const rows = await db.selectFrom('nodes').selectAll().execute();
    for (const r of rows) s.indexNode(nodeFromRow(r));
    s.pool = new AddressPool(rows.map((r) => Number(r.ip_index)));
    for (const p of await db.selectFrom('policies').selectAll().execute()) {
      s.policies.set(p.project, {
        source: p.source,
        parsed: parsePolicy(p.source, { stored: true }),
        updatedAt: storedTime(p.updated_at),
      });
    }
    const global = await db.selectFrom('global_policy').selectAll().executeTakeFirst();
    if (global) {
      s.globalPolicy = {
        source: global.source,
        parsed: parsePolicy(global.source),
        updatedAt: Number(global.updated_at),
      };
    }
    for (const v of await db.selectFrom('desired_versions').selectAll().execute()) {
      s.versionMap(v.project).set(v.tag, {
        project: v.project,
        tag: v.tag,
        version: v.version,
        updatedAt: storedTime(v.updated_at),
        artifactUrl: v.artifact_url,
        sha256: v.sha256,
        allowDowngrade: Boolean(v.allow_downgrade),
        manifest: v.manifest,
        maxUnavailable: v.max_unavailable,
      });
    }
    return s;
  }

  onEvent(listener: (e: StateEvent) => void): void {
    this.listeners.push(listener);
  }

  /** Reserves the next number of a counter in memory; `saveNumber` makes it durable. */
  private nextNumber(counter: Counter): number {
    this.lastNumber[counter] += 1;
    return this.lastNumber[counter];
  }

  /** Inside the transaction that uses `n`: the stored counter never goes back. */
  private async saveNumber(tx: Transaction<Database>, counter: Counter, n: number): Promise<void> {
    await tx
      .updateTable('id_counters')
      .set({ last: n })
      .where('name', '=', counter)
      .where('last', '<', n)
      .execute();
  }

  private emit(e: StateEvent): void {
    if (e.type !== 'node-patched' && e.type !== 'versions-changed') {
      const project = e.type === 'policy-changed' ? e.project : e.node.project;
      this.compiledCache.delete(project);
    }
    for (const l of this.listeners) l(e);
  }

  // ---- projects

  listProjects(): (ProjectRecord & { nodeCount: number })[] {
    return [...this.projects.values()]
      .map((p) => ({ ...p, nodeCount: this.byProject.get(p.name)?.size ?? 0 }))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  requireProject(name: string): ProjectRecord {
    const p = this.projects.get(name);
    if (!p) throw notFound(`project ${quote(name)} does not exist`);
    return p;
  }

  getProject(name: string): ProjectRecord | undefined {
    return this.projects.get(name);
  }

  projectByNumber(numericId: number): ProjectRecord | undefined {
    const name = this.projectsByNumber.get(numericId);
    return name === undefined ? undefined : this.projects.get(name);
  }

  async createProject(actor: string, name: string): Promise<ProjectRecord> {
    if (!isDnsLabel(name))
      throw invalid(`project name ${quote(name)} must be a DNS label (a-z, 0-9, -; at most 63)`);
    if (this.projects.has(name) || this.creating.has(name))
      throw exists(`project ${quote(name)} already exists`);
    this.creating.add(name);
    try {
      const p = { name, numericId: this.nextNumber('projects'), createdAt: this.now(), maxKeyAgeMs: null };
      await this.db.transaction().execute(async (tx) => {
        await tx
          .insertInto('projects')
          .values({ name, created_at: p.createdAt, numeric_id: p.numericId })
          .execute();
        await this.saveNumber(tx, 'projects', p.numericId);
        await audit(tx, this.now(), actor, 'project.create', name);
      });
      this.indexProject(p);
      return p;
    } finally {
      this.creating.delete(name);
    }
  }

  private indexProject(p: ProjectRecord): void {
    this.projects.set(p.name, p);
    this.projectsByNumber.set(p.numericId, p.name);
    if (!this.byProject.has(p.name)) this.byProject.set(p.name, new Set());
  }

  /**
   * The oldest a node key of the project may be; null removes the limit. Nodes
   * over it leave their peers' netmaps (and see no peers) until their agent
   * rotates the key; they stay registered and connected so that it can.
   */
  async setMaxKeyAge(actor: string, name: string, maxKeyAgeMs: number | null): Promise<ProjectRecord> {
    const p = this.requireProject(name);
    if (maxKeyAgeMs !== null && !(Number.isSafeInteger(maxKeyAgeMs) && maxKeyAgeMs >= 1000))
      throw invalid('the maximum key age must be at least 1s');
    await this.db.transaction().execute(async (tx) => {
      await tx
        .updateTable('projects')
        .set({ max_key_age_ms: maxKeyAgeMs })
        .where('name', '=', name)
        .execute();
      await audit(tx, this.now(), actor, 'project.max-key-age', name, { maxKeyAgeMs });
    });
    const next = { ...p, maxKeyAgeMs };
    this.projects.set(name, next);
    for (const n of this.projectNodes(name)) this.emit({ type: 'node-changed', node: n });
    return next;
  }

  async deleteProject(actor: string, name: string, force: boolean): Promise<void> {
    this.requireProject(name);
    const members = this.projectNodes(name);
    if (members.length > 0 && !force) {
      throw precondition(
        `project ${quote(name)} still has ${members.length} node(s); delete them first or use --force`,
      );
    }
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('nodes').where('project', '=', name).execute();
      await tx.deleteFrom('projects').where('name', '=', name).execute();
      await audit(tx, this.now(), actor, 'project.delete', name, { nodes: members.length });
    });
    for (const n of members) this.unindexNode(n);
    this.projectsByNumber.delete(this.projects.get(name)!.numericId);
    this.projects.delete(name);
    this.byProject.delete(name);
    this.names.delete(name);
    this.policies.delete(name);
    this.versions.delete(name);
    for (const n of members) this.emit({ type: 'node-removed', node: n });
  }

  // ---- nodes: queries

  getNode(id: string): NodeRecord | undefined {
    return this.nodes.get(id);
  }

  nodeByNumber(numericId: number): NodeRecord | undefined {
    const id = this.nodesByNumber.get(numericId);
    return id === undefined ? undefined : this.nodes.get(id);
  }

  nodeByMachineKey(machineKey: string): NodeRecord | undefined {
    const id = this.byMachineKey.get(machineKey);
    return id === undefined ? undefined : this.nodes.get(id);
  }

  projectNodes(project: string): NodeRecord[] {
    const ids = this.byProject.get(project);
    return ids ? [...ids].map((id) => this.nodes.get(id)!) : [];
  }

  listNodes(project?: string): NodeRecord[] {
    if (project) this.requireProject(project);
    const list = project ? this.projectNodes(project) : [...this.nodes.values()];
    return list.sort((a, b) => a.project.localeCompare(b.project) || a.name.localeCompare(b.name));
  }

  /** By id, unique id prefix, or name (project narrows names that repeat across projects). */
  resolveNode(ref: string, project?: string): NodeRecord {
    if (!ref) throw invalid('a node id or name is required');
    const exact = this.nodes.get(ref);
    if (exact && (!project || exact.project === project)) return exact;
    const pool = project ? this.projectNodes(project) : [...this.nodes.values()];
    const byName = pool.filter((n) => n.name === ref);
    if (byName.length === 1) return byName[0]!;
    if (byName.length > 1) throw invalid(`node name ${quote(ref)} exists in several projects; add --project`);
    const byPrefix = pool.filter((n) => n.id.startsWith(ref));
    if (byPrefix.length === 1) return byPrefix[0]!;
    if (byPrefix.length > 1)
      throw invalid(`${quote(ref)} matches ${byPrefix.length} node ids; give more characters`);
    throw notFound(`no node ${quote(ref)}${project ? ` in project ${quote(project)}` : ''}`);
  }

  isOnline(id: string): boolean {
    return this.online.has(id);
  }

  onlineCount(): number {
    return this.online.size;
  }

  isExpired(n: NodeRecord, now = this.now()): boolean {
    return n.expiresAt !== null && n.expiresAt <= now;
  }

  /** When the node's key passes its project's maximum key age; null without a limit. */
  keyExpiresAt(n: NodeRecord): number | null {
    const max = this.projects.get(n.project)?.maxKeyAgeMs ?? null;
    return max === null ? null : n.keySetAt + max;
  }

  /** The node's key is older than its project allows: cut off the mesh until it rotates. */
  isKeyExpired(n: NodeRecord, now = this.now()): boolean {
    const at = this.keyExpiresAt(n);
    return at !== null && at <= now;
  }

  /** Nodes that take part in the mesh: expired nodes are cut off until re-authorized, stale keys until rotated. */
  activeProjectNodes(project: string): NodeRecord[] {
    const now = this.now();
    return this.projectNodes(project).filter((n) => !this.isExpired(n, now) && !this.isKeyExpired(n, now));
  }

  compiled(project: string): CompiledPolicy {
    let c = this.compiledCache.get(project);
    if (!c) {
      const own = this.policies.get(project)?.parsed;
      const nodes: PolicyNode[] = this.activeProjectNodes(project).map(policyNode);
      if (own) c = compilePolicy(own, nodes);
      else if (this.globalPolicy) {
        // Headscale's users are projects here, so autogroup:self pairs the nodes of one project.
        c = compilePolicy(
          this.globalPolicy.parsed,
          nodes.map((n) => ({ ...n, owner: project })),
        );
      } else c = compilePolicy(null, nodes);
      this.compiledCache.set(project, c);
    }
    return c;
  }

  // ---- nodes: registration and agent-driven changes

  async register(input: RegisterInput): Promise<{ node: NodeRecord; existing: boolean }> {
    const known = this.nodeByMachineKey(input.machineKey);
    if (known && !this.isExpired(known)) {
      const node = await this.refreshKnownNode(known, input);
      return { node, existing: true };
    }
    const key = await this.checkAuthKey(input.authKey, known);
    const tags = this.tagsFor(key, input.requestedTags);
    if (known) {
      // An expired node re-authorized with a fresh key keeps its identity and addresses.
      const keySetAt = input.nodeKey === known.nodeKey ? known.keySetAt : this.now();
      const release = this.claimNodeKey(input.nodeKey, known.id);
      try {
        await this.db.transaction().execute(async (tx) => {
          await this.keys.spend(tx, key);
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
      const node = this.applyChange(
        known,
        { expiresAt: null, tags, nodeKey: input.nodeKey, keySetAt },
        'node-added',
      );
      return { node, existing: true };
    }
    this.requireFreeNodeKey(input.nodeKey);
    const index = this.pool.reserve();
    const now = this.now();
    const node: NodeRecord = {
      id: randomBytes(8).toString('hex'),
      numericId: this.nextNumber('nodes'),
      project: key.project,
      name: this.uniqueName(key.project, toDnsLabel(input.hostname) || 'node'),
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
    this.indexNode(node);
    try {
      await this.db.transaction().execute(async (tx) => {
        await this.keys.spend(tx, key);
        await tx.insertInto('nodes').values(nodeToRow(node)).execute();
        await this.saveNumber(tx, 'nodes', node.numericId);
      });
    } catch (err) {
      this.unindexNode(node);
      this.pool.release(index);
      throw duplicateKeyOr(err);
    }
    this.emit({ type: 'node-added', node });
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
    const release = this.claimNodeKey(node.nodeKey, known.id);
    try {
      await this.db
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
        .execute();
    } catch (err) {
      release();
      throw duplicateKeyOr(err);
    }
    if (changed) return this.applyChange(known, change, 'node-changed');
    return this.applyChange(known, change, 'node-patched');
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
    const key = await this.keys.usableAuthKey(text);
    if (known && known.project !== key.project)
      throw denied(`auth key ${key.id} belongs to another project than node ${known.name}`);
    if (!this.projects.has(key.project))
      throw unauthenticated(`auth key ${key.id} belongs to a deleted project`);
    return key;
  }

  private tagsFor(key: AuthKeyRecord, requested: string[]): string[] {
    for (const t of requested) {
      if (!isTag(t)) throw invalid(`${quote(t)} is not a tag (tag:NAME)`);
      if (!key.tags.includes(t))
        throw denied(
          `auth key ${key.id} does not allow ${t} (it allows: ${key.tags.join(', ') || 'no tags'})`,
        );
    }
    return requested.length ? [...new Set(requested)].sort() : key.tags;
  }

  private uniqueName(project: string, base: string): string {
    const taken = this.names.get(project);
    if (!taken?.has(base)) return base;
    for (let i = 2; ; i++) {
      const suffix = `-${i}`;
      const candidate = base.slice(0, 63 - suffix.length) + suffix;
      if (!taken.has(candidate)) return candidate;
    }
  }

  setOnline(id: string, online: boolean): void {
    const n = this.nodes.get(id);
    if (!n || this.online.has(id) === online) return;
    if (online) this.online.add(id);
    else this.online.delete(id);
    n.lastSeen = this.now();
    this.markSeen(id);
    this.emit({ type: 'node-patched', node: n, endpointsChanged: false });
    this.advanceRollout(n.project);
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
    this.emit({ type: 'node-patched', node: n, endpointsChanged: true });
  }

  touch(id: string): void {
    const n = this.nodes.get(id);
    if (n) n.lastSeen = this.now();
  }

  async updateEndpoints(id: string, endpoints: string[]): Promise<void> {
    const n = this.nodes.get(id);
    if (!n || sameList(endpoints, n.endpoints)) return;
    n.endpoints = endpoints;
    await this.db
      .updateTable('nodes')
      .set({ endpoints: JSON.stringify(endpoints) })
      .where('id', '=', id)
      .execute();
    this.emit({ type: 'node-patched', node: n, endpointsChanged: true });
  }

  /** Peers do not see it; only policy changes are checked against it. */
  async updateLockdownPorts(id: string, ports: number[]): Promise<void> {
    const n = this.nodes.get(id);
    if (!n || sameList(ports, n.lockdownPorts)) return;
    await this.db
      .updateTable('nodes')
      .set({ lockdown_ports: JSON.stringify(ports) })
      .where('id', '=', id)
      .execute();
    n.lockdownPorts = ports;
  }

  async updateVersion(id: string, version: string): Promise<void> {
    const n = this.nodes.get(id);
    if (!n || n.version === version) return;
    await this.db.updateTable('nodes').set({ version }).where('id', '=', id).execute();
    this.applyChange(n, { version }, 'node-changed');
    this.advanceRollout(n.project);
  }

  async rotateNodeKey(id: string, nodeKey: string): Promise<NodeRecord> {
    const n = this.nodes.get(id);
    if (!n) throw notFound('node does not exist');
    if (n.nodeKey === nodeKey) return n;
    const release = this.claimNodeKey(nodeKey, id);
    const keySetAt = this.now();
    try {
      await this.db
        .updateTable('nodes')
        .set({ node_key: nodeKey, key_set_at: keySetAt })
        .where('id', '=', id)
        .execute();
    } catch (err) {
      release();
      throw duplicateKeyOr(err);
    }
    return this.applyChange(n, { nodeKey, keySetAt }, 'node-changed');
  }

  /** `meshgate logout`: the node leaves for good, ephemeral or not; its machine forgets its identity. */
  async logout(id: string): Promise<void> {
    const n = this.nodes.get(id);
    if (n) await this.removeNode('node', n, 'node.logout');
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
    }, this.options.seenBatchMs ?? SEEN_BATCH_MS);
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

  // ---- nodes: admin changes

  async deleteNode(actor: string, ref: string, project?: string): Promise<NodeRecord> {
    const n = this.resolveNode(ref, project);
    await this.removeNode(actor, n, 'node.delete');
    return n;
  }

  private async removeNode(actor: string, n: NodeRecord, action: string): Promise<void> {
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('nodes').where('id', '=', n.id).execute();
      await audit(tx, this.now(), actor, action, n.id, { project: n.project, name: n.name });
    });
    this.unindexNode(n);
    this.pool.release(n.ipIndex);
    this.online.delete(n.id);
    this.observed.delete(n.id);
    this.emit({ type: 'node-removed', node: n });
  }

  async expireNode(
    actor: string,
    ref: string,
    project: string | undefined,
    at: number | null,
  ): Promise<NodeRecord> {
    const n = this.resolveNode(ref, project);
    return this.changeNode(actor, n, 'node.expire', { expiresAt: at }, { expires_at: at });
  }

  async renameNode(
    actor: string,
    ref: string,
    project: string | undefined,
    name: string,
  ): Promise<NodeRecord> {
    const n = this.resolveNode(ref, project);
    if (!isDnsLabel(name))
      throw invalid(`node name ${quote(name)} must be a DNS label (a-z, 0-9, -; at most 63)`);
    const holder = this.names.get(n.project)?.get(name);
    if (holder !== undefined && holder !== n.id) {
      throw exists(`project ${quote(n.project)} already has a node named ${quote(name)}`);
    }
    return this.changeNode(actor, n, 'node.rename', { name }, { name });
  }

  async setNodeTags(
    actor: string,
    ref: string,
    project: string | undefined,
    tags: string[],
  ): Promise<NodeRecord> {
    const n = this.resolveNode(ref, project);
    for (const t of tags) if (!isTag(t)) throw invalid(`${quote(t)} is not a tag (tag:NAME)`);
    const sorted = [...new Set(tags)].sort();
    return this.changeNode(actor, n, 'node.tag', { tags: sorted }, { tags: JSON.stringify(sorted) });
  }

  async setNodeRoutes(
    actor: string,
    ref: string,
    project: string | undefined,
    routes: string[],
  ): Promise<NodeRecord> {
    const n = this.resolveNode(ref, project);
    const notAdvertised = routes.filter((r) => !n.advertisedRoutes.includes(r));
    if (notAdvertised.length)
      throw precondition(`node ${n.name} does not advertise ${notAdvertised.join(', ')}`);
    return this.changeNode(
      actor,
      n,
      'node.routes',
      { approvedRoutes: routes },
      { approved_routes: JSON.stringify(routes) },
    );
  }

  private async changeNode(
    actor: string,
    n: NodeRecord,
    action: string,
    change: Partial<NodeRecord>,
    row: Partial<Database['nodes']>,
  ): Promise<NodeRecord> {
    await this.db.transaction().execute(async (tx) => {
      await tx.updateTable('nodes').set(row).where('id', '=', n.id).execute();
      await audit(tx, this.now(), actor, action, n.id, { project: n.project, ...change });
    });
    return this.applyChange(n, change, 'node-changed');
  }

  // ---- policy

  getPolicy(project: string): PolicyRecord | undefined {
    this.requireProject(project);
    return this.policies.get(project);
  }

  /**
   * Refuses, unless forced, a policy whose own tests fail or that leaves a locked-down node with no path
   * from the rest of the project on a port it closes elsewhere: that node would be reachable from nowhere.
   */
  async setPolicy(actor: string, project: string, source: string, force = false): Promise<number> {
    this.requireProject(project);
    const now = this.now();
    const parsed = source.trim() ? parseOrInvalid(source) : null;
    const objections = parsed ? this.policyObjections(project, parsed) : { failedTests: [], cut: [] };
    const objected = objections.failedTests.length > 0 || objections.cut.length > 0;
    if (objected && !force) throw precondition(`policy not set: ${describeObjections(objections)}`);
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('policies').where('project', '=', project).execute();
      if (parsed) await tx.insertInto('policies').values({ project, source, updated_at: now }).execute();
      const detail = objected ? { force: true, ...objections } : force ? { force: true } : {};
      await audit(tx, this.now(), actor, parsed ? 'policy.set' : 'policy.remove', project, detail);
    });
    if (parsed) this.policies.set(project, { source, parsed, updatedAt: now });
    else this.policies.delete(project);
    this.emit({ type: 'policy-changed', project });
    return now;
  }

  private policyObjections(project: string, policy: Policy): PolicyObjections {
    const nodes = this.activeProjectNodes(project);
    const members = nodes.map(policyNode);
    const failedTests = runPolicyTests(policy, members)
      .filter((t) => !t.passed)
      .map((t) => t.message);
    const locked = nodes.filter((n) => n.lockdownPorts.length > 0);
    if (locked.length === 0) return { failedTests, cut: [] };
    const own = this.policies.get(project)?.parsed;
    const before = own
      ? new TcpPaths(own, members)
      : this.globalPolicy
        ? new TcpPaths(
            this.globalPolicy.parsed,
            members.map((m) => ({ ...m, owner: project })),
          )
        : new TcpPaths(null, members);
    const after = new TcpPaths(policy, members);
    const cut = locked.flatMap((n) =>
      n.lockdownPorts
        .filter((port) => before.hasPath(n.id, port) && !after.hasPath(n.id, port))
        .map((port) => `${n.name} (tcp ${port})`),
    );
    return { failedTests, cut };
  }

  getGlobalPolicy(): PolicyRecord | undefined {
    return this.globalPolicy;
  }

  /** Stores `source` verbatim; an empty one removes the global policy. */
  async setGlobalPolicy(actor: string, source: string): Promise<number> {
    const now = this.now();
    const parsed = source.trim() ? parseOrInvalid(source) : null;
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('global_policy').execute();
      if (parsed) await tx.insertInto('global_policy').values({ id: 1, source, updated_at: now }).execute();
      await audit(tx, this.now(), actor, parsed ? 'policy.global.set' : 'policy.global.remove', '*');
    });
    this.globalPolicy = parsed ? { source, parsed, updatedAt: now } : undefined;
    for (const p of this.projects.keys()) {
      if (!this.policies.has(p)) this.emit({ type: 'policy-changed', project: p });
    }
    return now;
  }

  checkPolicy(project: string, source: string | undefined): PolicyTestOutcome[] {
    this.requireProject(project);
    const policy = source?.trim() ? parseOrInvalid(source) : this.policies.get(project)?.parsed;
    if (!policy) throw precondition(`project ${quote(project)} has no policy to check`);
    return runPolicyTests(policy, this.activeProjectNodes(project).map(policyNode));
  }

  // ---- desired versions

  private versionMap(project: string): Map<string, DesiredVersionRecord> {
    let m = this.versions.get(project);
    if (!m) {
      m = new Map();
      this.versions.set(project, m);
    }
    return m;
  }

  async setDesiredVersion(
    actor: string,
    project: string,
    tag: string,
    version: string,
    artifact: DesiredArtifact = { artifactUrl: '', sha256: '', allowDowngrade: false, manifest: '' },
  ): Promise<DesiredVersionRecord> {
    this.requireProject(project);
    if (tag && !isTag(tag)) throw invalid(`${quote(tag)} is not a tag (tag:NAME)`);
    // Checked before the semver parser, whose message quotes the version.
    if (version.length > 64 || /\s/.test(version) || unsafeCharacter(version))
      throw invalid('version must be at most 64 characters without spaces or control characters');
    if (version) {
      try {
        requireSemVer(version);
      } catch (err) {
        throw invalid((err as SemVerError).message);
      }
    }
    const { artifactUrl, sha256 } = artifact;
    if (artifactUrl && (artifactUrl.length > 2048 || !/^https?:\/\/[^\s]+$/.test(artifactUrl)))
      throw invalid('artifact URL must be an http(s) URL of at most 2048 characters');
    if (sha256 && !/^[0-9a-f]{64}$/.test(sha256)) throw invalid('sha256 must be 64 lowercase hex digits');
    const rec: DesiredVersionRecord = {
      project,
      tag,
      version,
      updatedAt: this.now(),
      artifactUrl: version ? artifactUrl : '',
      sha256: version ? sha256 : '',
      allowDowngrade: version ? artifact.allowDowngrade : false,
      manifest: version && !artifactUrl ? (artifact.manifest ?? '') : '',
      maxUnavailable: Math.max(1, artifact.maxUnavailable ?? 1),
    };
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('desired_versions').where('project', '=', project).where('tag', '=', tag).execute();
      if (version)
        await tx
          .insertInto('desired_versions')
          .values({
            project,
            tag,
            version,
            updated_at: rec.updatedAt,
            artifact_url: rec.artifactUrl,
            sha256: rec.sha256,
            allow_downgrade: rec.allowDowngrade ? 1 : 0,
            manifest: rec.manifest,
            max_unavailable: rec.maxUnavailable,
          })
          .execute();
      await audit(tx, this.now(), actor, version ? 'version.set' : 'version.remove', project, {
        tag,
        version,
        ...(rec.artifactUrl ? { artifactUrl: rec.artifactUrl } : {}),
        ...(rec.allowDowngrade ? { allowDowngrade: true } : {}),
      });
    });
    if (version) this.versionMap(project).set(tag, rec);
    else this.versionMap(project).delete(tag);
    // Setting a version again is how an operator resumes a halted rollout.
    this.rollout.retry(this.projectNodes(project).map((n) => n.id));
    this.rollout.schedule(this.rolloutNodes(project));
    this.emit({ type: 'versions-changed', project });
    return rec;
  }

  listDesiredVersions(project?: string): DesiredVersionRecord[] {
    if (project) this.requireProject(project);
    const all = project
      ? [...(this.versions.get(project)?.values() ?? [])]
      : [...this.versions.values()].flatMap((m) => [...m.values()]);
    return all.sort((a, b) => a.project.localeCompare(b.project) || a.tag.localeCompare(b.tag));
  }

  /** Nodes that run an older version than desired, or a newer one when a downgrade is allowed. */
  driftingNodes(project?: string): NodeRecord[] {
    return this.listNodes(project).filter((n) => this.isDrifting(n));
  }

  isDrifting(n: NodeRecord): boolean {
    const want = this.desiredEntry(n.project, n.tags);
    return want !== undefined && drifts(n.version, want.version, want.allowDowngrade);
  }

  /**
   * The entry a node is told about: the most specific one (a tag of the node, first in name
   * order, then the project's), once the rollout lets the node update.
   */
  desiredEntryFor(n: NodeRecord): DesiredVersionRecord | undefined {
    const entry = this.desiredEntry(n.project, n.tags);
    return entry && this.rollout.released(this.rolloutNode(n)) ? entry : undefined;
  }

  // ---- rollouts (the scheduling is in rollout.ts)

  private rolloutNode(n: NodeRecord): RolloutNode {
    const e = this.desiredEntry(n.project, n.tags);
    return {
      id: n.id,
      name: n.name,
      version: n.version,
      online: this.online.has(n.id),
      target: e && {
        entry: e.tag,
        version: e.version,
        allowDowngrade: e.allowDowngrade,
        maxUnavailable: e.maxUnavailable,
      },
    };
  }

  private rolloutNodes(project: string): RolloutNode[] {
    return this.projectNodes(project).map((n) => this.rolloutNode(n));
  }

  /** Lets the next nodes of a project's rollout update, and tells their agents. */
  private advanceRollout(project: string): void {
    if (!this.versions.get(project)?.size) return;
    if (this.rollout.schedule(this.rolloutNodes(project)).length)
      this.emit({ type: 'versions-changed', project });
  }

  /** What a node's agent says about its update (UpdateReport). */
  reportUpdate(id: string, version: string, state: 'updating' | 'failed', reason: string): void {
    const n = this.nodes.get(id);
    if (!n) return;
    this.rollout.report(id, version, state, reason);
    this.rollout.schedule(this.rolloutNodes(n.project));
    this.emit({ type: 'versions-changed', project: n.project });
  }

  /** Every node under a desired version, with its update state (versions list). */
  updateStates(project?: string): { node: NodeRecord; desired: string; view: NodeView }[] {
    const nodes = this.listNodes(project).filter((n) => this.desiredEntry(n.project, n.tags));
    const out: { node: NodeRecord; desired: string; view: NodeView }[] = [];
    for (const p of new Set(nodes.map((n) => n.project))) {
      const views = this.rollout.view(this.rolloutNodes(p));
      for (const n of nodes.filter((x) => x.project === p))
        out.push({ node: n, desired: this.desiredEntry(n.project, n.tags)!.version, view: views.get(n.id)! });
    }
    return out;
  }

  private desiredEntry(project: string, tags: string[]): DesiredVersionRecord | undefined {
    const m = this.versions.get(project);
    if (!m) return undefined;
    for (const t of tags) {
      const v = m.get(t);
      if (v) return v;
    }
    return m.get('');
  }

  /**
   * The desired version for a machine that joins with this auth key (its
   * project and the key's tags), before it has a node: what install.sh installs.
   */
  async desiredEntryForAuthKey(text: string): Promise<DesiredVersionRecord | undefined> {
    const key = await this.keys.heldAuthKey(text);
    return this.desiredEntry(key.project, [...key.tags].sort());
  }

  /** The version set for the node, whether or not the rollout lets it update yet. */
  desiredVersionFor(n: NodeRecord): string {
    return this.desiredEntry(n.project, n.tags)?.version ?? '';
  }

  // ---- audit log

  auditLog(q: AuditQuery): Promise<AuditEntry[]> {
    return readAudit(this.db, q);
  }

  // ---- lifecycle

  /** Deletes ephemeral nodes offline for longer than the timeout; returns them. */
  async reapEphemeral(): Promise<NodeRecord[]> {
    const cutoff = this.now() - this.options.ephemeralTimeoutMs;
    const stale = [...this.nodes.values()].filter(
      (n) => n.ephemeral && !this.online.has(n.id) && (n.lastSeen ?? n.createdAt) < cutoff,
    );
    for (const n of stale) await this.removeNode('reaper', n, 'node.reap');
    return stale;
  }

  /** Announces nodes whose expiry time or maximum key age passed since the last sweep, so peers drop them. */
  sweepExpiry(): void {
    const now = this.now();
    const passed = (at: number | null) => at !== null && at > this.lastExpirySweep && at <= now;
    for (const n of this.nodes.values()) {
      if (passed(n.expiresAt) || passed(this.keyExpiresAt(n))) this.emit({ type: 'node-changed', node: n });
    }
    this.lastExpirySweep = now;
  }

  // ---- indexes

  private requireFreeNodeKey(nodeKey: string, self?: string): void {
    const holder = this.byNodeKey.get(nodeKey);
    // A holder that is gone was deleted while its key change was being written.
    if (holder !== undefined && holder !== self && this.nodes.has(holder)) throw duplicateNodeKey();
  }

  /**
   * Reserves a node key for `id` before the write that gives it the key, so
   * that a concurrent registration or rotation cannot take it meanwhile.
   * Returns what undoes the reservation if the write fails.
   */
  private claimNodeKey(nodeKey: string, id: string): () => void {
    this.requireFreeNodeKey(nodeKey, id);
    if (this.byNodeKey.get(nodeKey) === id) return () => {};
    this.byNodeKey.set(nodeKey, id);
    return () => {
      if (this.nodes.get(id)?.nodeKey !== nodeKey && this.byNodeKey.get(nodeKey) === id)
        this.byNodeKey.delete(nodeKey);
    };
  }

  private indexNode(n: NodeRecord): void {
    this.nodes.set(n.id, n);
    this.nodesByNumber.set(n.numericId, n.id);
    this.byMachineKey.set(n.machineKey, n.id);
    this.byNodeKey.set(n.nodeKey, n.id);
    let set = this.byProject.get(n.project);
    if (!set) {
      set = new Set();
      this.byProject.set(n.project, set);
    }
    set.add(n.id);
    let names = this.names.get(n.project);
    if (!names) {
      names = new Map();
      this.names.set(n.project, names);
    }
    names.set(n.name, n.id);
  }

  private unindexNode(n: NodeRecord): void {
    this.nodes.delete(n.id);
    this.nodesByNumber.delete(n.numericId);
    this.byMachineKey.delete(n.machineKey);
    if (this.byNodeKey.get(n.nodeKey) === n.id) this.byNodeKey.delete(n.nodeKey);
    this.byProject.get(n.project)?.delete(n.id);
    this.releaseName(n);
  }

  /**
   * Applies a written change to memory and announces it. Built from the
   * record as it is after the write, not as it was before the await: a node
   * deleted meanwhile must not come back, and a concurrent change to another
   * field must not be undone.
   */
  private applyChange(
    before: NodeRecord,
    change: Partial<NodeRecord>,
    event: 'node-added' | 'node-changed' | 'node-patched',
  ): NodeRecord {
    const current = this.nodes.get(before.id);
    const node = { ...(current ?? before), ...change };
    if (!current) return node;
    this.replaceNode(node);
    if (event === 'node-patched') this.emit({ type: event, node, endpointsChanged: true });
    else this.emit({ type: event, node });
    return node;
  }

  private replaceNode(n: NodeRecord): void {
    const old = this.nodes.get(n.id);
    if (old && old.nodeKey !== n.nodeKey) {
      if (this.byNodeKey.get(old.nodeKey) === n.id) this.byNodeKey.delete(old.nodeKey);
      this.byNodeKey.set(n.nodeKey, n.id);
    }
    if (old && old.name !== n.name) {
      this.releaseName(old);
      this.names.get(n.project)?.set(n.name, n.id);
    }
    this.nodes.set(n.id, n);
  }

  /**
   * Only if the name still points at this node: a registration that failed
   * after a concurrent rename took its name must not free the renamed node's.
   */
  private releaseName(n: NodeRecord): void {
    const names = this.names.get(n.project);
    if (names?.get(n.name) === n.id) names.delete(n.name);
  }
}

export function policyNode(n: NodeRecord): PolicyNode {
  return {
    id: n.id,
    name: n.name,
    ips: [n.ipv4, n.ipv6],
    tags: n.tags,
    owner: n.authKeyId,
    routes: n.approvedRoutes,
  };
}

interface PolicyObjections {
  /** Messages of the policy's own tests that fail. */
  failedTests: string[];
  /** "node (tcp PORT)" for each locked-down port that has a path from another node now and would have none. */
  cut: string[];
}

function describeObjections({ failedTests, cut }: PolicyObjections): string {
  const few = (items: string[]) =>
    items.length > 3 ? `${items.slice(0, 3).join('; ')}; and ${items.length - 3} more` : items.join('; ');
  const reasons = [
    ...(failedTests.length
      ? [`${failedTests.length} of its tests fail${failedTests.length > 1 ? '' : 's'}: ${few(failedTests)}`]
      : []),
    ...(cut.length
      ? [`it leaves no path from any other node of the project to locked-down ${few(cut)}`]
      : []),
  ];
  return `${reasons.join('; and ')}; fix it, or set it anyway with --force`;
}

function parseOrInvalid(source: string): Policy {
  try {
    return parsePolicy(source);
  } catch (err) {
    if (err instanceof PolicyError) throw invalid(err.message);
    throw err;
  }
}

function duplicateNodeKey(): CoordinatorError {
  return exists('node key is already used by another node; generate a new node key');
}

/** The store's unique index catches what the in-memory check cannot see (another coordinator). */
function duplicateKeyOr(err: unknown): unknown {
  const e = err as { code?: unknown; message?: unknown };
  const unique = e?.code === 'SQLITE_CONSTRAINT_UNIQUE' || e?.code === '23505';
  return unique && String(e.message).includes('node_key') ? duplicateNodeKey() : err;
}

function sameList<T>(a: readonly T[], b: readonly T[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

export type { ApiKeyRecord } from './keys.js';
export { CoordinatorError };
