// The in-memory indexes over nodes: by id, number, machine key, node key,
// project and name. Only memory; the callers write the store first.
import { quote } from '../../proto/text.js';
import { type CoordinatorError, exists, invalid, notFound } from './errors.js';
import type { NodeRecord } from './records.js';

export class NodeIndex {
  private readonly nodes = new Map<string, NodeRecord>();
  private readonly byMachineKey = new Map<string, string>();
  /** WireGuard public key -> node id: a key listed twice in a netmap stops every agent that sees it. */
  private readonly byNodeKey = new Map<string, string>();
  private readonly byProject = new Map<string, Set<string>>();
  /** project -> node name -> node id, so picking a free name does not scan the project. */
  private readonly names = new Map<string, Map<string, string>>();
  private readonly byNumber = new Map<number, string>();

  get(id: string): NodeRecord | undefined {
    return this.nodes.get(id);
  }

  has(id: string): boolean {
    return this.nodes.has(id);
  }

  all(): NodeRecord[] {
    return [...this.nodes.values()];
  }

  values(): IterableIterator<NodeRecord> {
    return this.nodes.values();
  }

  byNumericId(numericId: number): NodeRecord | undefined {
    const id = this.byNumber.get(numericId);
    return id === undefined ? undefined : this.nodes.get(id);
  }

  byMachine(machineKey: string): NodeRecord | undefined {
    const id = this.byMachineKey.get(machineKey);
    return id === undefined ? undefined : this.nodes.get(id);
  }

  projectNodes(project: string): NodeRecord[] {
    const ids = this.byProject.get(project);
    return ids ? [...ids].map((id) => this.nodes.get(id)!) : [];
  }

  countIn(project: string): number {
    return this.byProject.get(project)?.size ?? 0;
  }

  addProject(project: string): void {
    if (!this.byProject.has(project)) this.byProject.set(project, new Set());
  }

  /** Forgets the project's sets; its nodes must have been unindexed. */
  dropProject(project: string): void {
    this.byProject.delete(project);
    this.names.delete(project);
  }

  /** By id, unique id prefix, or name (project narrows names that repeat across projects). */
  resolve(ref: string, project?: string): NodeRecord {
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

  /** The id of the node of `project` named `name`, if any. */
  nameHolder(project: string, name: string): string | undefined {
    return this.names.get(project)?.get(name);
  }

  uniqueName(project: string, base: string): string {
    const taken = this.names.get(project);
    if (!taken?.has(base)) return base;
    for (let i = 2; ; i++) {
      const suffix = `-${i}`;
      const candidate = base.slice(0, 63 - suffix.length) + suffix;
      if (!taken.has(candidate)) return candidate;
    }
  }

  requireFreeNodeKey(nodeKey: string, self?: string): void {
    const holder = this.byNodeKey.get(nodeKey);
    // A holder that is gone was deleted while its key change was being written.
    if (holder !== undefined && holder !== self && this.nodes.has(holder)) throw duplicateNodeKey();
  }

  /**
   * Reserves a node key for `id` before the write that gives it the key, so
   * that a concurrent registration or rotation cannot take it meanwhile.
   * Returns what undoes the reservation if the write fails.
   */
  claimNodeKey(nodeKey: string, id: string): () => void {
    this.requireFreeNodeKey(nodeKey, id);
    if (this.byNodeKey.get(nodeKey) === id) return () => {};
    this.byNodeKey.set(nodeKey, id);
    return () => {
      if (this.nodes.get(id)?.nodeKey !== nodeKey && this.byNodeKey.get(nodeKey) === id)
        this.byNodeKey.delete(nodeKey);
    };
  }

  add(n: NodeRecord): void {
    this.nodes.set(n.id, n);
    this.byNumber.set(n.numericId, n.id);
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

  remove(n: NodeRecord): void {
    this.nodes.delete(n.id);
    // Only what still points at this node: a failed registration must not
    // unindex the node another coordinator registered for the same machine.
    if (this.byNumber.get(n.numericId) === n.id) this.byNumber.delete(n.numericId);
    if (this.byMachineKey.get(n.machineKey) === n.id) this.byMachineKey.delete(n.machineKey);
    if (this.byNodeKey.get(n.nodeKey) === n.id) this.byNodeKey.delete(n.nodeKey);
    this.byProject.get(n.project)?.delete(n.id);
    this.releaseName(n);
  }

  replace(n: NodeRecord): void {
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

export function duplicateNodeKey(): CoordinatorError {
  return exists('node key is already used by another node; generate a new node key');
}

/** The store's unique index catches what the in-memory check cannot see (another coordinator). */
export function duplicateKeyOr(err: unknown): unknown {
  const e = err as { code?: unknown; message?: unknown };
  const unique = e?.code === 'SQLITE_CONSTRAINT_UNIQUE' || e?.code === '23505';
  return unique && String(e.message).includes('node_key') ? duplicateNodeKey() : err;
}
