// Projects: created, numbered, limited (maximum key age) and deleted here.
// Deleting one also removes its nodes; what else hangs off a project
// (policy, desired versions) is dropped by the caller.
import type { Kysely } from 'kysely';
import { isDnsLabel } from '../../proto/names.js';
import { quote } from '../../proto/text.js';
import type { Database } from '../store/schema.js';
import { audit } from './audit.js';
import type { ChangeLog } from './changelog.js';
import type { Counters } from './counters.js';
import { exists, invalid, notFound, precondition } from './errors.js';
import type { EventBus } from './events.js';
import type { NodeIndex } from './node-index.js';
import { type NodeRecord, storedTime } from './records.js';

export interface ProjectRecord {
  name: string;
  /** Stable and never reused; how Headscale's API addresses the project (a "user"). */
  numericId: number;
  createdAt: number;
  /** Nodes whose key is older are cut off the mesh until they rotate it; null: no limit. */
  maxKeyAgeMs: number | null;
}

export function projectFromRow(p: Database['projects']): ProjectRecord {
  return {
    name: p.name,
    numericId: Number(p.numeric_id),
    createdAt: storedTime(p.created_at),
    maxKeyAgeMs: p.max_key_age_ms === null ? null : Number(p.max_key_age_ms),
  };
}

export class Projects {
  private readonly projects = new Map<string, ProjectRecord>();
  private readonly byNumber = new Map<number, string>();
  /** Names being created, so that two concurrent creates of one name cannot both pass the check. */
  private readonly creating = new Set<string>();

  constructor(
    private readonly db: Kysely<Database>,
    private readonly now: () => number,
    private readonly counters: Counters,
    private readonly nodes: NodeIndex,
    private readonly events: EventBus,
    private readonly log: ChangeLog,
  ) {}

  async load(): Promise<void> {
    for (const p of await this.db.selectFrom('projects').selectAll().execute()) this.add(projectFromRow(p));
  }

  names(): IterableIterator<string> {
    return this.projects.keys();
  }

  has(name: string): boolean {
    return this.projects.has(name);
  }

  list(): (ProjectRecord & { nodeCount: number })[] {
    return [...this.projects.values()]
      .map((p) => ({ ...p, nodeCount: this.nodes.countIn(p.name) }))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  require(name: string): ProjectRecord {
    const p = this.projects.get(name);
    if (!p) throw notFound(`project ${quote(name)} does not exist`);
    return p;
  }

  get(name: string): ProjectRecord | undefined {
    return this.projects.get(name);
  }

  byNumericId(numericId: number): ProjectRecord | undefined {
    const name = this.byNumber.get(numericId);
    return name === undefined ? undefined : this.projects.get(name);
  }

  async create(actor: string, name: string): Promise<ProjectRecord> {
    if (!isDnsLabel(name))
      throw invalid(`project name ${quote(name)} must be a DNS label (a-z, 0-9, -; at most 63)`);
    if (this.projects.has(name) || this.creating.has(name))
      throw exists(`project ${quote(name)} already exists`);
    this.creating.add(name);
    try {
      const numericId = await this.counters.next('projects');
      const p = { name, numericId, createdAt: this.now(), maxKeyAgeMs: null };
      try {
        await this.db.transaction().execute(async (tx) => {
          await tx
            .insertInto('projects')
            .values({ name, created_at: p.createdAt, numeric_id: p.numericId })
            .execute();
          await this.counters.save(tx, 'projects', p.numericId);
          await audit(tx, this.now(), actor, 'project.create', name);
          await this.log.record(tx, { kind: 'project', ref: name });
        });
      } catch (err) {
        // Created at the same moment by another coordinator of the database.
        if ((err as { code?: unknown }).code === '23505')
          throw exists(`project ${quote(name)} already exists`);
        throw err;
      }
      this.add(p);
      return p;
    } finally {
      this.creating.delete(name);
    }
  }

  add(p: ProjectRecord): void {
    this.projects.set(p.name, p);
    this.byNumber.set(p.numericId, p.name);
    this.nodes.addProject(p.name);
  }

  /**
   * The oldest a node key of the project may be; null removes the limit. Nodes
   * over it leave their peers' netmaps (and see no peers) until their agent
   * rotates the key; they stay registered and connected so that it can.
   */
  async setMaxKeyAge(actor: string, name: string, maxKeyAgeMs: number | null): Promise<ProjectRecord> {
    const p = this.require(name);
    if (maxKeyAgeMs !== null && !(Number.isSafeInteger(maxKeyAgeMs) && maxKeyAgeMs >= 1000))
      throw invalid('the maximum key age must be at least 1s');
    await this.db.transaction().execute(async (tx) => {
      await tx
        .updateTable('projects')
        .set({ max_key_age_ms: maxKeyAgeMs })
        .where('name', '=', name)
        .execute();
      await audit(tx, this.now(), actor, 'project.max-key-age', name, { maxKeyAgeMs });
      await this.log.record(tx, { kind: 'project', ref: name });
    });
    const next = { ...p, maxKeyAgeMs };
    this.projects.set(name, next);
    for (const n of this.nodes.projectNodes(name)) this.events.emit({ type: 'node-changed', node: n });
    return next;
  }

  /** Deletes the project and its nodes from the store and memory; returns the nodes, not yet announced. */
  async delete(actor: string, name: string, force: boolean): Promise<NodeRecord[]> {
    this.require(name);
    const members = this.nodes.projectNodes(name);
    if (members.length > 0 && !force) {
      throw precondition(
        `project ${quote(name)} still has ${members.length} node(s); delete them first or use --force`,
      );
    }
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('nodes').where('project', '=', name).execute();
      await tx.deleteFrom('projects').where('name', '=', name).execute();
      await audit(tx, this.now(), actor, 'project.delete', name, { nodes: members.length });
      await this.log.record(tx, { kind: 'project', ref: name });
    });
    for (const n of members) this.nodes.remove(n);
    this.forget(name);
    return members;
  }

  /**
   * The stored row of a project changed by another coordinator (undefined:
   * deleted). Returns the nodes a deletion removed, not yet announced.
   */
  applyRow(name: string, row: Database['projects'] | undefined): NodeRecord[] {
    const old = this.projects.get(name);
    if (!row) {
      if (!old) return [];
      const members = this.nodes.projectNodes(name);
      for (const n of members) this.nodes.remove(n);
      this.forget(name);
      return members;
    }
    const p = projectFromRow(row);
    this.add(p);
    if (old && old.maxKeyAgeMs !== p.maxKeyAgeMs)
      for (const n of this.nodes.projectNodes(name)) this.events.emit({ type: 'node-changed', node: n });
    return [];
  }

  private forget(name: string): void {
    const p = this.projects.get(name);
    if (p) this.byNumber.delete(p.numericId);
    this.projects.delete(name);
    this.nodes.dropProject(name);
  }

  /** When the node's key passes its project's maximum key age; null without a limit. */
  keyExpiresAt(n: NodeRecord): number | null {
    const max = this.projects.get(n.project)?.maxKeyAgeMs ?? null;
    return max === null ? null : n.keySetAt + max;
  }
}
