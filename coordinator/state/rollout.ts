// Rollout control: which nodes of a project may update to their desired
// version now. At most maxUnavailable nodes of one desired-version entry are
// updating at a time; a node counts until it is back online on the new
// version. A failed update halts the project's rollout until the version is
// set again.
//
// Progress lives in memory: after a coordinator restart the agents report
// again what they are doing (an update in flight, or one that failed), so
// a halted rollout stays halted.
import { drifts } from '../../release/semver.js';

export type UpdateState = 'current' | 'updating' | 'failed' | 'waiting';

export interface RolloutTarget {
  /** The desired-version entry (project and tag): the group maxUnavailable counts in. */
  entry: string;
  version: string;
  allowDowngrade: boolean;
  maxUnavailable: number;
}

export interface RolloutNode {
  id: string;
  name: string;
  version: string;
  online: boolean;
  /** Undefined: no desired version applies to the node. */
  target: RolloutTarget | undefined;
}

export interface Progress {
  target: string;
  state: 'updating' | 'failed';
  reason: string;
}

export interface NodeView {
  state: UpdateState;
  reason: string;
  /** The node may see its desired version now (a node that needs no update always may). */
  released: boolean;
}

export interface Plan {
  views: Map<string, NodeView>;
  /** Waiting nodes that may start now. */
  admit: string[];
  /** The first failed update of the project, which holds every other node back. */
  halted: { node: string; reason: string } | null;
}

/** Whether a node on `version` still has to move to the target. */
export function needsUpdate(version: string, target: RolloutTarget): boolean {
  return drifts(version, target.version, target.allowDowngrade);
}

/** The schedule for the nodes of one project, given what is in flight. Pure. */
export function plan(nodes: RolloutNode[], progress: ReadonlyMap<string, Progress>): Plan {
  const views = new Map<string, NodeView>();
  const busy = new Map<string, number>();
  const waiting: RolloutNode[] = [];
  let halted: Plan['halted'] = null;
  for (const n of [...nodes].sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id))) {
    const t = n.target;
    if (!t || !needsUpdate(n.version, t)) {
      views.set(n.id, { state: 'current', reason: '', released: true });
      continue;
    }
    const p = progress.get(n.id);
    if (p && p.target === t.version && p.state === 'failed') {
      views.set(n.id, { state: 'failed', reason: p.reason, released: false });
      halted ??= { node: n.name, reason: p.reason };
    } else if (p && p.target === t.version) {
      views.set(n.id, { state: 'updating', reason: '', released: true });
      busy.set(t.entry, (busy.get(t.entry) ?? 0) + 1);
    } else waiting.push(n);
  }
  const admit: string[] = [];
  for (const n of waiting) {
    const t = n.target!;
    const inFlight = busy.get(t.entry) ?? 0;
    let reason: string;
    if (halted) reason = `rollout halted: the update of ${halted.node} failed`;
    else if (!n.online) reason = 'offline';
    else if (inFlight >= Math.max(1, t.maxUnavailable))
      reason = `${inFlight} node(s) updating, at most ${Math.max(1, t.maxUnavailable)} at once`;
    else {
      admit.push(n.id);
      busy.set(t.entry, inFlight + 1);
      views.set(n.id, { state: 'updating', reason: '', released: true });
      continue;
    }
    views.set(n.id, { state: 'waiting', reason, released: false });
  }
  return { views, admit, halted };
}

/** The progress of every node's update, and the scheduling that moves it on. */
export class Rollouts {
  private readonly progress = new Map<string, Progress>();

  /**
   * Admits waiting nodes where there is room; returns their ids. Progress of
   * nodes that reached their target is dropped.
   */
  schedule(nodes: RolloutNode[]): string[] {
    const p = plan(nodes, this.progress);
    for (const n of nodes) {
      if (p.views.get(n.id)?.state === 'current') this.progress.delete(n.id);
    }
    for (const id of p.admit) {
      const n = nodes.find((x) => x.id === id)!;
      this.progress.set(id, { target: n.target!.version, state: 'updating', reason: '' });
    }
    return p.admit;
  }

  view(nodes: RolloutNode[]): Map<string, NodeView> {
    return plan(nodes, this.progress).views;
  }

  /** Whether the node may be told its desired version now. */
  released(node: RolloutNode): boolean {
    const t = node.target;
    if (!t || !needsUpdate(node.version, t)) return true;
    const p = this.progress.get(node.id);
    return p !== undefined && p.target === t.version && p.state === 'updating';
  }

  /** What the node's agent reports. An update it started on its own is in flight too. */
  report(nodeId: string, version: string, state: Progress['state'], reason: string): void {
    this.progress.set(nodeId, { target: version, state, reason: state === 'failed' ? reason : '' });
  }

  /** The version was set again: failed updates of these nodes are tried again. */
  retry(nodeIds: Iterable<string>): void {
    for (const id of nodeIds) {
      if (this.progress.get(id)?.state === 'failed') this.progress.delete(id);
    }
  }

  /** Whether an update of the node is in flight or failed. */
  follows(nodeId: string): boolean {
    return this.progress.has(nodeId);
  }

  /** Drops the node's progress; whether there was any. */
  forget(nodeId: string): boolean {
    return this.progress.delete(nodeId);
  }
}
