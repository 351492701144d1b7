// The states a node can be in, each with the one line that the log and `meshgate status` show.
// A person reading that line must know what happened and what to do, without reading code.

export type NodeStateKind =
  /** No identity yet: registering with the auth key. */
  | 'not-joined'
  /** Registered, or re-registering after a reconnect. */
  | 'connecting'
  | 'connected'
  /** The coordinator does not answer: the mesh runs from the cached netmap. */
  | 'unreachable'
  /** An admin expired the node (`nodes expire`); it needs a new auth key. */
  | 'expired'
  /** An admin deleted the node (`nodes delete`); it needs a new auth key. */
  | 'deleted'
  /** Stopped with `meshgate down` (or `logout`); stays so across restarts until `meshgate up`. */
  | 'down';

export interface NodeState {
  kind: NodeStateKind;
  /** What the coordinator or the system said, for unreachable, expired and deleted. */
  detail: string;
}

export interface DescribeContext {
  /** Where a new auth key goes, when the agent reads one from a file. */
  keyFile?: string;
  /** Whether the lockdown stays while the node is revoked or down. */
  keepLockdown: boolean;
  lockdown: boolean;
}

/** The one line for `state`. */
export function describeNodeState(state: NodeState, ctx: DescribeContext): string {
  const newKey = ctx.keyFile
    ? `write a new auth key to ${ctx.keyFile}`
    : 'restart the agent with a new auth key';
  const pickedUp = ctx.keyFile ? '; it is picked up without a restart' : '';
  const lockdown = !ctx.lockdown
    ? ''
    : ctx.keepLockdown
      ? '; public SSH stays locked down (--lockdown-when-revoked keep), use the console'
      : '; lockdown released (--lockdown-when-revoked release)';
  const why = state.detail ? ` (${state.detail})` : '';
  switch (state.kind) {
    case 'not-joined':
      return 'never joined: registering with the auth key';
    case 'connecting':
      return 'joined: connecting to the coordinator';
    case 'connected':
      return 'joined and connected';
    case 'unreachable':
      return `coordinator unreachable${why}: the mesh keeps running from the cached netmap`;
    case 'expired':
      return `expired by an admin: ${newKey}${why}${pickedUp}${lockdown}`;
    case 'deleted':
      return `deleted by an admin: ${newKey}${why}${pickedUp}${lockdown}`;
    case 'down':
      return state.detail === 'logged out'
        ? 'logged out: this node was deleted and its identity forgotten; "meshgate up" joins anew with the auth key'
        : `down: the mesh is stopped until "meshgate up"${lockdown}`;
  }
}
