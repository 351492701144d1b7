// The coordinator's in-memory model of projects, nodes, keys, policies and
// desired versions, assembled from one module per concern. Every mutation is
// written to the store in one transaction (with its audit entry) and only
// then applied to memory and announced to listeners, so what listeners see
// is durable. The exception is last_seen (see presence.ts).
import type { Kysely } from 'kysely';
import type { CompiledPolicy, PolicyTestOutcome } from '../policy/index.js';
import type { Database } from '../store/schema.js';
import { type AuditEntry, type AuditQuery, readAudit } from './audit.js';
import { type Change, type ChangeLog, SharedChangeLog, unshared } from './changelog.js';
import { Counters } from './counters.js';
import { CoordinatorError } from './errors.js';
import { EventBus, type StateEvent } from './events.js';
import { AddressPool } from './ipam.js';
import { KeyStore } from './keys.js';
import { NodeChanges } from './node-changes.js';
import { NodeIndex } from './node-index.js';
import { Policies, type PolicyRecord } from './policies.js';
import { Presence, type PresenceRecorder } from './presence.js';
import { type ProjectRecord, Projects } from './projects.js';
import { isNodeExpired, type NodeRecord, nodeFromRow } from './records.js';
import { type RegisterInput, Registration } from './registration.js';
import { RemoteChanges } from './remote-changes.js';
import { type DesiredArtifact, type DesiredVersionRecord, Versions } from './versions.js';

export interface StateOptions {
  ephemeralTimeoutMs: number;
  now?: () => number;
  /** How long changed last_seen times wait in memory before one transaction writes them all. */
  seenBatchMs?: number;
  /**
   * This coordinator's id when others share its PostgreSQL database: every
   * change is then recorded for them (changelog.ts) and numbers are taken
   * from the database. Unset with SQLite, which one process owns.
   */
  replica?: string;
}

export class State {
  readonly now: () => number;
  readonly keys: KeyStore;
  private readonly events = new EventBus();
  private readonly counters: Counters;
  private readonly log: ChangeLog;
  /** Applies other coordinators' changes; null when none share the database. */
  readonly remote: RemoteChanges | null;
  /** Set by replication: applies what other coordinators committed so far. */
  catchUp: (() => Promise<void>) | null = null;
  private readonly nodes = new NodeIndex();
  private readonly pool = new AddressPool([]);
  private readonly projects: Projects;
  private readonly policies: Policies;
  private readonly versions: Versions;
  private readonly presence: Presence;
  private readonly changes: NodeChanges;
  private readonly registration: Registration;
  private lastExpirySweep = 0;

  private constructor(
    private readonly db: Kysely<Database>,
    readonly options: StateOptions,
  ) {
    const now = options.now ?? Date.now;
    this.now = now;
    this.log = options.replica ? new SharedChangeLog(options.replica, now) : unshared;
    this.counters = new Counters(db, options.replica !== undefined);
    this.projects = new Projects(db, now, this.counters, this.nodes, this.events, this.log);
    this.keys = new KeyStore(db, now, (name) => this.requireProject(name));
    this.policies = new Policies(
      db,
      now,
      this.events,
      {
        requireProject: (name) => this.requireProject(name),
        projectNames: () => this.projects.names(),
        activeProjectNodes: (project) => this.activeProjectNodes(project),
      },
      this.log,
    );
    this.versions = new Versions(
      db,
      now,
      this.events,
      {
        requireProject: (name) => this.requireProject(name),
        listNodes: (project) => this.listNodes(project),
        isOnline: (id) => this.presence.isOnline(id),
        keys: this.keys,
      },
      this.log,
    );
    this.presence = new Presence(db, now, this.nodes, this.events, options.seenBatchMs);
    this.changes = new NodeChanges(db, now, this.nodes, this.pool, this.presence, this.events, this.log);
    this.registration = new Registration(now, {
      nodes: this.nodes,
      projects: this.projects,
      keys: this.keys,
      counters: this.counters,
      pool: this.pool,
      changes: this.changes,
      events: this.events,
      catchUp: options.replica ? () => this.catchUp?.() ?? Promise.resolve() : undefined,
    });
    this.remote = options.replica
      ? new RemoteChanges(
          db,
          {
            nodes: this.nodes,
            projects: this.projects,
            policies: this.policies,
            versions: this.versions,
            presence: this.presence,
            changes: this.changes,
            events: this.events,
          },
          options.replica,
          now,
        )
      : null;
  }

  static async load(db: Kysely<Database>, options: StateOptions): Promise<State> {
    const s = new State(db, options);
    s.lastExpirySweep = s.now();
    await s.counters.load();
    await s.projects.load();
    for (const r of await db.selectFrom('nodes').selectAll().execute()) {
      const n = nodeFromRow(r);
      s.nodes.add(n);
      s.pool.use(n.ipIndex);
    }
    await s.policies.load();
    await s.versions.load();
    return s;
  }

  onEvent(listener: (e: StateEvent) => void): void {
    this.events.on(listener);
  }

  /** The other coordinator node `id` streams to, when it streams to one and not here. */
  remoteHome(id: string): string | undefined {
    return this.presence.remoteHome(id);
  }

  /** Nodes streaming to this coordinator. */
  localOnline(): string[] {
    return this.presence.localIds();
  }

  /** Where stream opens and closes are recorded for other coordinators. */
  recordPresence(recorder: PresenceRecorder): void {
    this.presence.recorder = recorder;
  }

  // ---- projects

  listProjects(): (ProjectRecord & { nodeCount: number })[] {
    return this.projects.list();
  }

  requireProject(name: string): ProjectRecord {
    return this.projects.require(name);
  }

  getProject(name: string): ProjectRecord | undefined {
    return this.projects.get(name);
  }

  projectByNumber(numericId: number): ProjectRecord | undefined {
    return this.projects.byNumericId(numericId);
  }

  createProject(actor: string, name: string): Promise<ProjectRecord> {
    return this.projects.create(actor, name);
  }

  setMaxKeyAge(actor: string, name: string, maxKeyAgeMs: number | null): Promise<ProjectRecord> {
    return this.projects.setMaxKeyAge(actor, name, maxKeyAgeMs);
  }

  async deleteProject(actor: string, name: string, force: boolean): Promise<void> {
    const members = await this.projects.delete(actor, name, force);
    this.policies.forget(name);
    this.versions.forget(name);
    for (const n of members) this.events.emit({ type: 'node-removed', node: n });
  }

  // ---- nodes: queries

  getNode(id: string): NodeRecord | undefined {
    return this.nodes.get(id);
  }

  nodeByNumber(numericId: number): NodeRecord | undefined {
    return this.nodes.byNumericId(numericId);
  }

  nodeByMachineKey(machineKey: string): NodeRecord | undefined {
    return this.nodes.byMachine(machineKey);
  }

  projectNodes(project: string): NodeRecord[] {
    return this.nodes.projectNodes(project);
  }

  listNodes(project?: string): NodeRecord[] {
    if (project) this.requireProject(project);
    const list = project ? this.nodes.projectNodes(project) : this.nodes.all();
    return list.sort((a, b) => a.project.localeCompare(b.project) || a.name.localeCompare(b.name));
  }

  /** By id, unique id prefix, or name (project narrows names that repeat across projects). */
  resolveNode(ref: string, project?: string): NodeRecord {
    return this.nodes.resolve(ref, project);
  }

  isOnline(id: string): boolean {
    return this.presence.isOnline(id);
  }

  onlineCount(): number {
    return this.presence.count();
  }

  isExpired(n: NodeRecord, now = this.now()): boolean {
    return isNodeExpired(n, now);
  }

  /** When the node's key passes its project's maximum key age; null without a limit. */
  keyExpiresAt(n: NodeRecord): number | null {
    return this.projects.keyExpiresAt(n);
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
    return this.policies.compiled(project);
  }

  // ---- nodes: registration and agent-driven changes

  register(input: RegisterInput): Promise<{ node: NodeRecord; existing: boolean }> {
    return this.registration.register(input);
  }

  setOnline(id: string, online: boolean): void {
    this.presence.set(id, online);
  }

  /** Endpoints peers should try: what the agent reported, then where the coordinator saw it come from. */
  endpointsOf(n: NodeRecord): string[] {
    return this.presence.endpointsOf(n);
  }

  setObservedEndpoint(id: string, endpoint: string | undefined): void {
    this.presence.setObservedEndpoint(id, endpoint);
  }

  touch(id: string): void {
    this.presence.touch(id);
  }

  updateEndpoints(id: string, endpoints: string[]): Promise<void> {
    return this.changes.updateEndpoints(id, endpoints);
  }

  /** Peers do not see it; only policy changes are checked against it. */
  updateLockdownPorts(id: string, ports: number[]): Promise<void> {
    return this.changes.updateLockdownPorts(id, ports);
  }

  updateVersion(id: string, version: string): Promise<void> {
    return this.changes.updateVersion(id, version);
  }

  rotateNodeKey(id: string, nodeKey: string): Promise<NodeRecord> {
    return this.changes.rotateNodeKey(id, nodeKey);
  }

  /** `meshgate logout`: the node leaves for good, ephemeral or not; its machine forgets its identity. */
  logout(id: string): Promise<void> {
    return this.changes.logout(id);
  }

  /** Writes what is still only in memory; call it before the store closes. */
  close(): Promise<void> {
    return this.presence.close();
  }

  // ---- nodes: admin changes

  deleteNode(actor: string, ref: string, project?: string): Promise<NodeRecord> {
    return this.changes.delete(actor, ref, project);
  }

  expireNode(
    actor: string,
    ref: string,
    project: string | undefined,
    at: number | null,
  ): Promise<NodeRecord> {
    return this.changes.expire(actor, ref, project, at);
  }

  renameNode(actor: string, ref: string, project: string | undefined, name: string): Promise<NodeRecord> {
    return this.changes.rename(actor, ref, project, name);
  }

  setNodeTags(actor: string, ref: string, project: string | undefined, tags: string[]): Promise<NodeRecord> {
    return this.changes.setTags(actor, ref, project, tags);
  }

  setNodeRoutes(
    actor: string,
    ref: string,
    project: string | undefined,
    routes: string[],
  ): Promise<NodeRecord> {
    return this.changes.setRoutes(actor, ref, project, routes);
  }

  // ---- policy

  getPolicy(project: string): PolicyRecord | undefined {
    return this.policies.get(project);
  }

  setPolicy(actor: string, project: string, source: string, force = false): Promise<number> {
    return this.policies.set(actor, project, source, force);
  }

  getGlobalPolicy(): PolicyRecord | undefined {
    return this.policies.getGlobal();
  }

  /** Stores `source` verbatim; an empty one removes the global policy. */
  setGlobalPolicy(actor: string, source: string): Promise<number> {
    return this.policies.setGlobal(actor, source);
  }

  checkPolicy(project: string, source: string | undefined): PolicyTestOutcome[] {
    return this.policies.check(project, source);
  }

  // ---- desired versions (versions.ts)

  setDesiredVersion(
    actor: string,
    project: string,
    tag: string,
    version: string,
    artifact?: DesiredArtifact,
  ): Promise<DesiredVersionRecord> {
    return this.versions.set(actor, project, tag, version, artifact);
  }

  listDesiredVersions(project?: string): DesiredVersionRecord[] {
    return this.versions.list(project);
  }

  driftingNodes(project?: string): NodeRecord[] {
    return this.versions.driftingNodes(project);
  }

  isDrifting(n: NodeRecord): boolean {
    return this.versions.isDrifting(n);
  }

  desiredEntryFor(n: NodeRecord): DesiredVersionRecord | undefined {
    return this.versions.entryFor(n);
  }

  desiredEntryForAuthKey(text: string): Promise<DesiredVersionRecord | undefined> {
    return this.versions.entryForAuthKey(text);
  }

  desiredVersionFor(n: NodeRecord): string {
    return this.versions.versionFor(n);
  }

  reportUpdate(id: string, version: string, state: 'updating' | 'failed', reason: string): void {
    const n = this.nodes.get(id);
    if (n) this.versions.reportUpdate(n, version, state, reason);
  }

  updateStates(project?: string): ReturnType<Versions['updateStates']> {
    return this.versions.updateStates(project);
  }

  // ---- audit log

  auditLog(q: AuditQuery): Promise<AuditEntry[]> {
    return readAudit(this.db, q);
  }

  // ---- lifecycle

  /** Deletes ephemeral nodes offline for longer than the timeout; returns them. */
  async reapEphemeral(): Promise<NodeRecord[]> {
    const cutoff = this.now() - this.options.ephemeralTimeoutMs;
    const stale = this.nodes
      .all()
      .filter((n) => n.ephemeral && !this.presence.isOnline(n.id) && (n.lastSeen ?? n.createdAt) < cutoff);
    for (const n of stale) await this.changes.remove('reaper', n, 'node.reap');
    return stale;
  }

  /** Announces nodes whose expiry time or maximum key age passed since the last sweep, so peers drop them. */
  sweepExpiry(): void {
    const now = this.now();
    const passed = (at: number | null) => at !== null && at > this.lastExpirySweep && at <= now;
    for (const n of this.nodes.values()) {
      if (passed(n.expiresAt) || passed(this.keyExpiresAt(n)))
        this.events.emit({ type: 'node-changed', node: n });
    }
    this.lastExpirySweep = now;
  }
}

export type { ApiKeyRecord } from './keys.js';
export { policyNode } from './policies.js';
export type {
  Change,
  DesiredArtifact,
  DesiredVersionRecord,
  PolicyRecord,
  ProjectRecord,
  RegisterInput,
  StateEvent,
};
export { CoordinatorError };
