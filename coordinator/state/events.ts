// What the state announces after a change is durable. The mapper turns these
// into netmap deltas for agents; the compiled-policy cache drops its entry.
import type { NodeRecord } from './records.js';

export type StateEvent =
  | { type: 'node-added'; node: NodeRecord }
  /** Something peers see changed (key, name, tags, routes, addresses). */
  | { type: 'node-changed'; node: NodeRecord }
  /** Only online state, last seen or endpoints changed. */
  | { type: 'node-patched'; node: NodeRecord; endpointsChanged: boolean }
  | { type: 'node-removed'; node: NodeRecord }
  | { type: 'policy-changed'; project: string }
  | { type: 'versions-changed'; project: string };

export class EventBus {
  private readonly listeners: ((e: StateEvent) => void)[] = [];

  /** Listeners run in the order they subscribed, synchronously, for every event. */
  on(listener: (e: StateEvent) => void): void {
    this.listeners.push(listener);
  }

  emit(e: StateEvent): void {
    for (const l of this.listeners) l(e);
  }
}
