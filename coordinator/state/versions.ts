// Desired versions: which agent version each project (or tag of it) should
// run, where its artifact is, which nodes drift from it, and which of them the
// rollout lets update now (the scheduling is in rollout.ts).
import type { Kysely } from 'kysely';
import { isTag } from '../../proto/names.js';
import { quote, unsafeCharacter } from '../../proto/text.js';
import { drifts, requireSemVer, type SemVerError } from '../../release/semver.js';
import type { Database } from '../store/schema.js';
import { audit } from './audit.js';
import type { ChangeLog } from './changelog.js';
import { invalid } from './errors.js';
import type { EventBus, StateEvent } from './events.js';
import type { KeyStore } from './keys.js';
import { type NodeRecord, storedTime } from './records.js';
import { type NodeView, type RolloutNode, Rollouts } from './rollout.js';

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

export interface VersionContext {
  requireProject(name: string): void;
  listNodes(project?: string): NodeRecord[];
  isOnline(id: string): boolean;
  keys: KeyStore;
}

export function desiredVersionFromRow(v: Database['desired_versions']): DesiredVersionRecord {
  return {
    project: v.project,
    tag: v.tag,
    version: v.version,
    updatedAt: storedTime(v.updated_at),
    artifactUrl: v.artifact_url,
    sha256: v.sha256,
    allowDowngrade: Boolean(v.allow_downgrade),
    manifest: v.manifest,
    maxUnavailable: v.max_unavailable,
  };
}

export class Versions {
  private readonly versions = new Map<string, Map<string, DesiredVersionRecord>>();
  private readonly rollout = new Rollouts();
  /** Projects whose rollout is looked at again once the current event has reached every listener. */
  private readonly pending = new Set<string>();

  constructor(
    private readonly db: Kysely<Database>,
    private readonly now: () => number,
    private readonly events: EventBus,
    private readonly ctx: VersionContext,
    private readonly log: ChangeLog,
  ) {
    // Nodes coming online, changing version or leaving free room in a rollout, whether the change
    // was made here or by another coordinator on the same database.
    events.on((e) => this.onEvent(e));
  }

  async load(): Promise<void> {
    for (const v of await this.db.selectFrom('desired_versions').selectAll().execute()) {
      this.versionMap(v.project).set(v.tag, desiredVersionFromRow(v));
    }
  }

  forget(project: string): void {
    this.versions.delete(project);
  }

  private versionMap(project: string): Map<string, DesiredVersionRecord> {
    let m = this.versions.get(project);
    if (!m) {
      m = new Map();
      this.versions.set(project, m);
    }
    return m;
  }

  async set(
    actor: string,
    project: string,
    tag: string,
    version: string,
    artifact: DesiredArtifact = { artifactUrl: '', sha256: '', allowDowngrade: false, manifest: '' },
  ): Promise<DesiredVersionRecord> {
    this.ctx.requireProject(project);
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
      await this.log.record(tx, { kind: 'versions', ref: project });
    });
    if (version) this.versionMap(project).set(tag, rec);
    else this.versionMap(project).delete(tag);
    // Setting a version again is how an operator resumes a halted rollout.
    this.rollout.retry(this.ctx.listNodes(project).map((n) => n.id));
    this.rollout.schedule(this.rolloutNodes(project));
    this.events.emit({ type: 'versions-changed', project });
    return rec;
  }

  /** The stored entries of a project as another coordinator left them. */
  applyRows(project: string, rows: Database['desired_versions'][]): void {
    this.versions.set(project, new Map(rows.map((r) => [r.tag, desiredVersionFromRow(r)])));
    this.rollout.schedule(this.rolloutNodes(project));
    this.events.emit({ type: 'versions-changed', project });
  }

  list(project?: string): DesiredVersionRecord[] {
    if (project) this.ctx.requireProject(project);
    const all = project
      ? [...(this.versions.get(project)?.values() ?? [])]
      : [...this.versions.values()].flatMap((m) => [...m.values()]);
    return all.sort((a, b) => a.project.localeCompare(b.project) || a.tag.localeCompare(b.tag));
  }

  /** Nodes that run an older version than desired, or a newer one when a downgrade is allowed. */
  driftingNodes(project?: string): NodeRecord[] {
    return this.ctx.listNodes(project).filter((n) => this.isDrifting(n));
  }

  isDrifting(n: NodeRecord): boolean {
    const want = this.entry(n.project, n.tags);
    return want !== undefined && drifts(n.version, want.version, want.allowDowngrade);
  }

  /**
   * The entry a node is told about: the most specific one (a tag of the node, first in name
   * order, then the project's), once the rollout lets the node update.
   */
  entryFor(n: NodeRecord): DesiredVersionRecord | undefined {
    const entry = this.entry(n.project, n.tags);
    return entry && this.rollout.released(this.rolloutNode(n)) ? entry : undefined;
  }

  /** What a node's agent says about its update (UpdateReport). */
  reportUpdate(n: NodeRecord, version: string, state: 'updating' | 'failed', reason: string): void {
    this.rollout.report(n.id, version, state, reason);
    this.rollout.schedule(this.rolloutNodes(n.project));
    this.events.emit({ type: 'versions-changed', project: n.project });
  }

  /** Every node under a desired version, with its update state (versions list). */
  updateStates(project?: string): { node: NodeRecord; desired: string; view: NodeView }[] {
    const nodes = this.ctx.listNodes(project).filter((n) => this.entry(n.project, n.tags));
    const out: { node: NodeRecord; desired: string; view: NodeView }[] = [];
    for (const p of new Set(nodes.map((n) => n.project))) {
      const views = this.rollout.view(this.rolloutNodes(p));
      for (const n of nodes.filter((x) => x.project === p))
        out.push({ node: n, desired: this.entry(n.project, n.tags)!.version, view: views.get(n.id)! });
    }
    return out;
  }

  private onEvent(e: StateEvent): void {
    if (e.type === 'policy-changed' || e.type === 'versions-changed') return;
    const project = e.node.project;
    if (!this.versions.get(project)?.size) return;
    // Only a node that still has to update, or one the rollout is following, can change who
    // may update next: planning a project's nodes for every event of a node that is already
    // current would cost the whole project at each of them (a connect storm, presence changes).
    const followed =
      e.type === 'node-removed' ? this.rollout.forget(e.node.id) : this.rollout.follows(e.node.id);
    if (!followed && (e.type === 'node-removed' || !this.isDrifting(e.node))) return;
    if (this.pending.has(project)) return;
    this.pending.add(project);
    queueMicrotask(() => {
      this.pending.delete(project);
      if (this.rollout.schedule(this.rolloutNodes(project)).length)
        this.events.emit({ type: 'versions-changed', project });
    });
  }

  private rolloutNode(n: NodeRecord): RolloutNode {
    const e = this.entry(n.project, n.tags);
    return {
      id: n.id,
      name: n.name,
      version: n.version,
      online: this.ctx.isOnline(n.id),
      target: e && {
        entry: e.tag,
        version: e.version,
        allowDowngrade: e.allowDowngrade,
        maxUnavailable: e.maxUnavailable,
      },
    };
  }

  private rolloutNodes(project: string): RolloutNode[] {
    return this.ctx.listNodes(project).map((n) => this.rolloutNode(n));
  }

  private entry(project: string, tags: string[]): DesiredVersionRecord | undefined {
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
  async entryForAuthKey(text: string): Promise<DesiredVersionRecord | undefined> {
    const key = await this.ctx.keys.heldAuthKey(text);
    return this.entry(key.project, [...key.tags].sort());
  }

  /** The version set for the node, whether or not the rollout lets it update yet. */
  versionFor(n: NodeRecord): string {
    return this.entry(n.project, n.tags)?.version ?? '';
  }
}
