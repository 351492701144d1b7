// Access policies: one per project, plus the global one Headscale's API sets
// for projects without their own; stored, checked before they replace
// another, and compiled (cached per project until something it reads changes).
import type { Kysely } from 'kysely';
import { quote } from '../../proto/text.js';
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
import { audit } from './audit.js';
import type { ChangeLog } from './changelog.js';
import { invalid, precondition } from './errors.js';
import type { EventBus } from './events.js';
import { type NodeRecord, storedTime } from './records.js';

export interface PolicyRecord {
  source: string;
  parsed: Policy;
  updatedAt: number;
}

export interface PolicyContext {
  requireProject(name: string): void;
  projectNames(): Iterable<string>;
  /** The nodes that take part in the mesh (see State.activeProjectNodes). */
  activeProjectNodes(project: string): NodeRecord[];
}

export class Policies {
  private readonly policies = new Map<string, PolicyRecord>();
  /** Applies to every project without a policy of its own (set through Headscale's API). */
  private globalPolicy: PolicyRecord | undefined;
  private readonly compiledCache = new Map<string, CompiledPolicy>();

  constructor(
    private readonly db: Kysely<Database>,
    private readonly now: () => number,
    private readonly events: EventBus,
    private readonly ctx: PolicyContext,
    private readonly log: ChangeLog,
  ) {
    // Subscribed first, so every other listener already compiles the new state.
    events.on((e) => {
      if (e.type === 'node-patched' || e.type === 'versions-changed') return;
      this.compiledCache.delete(e.type === 'policy-changed' ? e.project : e.node.project);
    });
  }

  async load(): Promise<void> {
    for (const p of await this.db.selectFrom('policies').selectAll().execute()) {
      this.policies.set(p.project, {
        source: p.source,
        parsed: parsePolicy(p.source, { stored: true }),
        updatedAt: storedTime(p.updated_at),
      });
    }
    const global = await this.db.selectFrom('global_policy').selectAll().executeTakeFirst();
    if (global) {
      this.globalPolicy = {
        source: global.source,
        parsed: parsePolicy(global.source),
        updatedAt: Number(global.updated_at),
      };
    }
  }

  forget(project: string): void {
    this.policies.delete(project);
  }

  compiled(project: string): CompiledPolicy {
    let c = this.compiledCache.get(project);
    if (!c) {
      const own = this.policies.get(project)?.parsed;
      const nodes: PolicyNode[] = this.ctx.activeProjectNodes(project).map(policyNode);
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

  get(project: string): PolicyRecord | undefined {
    this.ctx.requireProject(project);
    return this.policies.get(project);
  }

  /**
   * Refuses, unless forced, a policy whose own tests fail or that leaves a locked-down node with no path
   * from the rest of the project on a port it closes elsewhere: that node would be reachable from nowhere.
   */
  async set(actor: string, project: string, source: string, force = false): Promise<number> {
    this.ctx.requireProject(project);
    const now = this.now();
    const parsed = source.trim() ? parseOrInvalid(source) : null;
    const objections = parsed ? this.objections(project, parsed) : { failedTests: [], cut: [] };
    const objected = objections.failedTests.length > 0 || objections.cut.length > 0;
    if (objected && !force) throw precondition(`policy not set: ${describeObjections(objections)}`);
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('policies').where('project', '=', project).execute();
      if (parsed) await tx.insertInto('policies').values({ project, source, updated_at: now }).execute();
      const detail = objected ? { force: true, ...objections } : force ? { force: true } : {};
      await audit(tx, this.now(), actor, parsed ? 'policy.set' : 'policy.remove', project, detail);
      await this.log.record(tx, { kind: 'policy', ref: project });
    });
    if (parsed) this.policies.set(project, { source, parsed, updatedAt: now });
    else this.policies.delete(project);
    this.events.emit({ type: 'policy-changed', project });
    return now;
  }

  private objections(project: string, policy: Policy): PolicyObjections {
    const nodes = this.ctx.activeProjectNodes(project);
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

  getGlobal(): PolicyRecord | undefined {
    return this.globalPolicy;
  }

  /** Stores `source` verbatim; an empty one removes the global policy. */
  async setGlobal(actor: string, source: string): Promise<number> {
    const now = this.now();
    const parsed = source.trim() ? parseOrInvalid(source) : null;
    await this.db.transaction().execute(async (tx) => {
      await tx.deleteFrom('global_policy').execute();
      if (parsed) await tx.insertInto('global_policy').values({ id: 1, source, updated_at: now }).execute();
      await audit(tx, this.now(), actor, parsed ? 'policy.global.set' : 'policy.global.remove', '*');
      await this.log.record(tx, { kind: 'global-policy', ref: '' });
    });
    this.globalPolicy = parsed ? { source, parsed, updatedAt: now } : undefined;
    this.announceGlobal();
    return now;
  }

  private announceGlobal(): void {
    for (const p of this.ctx.projectNames()) {
      if (!this.policies.has(p)) this.events.emit({ type: 'policy-changed', project: p });
    }
  }

  /** The stored policy of a project as another coordinator left it (undefined: none). */
  applyRow(project: string, row: Database['policies'] | undefined): void {
    if (row) {
      if (this.policies.get(project)?.source === row.source) return;
      this.policies.set(project, {
        source: row.source,
        parsed: parsePolicy(row.source, { stored: true }),
        updatedAt: storedTime(row.updated_at),
      });
    } else if (this.policies.has(project)) this.policies.delete(project);
    else return;
    this.events.emit({ type: 'policy-changed', project });
  }

  applyGlobalRow(row: Database['global_policy'] | undefined): void {
    if (this.globalPolicy?.source === row?.source) return;
    this.globalPolicy = row
      ? { source: row.source, parsed: parsePolicy(row.source), updatedAt: Number(row.updated_at) }
      : undefined;
    this.announceGlobal();
  }

  check(project: string, source: string | undefined): PolicyTestOutcome[] {
    this.ctx.requireProject(project);
    const policy = source?.trim() ? parseOrInvalid(source) : this.policies.get(project)?.parsed;
    if (!policy) throw precondition(`project ${quote(project)} has no policy to check`);
    return runPolicyTests(policy, this.ctx.activeProjectNodes(project).map(policyNode));
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
