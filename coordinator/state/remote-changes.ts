// Applies what another coordinator on the same database committed: re-reads
// the changed rows and hands them to the module that owns them, which
// updates memory and announces the same events a local change would (so the
// mapper sends the deltas to this coordinator's agents).
import type { Kysely } from 'kysely';
import type { Database } from '../store/schema.js';
import type { Change } from './changelog.js';
import type { EventBus } from './events.js';
import type { NodeChanges } from './node-changes.js';
import type { NodeIndex } from './node-index.js';
import type { Policies } from './policies.js';
import type { Presence } from './presence.js';
import type { Projects } from './projects.js';
import type { Versions } from './versions.js';

export interface StateParts {
  nodes: NodeIndex;
  projects: Projects;
  policies: Policies;
  versions: Versions;
  presence: Presence;
  changes: NodeChanges;
  events: EventBus;
}

export class RemoteChanges {
  constructor(
    private readonly db: Kysely<Database>,
    private readonly parts: StateParts,
    /** This coordinator's id in the shared presence rows. */
    private readonly self: string,
    private readonly now: () => number,
  ) {}

  async apply(c: Change): Promise<void> {
    const { db, parts } = this;
    switch (c.kind) {
      case 'node':
        parts.changes.applyRow(
          c.ref,
          await db.selectFrom('nodes').selectAll().where('id', '=', c.ref).executeTakeFirst(),
        );
        return;
      case 'project':
        this.applyProject(
          c.ref,
          await db.selectFrom('projects').selectAll().where('name', '=', c.ref).executeTakeFirst(),
        );
        return;
      case 'policy':
        parts.policies.applyRow(
          c.ref,
          await db.selectFrom('policies').selectAll().where('project', '=', c.ref).executeTakeFirst(),
        );
        return;
      case 'global-policy':
        parts.policies.applyGlobalRow(await db.selectFrom('global_policy').selectAll().executeTakeFirst());
        return;
      case 'versions':
        if (!parts.projects.has(c.ref)) return;
        parts.versions.applyRows(
          c.ref,
          await db.selectFrom('desired_versions').selectAll().where('project', '=', c.ref).execute(),
        );
        return;
      case 'presence': {
        const live = await this.streamingElsewhere(c.ref);
        parts.presence.setRemote(c.ref, live.get(c.ref) ?? null);
        return;
      }
    }
  }

  /** Everything read again and compared with memory: after changes were missed for too long. */
  async reload(): Promise<void> {
    const { db, parts } = this;
    const projects = await db.selectFrom('projects').selectAll().execute();
    const projectNames = new Set(projects.map((p) => p.name));
    for (const name of [...parts.projects.names()])
      if (!projectNames.has(name)) this.applyProject(name, undefined);
    for (const p of projects) this.applyProject(p.name, p);
    const rows = await db.selectFrom('nodes').selectAll().execute();
    const ids = new Set(rows.map((r) => r.id));
    for (const n of parts.nodes.all()) if (!ids.has(n.id)) parts.changes.applyRow(n.id, undefined);
    for (const r of rows) parts.changes.applyRow(r.id, r);
    const policies = new Map(
      (await db.selectFrom('policies').selectAll().execute()).map((p) => [p.project, p]),
    );
    for (const name of projectNames) parts.policies.applyRow(name, policies.get(name));
    parts.policies.applyGlobalRow(await db.selectFrom('global_policy').selectAll().executeTakeFirst());
    const versions = await db.selectFrom('desired_versions').selectAll().execute();
    for (const name of projectNames)
      parts.versions.applyRows(
        name,
        versions.filter((v) => v.project === name),
      );
    await this.syncPresence();
  }

  /** Which nodes stream to other coordinators, all read again (at start, and in reload). */
  async syncPresence(): Promise<void> {
    const { presence } = this.parts;
    const live = await this.streamingElsewhere();
    for (const id of presence.remoteIds()) if (!live.has(id)) presence.setRemote(id, null);
    for (const [id, replica] of live) presence.setRemote(id, replica);
  }

  private applyProject(name: string, row: Database['projects'] | undefined): void {
    const { parts } = this;
    if (row) {
      parts.projects.applyRow(name, row);
      return;
    }
    if (!parts.projects.has(name)) return;
    const members = parts.nodes.projectNodes(name);
    for (const n of members) parts.changes.forget(n);
    parts.projects.applyRow(name, undefined);
    parts.policies.forget(name);
    parts.versions.forget(name);
    for (const n of members) parts.events.emit({ type: 'node-removed', node: n });
  }

  /** Nodes with a stream on another coordinator whose lease has not run out (one node, or all). */
  private async streamingElsewhere(node?: string): Promise<Map<string, string>> {
    let q = this.db
      .selectFrom('presence')
      .innerJoin('replicas', 'replicas.id', 'presence.replica')
      .select(['presence.node_id', 'presence.replica'])
      .where('presence.replica', '!=', this.self)
      .where('replicas.expires_at', '>', this.now());
    if (node !== undefined) q = q.where('presence.node_id', '=', node);
    // A node on two (its old stream not yet gone): the newest row wins.
    q = q.orderBy('presence.since');
    return new Map((await q.execute()).map((r) => [r.node_id, r.replica]));
  }
}
