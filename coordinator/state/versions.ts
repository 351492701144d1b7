// Desired versions: which agent version each project (or tag of it) should
// run, where its artifact is, and which nodes drift from it.
import type { Kysely } from 'kysely';
import { isTag } from '../../proto/names.js';
import { quote, unsafeCharacter } from '../../proto/text.js';
import { drifts, requireSemVer, type SemVerError } from '../../release/semver.js';
import type { Database } from '../store/schema.js';
import { audit } from './audit.js';
import type { ChangeLog } from './changelog.js';
import { invalid } from './errors.js';
import type { EventBus } from './events.js';
import type { KeyStore } from './keys.js';
import { type NodeRecord, storedTime } from './records.js';

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
}

export interface DesiredArtifact {
  artifactUrl: string;
  sha256: string;
  allowDowngrade: boolean;
  manifest?: string;
}

export interface VersionContext {
  requireProject(name: string): void;
  listNodes(project?: string): NodeRecord[];
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
  };
}

export class Versions {
  private readonly versions = new Map<string, Map<string, DesiredVersionRecord>>();

  constructor(
    private readonly db: Kysely<Database>,
    private readonly now: () => number,
    private readonly events: EventBus,
    private readonly ctx: VersionContext,
    private readonly log: ChangeLog,
  ) {}

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
    this.events.emit({ type: 'versions-changed', project });
    return rec;
  }

  /** The stored entries of a project as another coordinator left them. */
  applyRows(project: string, rows: Database['desired_versions'][]): void {
    this.versions.set(project, new Map(rows.map((r) => [r.tag, desiredVersionFromRow(r)])));
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
    const want = this.entryFor(n);
    return want !== undefined && drifts(n.version, want.version, want.allowDowngrade);
  }

  /** The most specific entry wins: a tag of the node (first in name order), then the project's. */
  entryFor(n: NodeRecord): DesiredVersionRecord | undefined {
    return this.entry(n.project, n.tags);
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

  versionFor(n: NodeRecord): string {
    return this.entryFor(n)?.version ?? '';
  }
}
