// Fans state changes out to the connected agents as deltas. Changes are
// collected for a short window and then sent, per project, only to the
// sessions of nodes that saw the changed node before or see it now; nobody's
// full netmap is rebuilt for a change, unless it is smaller than the delta.
import { create, toBinary } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import { SyncResponseSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { PeerPatchSchema } from '../../proto/gen/meshgate/v1/types_pb.js';
import type { CompiledPolicy, FilterRuleSpec, PeerGroup } from '../policy/index.js';
import type { NodeRecord } from '../state/records.js';
import type { DesiredVersionRecord, State, StateEvent } from '../state/state.js';
import {
  desiredReleaseMessage,
  EncodedPeer,
  filterKey,
  filterPieces,
  type NetMapOptions,
  netMapPieces,
  nodeMessage,
  sharedPeersPiece,
} from './netmap.js';
import { SharedPeerBlocks } from './shared-peers.js';
import { assemble, compressed, KEEPALIVE, type Piece, seqField, sizeOf } from './wire.js';

const SYNC = SyncResponseSchema.field;

/** One agent's open stream, as the mapper needs it. */
export interface Session {
  readonly nodeId: string;
  /** One encoded SyncResponse; `sent` is called once the transport has taken it. */
  send(msg: Uint8Array, sent?: () => void): void;
  /**
   * Ends the stream. `gone`: the node was deleted or expired and must register
   * again; `retry`: the stream was replaced or the coordinator is stopping.
   */
  close(reason: string, why: 'gone' | 'retry'): void;
  /** The agent understands IMPLIED_PEER_FIELDS (proto/netmap.ts): peers go without what it reconstructs. */
  readonly impliedPeerFields?: boolean;
  /** The agent also understands SHARED_PEERS: a full netmap may carry its group's peers compressed. */
  readonly sharedPeers?: boolean;
}

interface Attached {
  session: Session;
  project: string;
  seq: bigint;
  lastSent: number;
  filterKey: string;
  /** The desired-version entry last sent; a new entry is a new object. */
  desired: DesiredVersionRecord | undefined;
  /** Messages handed to the transport that it has not taken yet, oldest first. */
  inFlight: InFlight[];
  implied: boolean;
  shared: boolean;
  /**
   * The compiled policy the stream's view follows. A full netmap is built from
   * the policy of the moment, which can be newer than the one the project's
   * last flush started from (a stream that opens during a flush, or while a
   * change waits for its window): the next flush brings such a stream from
   * its own policy to the new one.
   */
  base: CompiledPolicy;
}

interface InFlight {
  bytes: number;
  /** When it was handed over (the mapper's clock). */
  at: number;
  full: boolean;
  /** Whether its bytes still count against their budget; a slow stream's deltas stop counting. */
  counted: boolean;
}

interface Pending {
  upserted: Set<string>;
  removed: Map<string, NodeRecord>;
  patched: Map<string, boolean>;
  policy: boolean;
  versions: boolean;
  /** When the first change other than presence arrived; null while there is none. */
  urgentAt: number | null;
  /** When the batch began (the mapper's clock). */
  since: number;
}

export interface MapperOptions extends NetMapOptions {
  /** How long changes are collected before they are sent. */
  coalesceMs: number;
  /**
   * How long a batch waits that only says nodes went online or offline, per
   * 1,000 streams of its project (at least once). Agents use presence for
   * display only, and when many agents connect at once, each of them would
   * otherwise cost a message to every connected agent per coalescing window.
   */
  presenceMs: number;
  /** Streams of a project per presence window; 1,000 unless set. */
  presenceSessions?: number;
  /**
   * A batch for a large project (a policy change at 10,000 nodes is tens of
   * seconds of work) is sent in slices of about this long, with the event
   * loop running between them: a coordinator that stops answering for longer
   * than the agents' keepalive timeout loses every connection.
   */
  sliceMs: number;
  /**
   * Full netmaps being sent at once, in bytes. At 10,000 nodes one is 2.7 MB:
   * when every agent reconnects at once, building them all up front held tens
   * of gigabytes, and sharing the connections among all of them delayed
   * every one. Streams beyond the budget wait their turn.
   */
  fullNetmapBudget: number;
  /**
   * Deltas handed to streams and not yet taken, in bytes. A policy change at
   * 10,000 nodes is a message of up to hundreds of kilobytes to every agent:
   * built all at once, they doubled the coordinator's memory. A flush waits
   * beyond the budget until the transports take what they have.
   */
  deltaBudget: number;
  /**
   * A stream whose oldest unsent message is this old is closed: its agent
   * does not read, and everything sent to it would pile up in memory. The
   * agent opens the stream again and gets a full netmap.
   */
  stallMs: number;
  keepaliveMs: number;
  /**
   * Milliseconds that only go forward; performance.now() unless set. The
   * wall clock can be stepped back (NTP, a resumed VM): a batch then was not
   * due for as long as the step, and delivered nothing meanwhile.
   */
  clock?: () => number;
  /** Called with the time from the first change other than presence in a batch to its delivery. */
  onDelivered?: (latencyMs: number, sessions: number) => void;
}

/**
 * Fewer bytes than any encoded Peer has: its node key alone is 46. A delta
 * that removes R peers and leaves V − C of the V peers unchanged can be larger
 * than a full netmap only if R · (id bytes) > (V − C) · MIN_PEER_BYTES.
 */
const MIN_PEER_BYTES = 46;
/** Sessions of a project per presence window that its presence-only batches wait. */
const PRESENCE_SESSIONS = 1000;
/** Below this many removed peers a full netmap is never considered. */
const FULL_CHECK_MIN_REMOVED = 64;
/**
 * For a stream that takes shared peers, a full netmap is mostly the group's
 * compressed peers, already at hand once one member got them: it is weighed
 * against every delta of at least this size (a policy change that shows a
 * node many peers), however few peers the delta removes.
 */
const SHARED_FULL_CHECK_MIN_BYTES = 16 * 1024;
/**
 * A delta its stream has not taken for this long stops counting against the
 * delta budget: a few agents that do not read must not hold back every
 * other agent's changes until they are closed as stalled.
 */
const SLOW_MS = 1000;

class Delta {
  readonly changed = new Map<string, EncodedPeer>();
  readonly removed = new Set<string>();
  readonly patches: Uint8Array[] = [];
  self = false;
  /** The node's new packet filter, when it differs from what the stream has. */
  filter: FilterRuleSpec[] | null = null;
  version = false;
  /** Compressed parts shared with other streams (SyncResponse.shared). */
  readonly shared: Uint8Array[] = [];

  empty(): boolean {
    return (
      !this.shared.length &&
      !this.changed.size &&
      !this.removed.size &&
      !this.patches.length &&
      !this.self &&
      !this.filter &&
      !this.version
    );
  }
}

export class Mapper {
  private readonly sessions = new Map<string, Attached>();
  private readonly byProject = new Map<string, Set<string>>();
  private readonly pending = new Map<string, Pending>();
  /** The policy each project's sessions were last brought up to date with. */
  private readonly delivered = new Map<string, CompiledPolicy>();
  private readonly encoded = new Map<string, EncodedPeer>();
  private readonly shared = new SharedPeerBlocks();
  private readonly compiledIds = new WeakMap<CompiledPolicy, number>();
  private lastCompiledId = 0;
  /** Streams waiting for their full netmap, oldest first. */
  private readonly waiting = new Map<string, Session>();
  /** Bytes of full netmaps handed to streams and not yet taken by the transport. */
  private unsentFull = 0;
  /** Bytes of deltas handed to streams, not yet taken, and counted against the budget. */
  private unsentDeltas = 0;
  /** Set while a flush waits for the transports to take deltas: looks for slow streams. */
  private paused: NodeJS.Timeout | undefined;
  private timer: NodeJS.Timeout | undefined;
  /** When the timer fires (the mapper's clock); infinite while none is set. */
  private due = Number.POSITIVE_INFINITY;
  /** CPU time of the last flush: the next batch waits at least as long. */
  private lastFlushMs = 0;
  /** When the last flush ended (performance.now() time). */
  private lastFlushEnd = 0;
  /** The flush under way, project by project, one session per step. */
  private flushing: Iterator<void>[] | null = null;
  private readonly keepalive: NodeJS.Timeout;
  private readonly now: () => number;

  constructor(
    private readonly state: State,
    private readonly opts: MapperOptions,
  ) {
    this.now = opts.clock ?? (() => performance.now());
    state.onEvent((e) => this.enqueue(e));
    this.keepalive = setInterval(() => this.sendKeepalives(), Math.max(1000, opts.keepaliveMs / 2));
    this.keepalive.unref();
  }

  hasSession(nodeId: string): boolean {
    return this.sessions.has(nodeId) || this.waiting.has(nodeId);
  }

  get sessionCount(): number {
    return this.sessions.size + this.waiting.size;
  }

  /** Bytes handed to the transports and not taken yet, as counted against their budgets. */
  get unsent(): { full: number; deltas: number } {
    return { full: this.unsentFull, deltas: this.unsentDeltas };
  }

  /** Whether everything has been handed to the streams: no batch waits, no flush is under way. */
  get idle(): boolean {
    return !this.flushing && !this.pending.size && !this.waiting.size;
  }

  /**
   * Queues the stream for its full netmap, after which it gets deltas;
   * replaces an older stream of the same node.
   */
  attach(session: Session): void {
    if (!this.state.getNode(session.nodeId)) {
      session.close('node does not exist', 'gone');
      return;
    }
    const old = this.sessions.get(session.nodeId);
    if (old) {
      this.detachEntry(old);
      old.session.close('replaced by a newer stream of the same node', 'retry');
    }
    const queued = this.waiting.get(session.nodeId);
    if (queued) {
      this.waiting.delete(session.nodeId);
      queued.close('replaced by a newer stream of the same node', 'retry');
    }
    this.waiting.set(session.nodeId, session);
    this.admit();
  }

  /** Sends full netmaps to waiting streams, oldest first, while the budget allows. */
  private admit(): void {
    for (const [id, session] of this.waiting) {
      if (this.unsentFull > 0 && this.unsentFull >= this.opts.fullNetmapBudget) return;
      this.waiting.delete(id);
      this.sendFull(session);
    }
  }

  private sendFull(session: Session): void {
    const node = this.state.getNode(session.nodeId);
    if (!node) {
      session.close('node does not exist', 'gone');
      return;
    }
    // Pending changes stay in their window: the full netmap already shows them,
    // and applying them again as deltas is harmless. Flushing here instead sent
    // one message to every connected agent per connecting agent.
    const compiled = this.state.compiled(node.project);
    if (!this.delivered.has(node.project)) this.delivered.set(node.project, compiled);
    const rules = compiled.filterFor(node.id);
    const entry: Attached = {
      session,
      project: node.project,
      seq: 0n,
      lastSent: 0,
      filterKey: filterKey(rules),
      desired: this.state.desiredEntryFor(node),
      inFlight: [],
      implied: session.impliedPeerFields === true,
      shared: session.impliedPeerFields === true && session.sharedPeers === true,
      base: compiled,
    };
    this.sessions.set(node.id, entry);
    let set = this.byProject.get(node.project);
    if (!set) {
      set = new Set();
      this.byProject.set(node.project, set);
    }
    set.add(node.id);
    this.handOver(entry, this.frame(entry, [this.fullPiece(entry, node, compiled, rules)]), true);
  }

  /** Sends one message of the stream (just framed), counted until the transport takes it. */
  private handOver(entry: Attached, msg: Uint8Array, full: boolean): void {
    const item: InFlight = { bytes: msg.length, at: entry.lastSent, full, counted: true };
    entry.inFlight.push(item);
    if (full) this.unsentFull += item.bytes;
    else this.unsentDeltas += item.bytes;
    entry.session.send(msg, () => this.taken(entry, item));
  }

  /** The transport took a message, or its stream ended: the bytes leave their budget. */
  private taken(entry: Attached, item: InFlight): void {
    const i = entry.inFlight.indexOf(item);
    if (i < 0) return;
    entry.inFlight.splice(i, 1);
    this.uncount(item);
    if (item.full) this.admit();
    else this.resumeIfRoom();
  }

  private uncount(item: InFlight): void {
    if (!item.counted) return;
    item.counted = false;
    if (item.full) this.unsentFull -= item.bytes;
    else this.unsentDeltas -= item.bytes;
  }

  /** The full netmap of the entry's node as the SyncResponse field that carries it. */
  private fullPiece(
    entry: Attached,
    node: NodeRecord,
    compiled: CompiledPolicy,
    rules: FilterRuleSpec[],
  ): Piece {
    const group = entry.shared ? compiled.peerGroup(node.id) : undefined;
    if (group) {
      const block = this.shared.get(node.project, compiled, group, (ids) =>
        assemble([sharedPeersPiece(this.encodeAll(ids))]),
      );
      const newer = this.encodeAll([...block.stale].filter((id) => id !== node.id));
      return {
        field: SYNC.full.number,
        message: netMapPieces(this.state, node, this.opts, rules, newer, true, block.bytes, true),
      };
    }
    return {
      field: SYNC.full.number,
      message: netMapPieces(
        this.state,
        node,
        this.opts,
        rules,
        this.encodeAll(compiled.visiblePeers(node.id)),
        entry.implied,
        undefined,
        entry.shared,
      ),
    };
  }

  /** The encoded peers of the nodes of `ids` that still exist. */
  private encodeAll(ids: string[]): EncodedPeer[] {
    const peers: EncodedPeer[] = [];
    for (const id of ids) {
      const n = this.state.getNode(id);
      if (n) peers.push(this.encode(n));
    }
    return peers;
  }

  /** The node's Peer and DNS record, encoded once until the node changes. */
  private encode(n: NodeRecord): EncodedPeer {
    let e = this.encoded.get(n.id);
    if (!e) {
      e = new EncodedPeer(this.state, n, this.opts);
      this.encoded.set(n.id, e);
    }
    return e;
  }

  detach(session: Session): void {
    if (this.waiting.get(session.nodeId) === session) this.waiting.delete(session.nodeId);
    const entry = this.sessions.get(session.nodeId);
    if (entry && entry.session === session) this.detachEntry(entry);
  }

  private detachEntry(entry: Attached): void {
    this.sessions.delete(entry.session.nodeId);
    // Every attached entry's project has its set: sendFull made it first.
    const members = this.byProject.get(entry.project)!;
    members.delete(entry.session.nodeId);
    if (!members.size) this.shared.forget(entry.project);
    const unsent = entry.inFlight.splice(0);
    for (const item of unsent) this.uncount(item);
    if (unsent.some((item) => item.full)) this.admit();
    this.resumeIfRoom();
  }

  close(): void {
    clearInterval(this.keepalive);
    clearTimeout(this.timer);
    clearTimeout(this.paused);
    this.flushing = null;
    const open = [...this.waiting.values(), ...Array.from(this.sessions.values(), (e) => e.session)];
    this.waiting.clear();
    this.sessions.clear();
    for (const session of open) session.close('coordinator is shutting down', 'retry');
  }

  private enqueue(e: StateEvent): void {
    if (e.type !== 'policy-changed' && e.type !== 'versions-changed') this.encoded.delete(e.node.id);
    if (e.type === 'node-patched') this.shared.patched(e.node.project, e.node.id);
    const project = e.type === 'policy-changed' || e.type === 'versions-changed' ? e.project : e.node.project;
    let p = this.pending.get(project);
    if (!p) {
      p = {
        upserted: new Set(),
        removed: new Map(),
        patched: new Map(),
        policy: false,
        versions: false,
        urgentAt: null,
        since: this.now(),
      };
      this.pending.set(project, p);
    }
    switch (e.type) {
      case 'node-added':
      case 'node-changed':
        p.upserted.add(e.node.id);
        p.removed.delete(e.node.id);
        break;
      case 'node-removed':
        p.upserted.delete(e.node.id);
        p.patched.delete(e.node.id);
        p.removed.set(e.node.id, e.node);
        break;
      case 'node-patched':
        p.patched.set(e.node.id, (p.patched.get(e.node.id) ?? false) || e.endpointsChanged);
        break;
      case 'policy-changed':
        p.policy = true;
        break;
      case 'versions-changed':
        p.versions = true;
        break;
    }
    const presence = e.type === 'node-patched' && !e.endpointsChanged;
    if (!presence) p.urgentAt ??= this.now();
    this.scheduleDue();
  }

  /**
   * When the project's batch is due. One that only says nodes went online
   * or offline waits the presence window, longer in large projects: each of
   * its flushes is a message to every agent of the project, and while
   * thousands of agents connect, presence changes without pause.
   */
  private dueAt(project: string, p: Pending): number {
    if (p.urgentAt !== null) return p.urgentAt + this.opts.coalesceMs;
    const sessions = this.byProject.get(project)?.size ?? 0;
    const per = this.opts.presenceSessions ?? PRESENCE_SESSIONS;
    return p.since + this.opts.presenceMs * Math.max(1, sessions / per);
  }

  /**
   * Flushes when the first batch is due. Under load a flush of a large
   * project takes longer than the window; waiting as long as the last flush
   * took keeps fan-out to at most about half of the coordinator's time, so
   * registrations and streams still get served, and batches grow instead of
   * messages multiplying.
   */
  private scheduleDue(): void {
    let first = Number.POSITIVE_INFINITY;
    for (const [project, p] of this.pending) first = Math.min(first, this.dueAt(project, p));
    if (first === Number.POSITIVE_INFINITY) return;
    this.schedule(Math.max(first - this.now(), this.backoffMs()));
  }

  /**
   * What is left of the wait that the last flush's duration asks for. Time
   * since it ended counts towards it: after a quiet spell, a large flush long
   * ago must not delay the next change.
   */
  private backoffMs(): number {
    return Math.max(0, this.lastFlushMs - (performance.now() - this.lastFlushEnd));
  }

  /** Flushes in `delayMs` unless a flush is already due sooner. */
  private schedule(delayMs: number): void {
    const at = this.now() + delayMs;
    if (at >= this.due) return;
    clearTimeout(this.timer);
    this.due = at;
    this.timer = setTimeout(() => this.flush(true), delayMs);
  }

  /**
   * Delivers everything pending: at once when it fits in one slice, which is
   * always so in tests, otherwise over several turns of the event loop. One
   * flush runs at a time, so every stream gets its batches in order; what
   * arrives meanwhile waits for the next one. `dueOnly`: only the batches
   * whose time has come; the others wait for theirs.
   */
  flush(dueOnly = false): void {
    clearTimeout(this.timer);
    this.due = Number.POSITIVE_INFINITY;
    if (this.flushing) return;
    const now = this.now();
    const projects = [...this.pending].filter(([project, p]) => !dueOnly || this.dueAt(project, p) <= now);
    this.flushing = projects.map(([project]) => this.flushProject(project));
    this.lastFlushMs = 0;
    this.continueFlush();
  }

  private continueFlush(): void {
    const work = this.flushing;
    if (!work) return;
    const start = performance.now();
    while (work.length) {
      if (this.overBudget()) {
        this.lastFlushMs += performance.now() - start;
        this.paused = setTimeout(() => this.forgetSlow(), SLOW_MS);
        return;
      }
      if (work[0]!.next().done) work.shift();
      else if (performance.now() - start >= this.opts.sliceMs) break;
    }
    this.lastFlushMs += performance.now() - start;
    if (work.length) {
      setImmediate(() => this.continueFlush());
      return;
    }
    this.flushing = null;
    this.lastFlushEnd = performance.now();
    this.scheduleDue();
  }

  private overBudget(): boolean {
    return this.unsentDeltas > 0 && this.unsentDeltas >= this.opts.deltaBudget;
  }

  /** Goes on with a flush that waits for the transports, once its deltas fit the budget again. */
  private resumeIfRoom(): void {
    if (this.paused && !this.overBudget()) this.resume();
  }

  /** Goes on with the flush that waited for the transports. */
  private resume(): void {
    clearTimeout(this.paused);
    this.paused = undefined;
    setImmediate(() => this.continueFlush());
  }

  /**
   * While a flush waits: deltas not taken for SLOW_MS stop counting against
   * the budget. The flush goes on, or waits again if that was not enough.
   */
  private forgetSlow(): void {
    const before = this.now() - SLOW_MS;
    for (const entry of this.sessions.values())
      for (const item of entry.inFlight) if (!item.full && item.at <= before) this.uncount(item);
    this.resume();
  }

  private *flushProject(project: string): Generator<void> {
    const p = this.pending.get(project);
    const newC = this.state.compiled(project);
    const oldC = this.delivered.get(project) ?? newC;
    this.delivered.set(project, newC);
    if (!p) return;
    this.pending.delete(project);
    const members = this.byProject.get(project);
    if (!members?.size) return;
    // The streams this flush is for: one that opens while a sliced flush runs
    // has a full netmap newer than the flush and waits for the next one.
    const entries = new Map<string, Attached>();
    // Streams whose view follows another policy than the last flush's.
    const rebased = new Set<string>();
    for (const id of members) {
      const entry = this.sessions.get(id);
      if (!entry) continue;
      entries.set(id, entry);
      if (entry.base === oldC) entry.base = newC;
      else rebased.add(id);
    }

    const deltas = new Map<string, Delta>();
    const delta = (id: string): Delta | undefined => {
      if (!members.has(id)) return undefined;
      let d = deltas.get(id);
      if (!d) {
        d = new Delta();
        deltas.set(id, d);
      }
      return d;
    };
    const peerOf = (n: NodeRecord): EncodedPeer => this.encode(n);
    const filterCheck = new Set<string>();
    const rulesChanged = oldC !== newC && !(oldC.allowAll && newC.allowAll);

    for (const id of p.upserted) {
      const node = this.state.getNode(id);
      if (!node) continue;
      for (const other of union(oldC.visiblePeers(id), newC.visiblePeers(id))) {
        const d = delta(other);
        if (!d) continue;
        if (newC.canSee(other, id)) {
          d.changed.set(id, peerOf(node));
          d.removed.delete(id);
        } else {
          d.removed.add(id);
          d.changed.delete(id);
        }
        if (rulesChanged) filterCheck.add(other);
      }
      const own = delta(id);
      if (own) {
        own.self = true;
        this.diffVisibility(id, oldC, newC, delta, peerOf);
        filterCheck.add(id);
      }
      if (this.state.isExpired(node))
        this.sessions.get(id)?.session.close(`node ${node.name} has expired`, 'gone');
    }
    for (const [id, node] of p.removed) {
      for (const other of oldC.visiblePeers(id)) {
        const d = delta(other);
        if (!d) continue;
        d.removed.add(id);
        d.changed.delete(id);
        if (rulesChanged) filterCheck.add(other);
      }
      const entry = this.sessions.get(id);
      if (entry) {
        this.detachEntry(entry);
        entry.session.close(`node ${node.name} was deleted`, 'gone');
      }
    }
    const patches: [string, Uint8Array][] = [];
    for (const [id, endpointsChanged] of p.patched) {
      const node = this.state.getNode(id);
      if (!node || p.upserted.has(id)) continue;
      const patch = toBinary(
        PeerPatchSchema,
        create(PeerPatchSchema, {
          id,
          online: this.state.isOnline(id),
          lastSeen: node.lastSeen === null ? undefined : timestampFromMs(node.lastSeen),
          endpointsChanged,
          endpoints: endpointsChanged ? this.state.endpointsOf(node) : [],
        }),
      );
      patches.push([id, patch]);
    }
    // Streams that take the batch's patches as one compressed part of their group's.
    const grouped = new Map<string, PeerGroup>();
    if (patches.length >= SHARED_PATCHES_MIN)
      for (const id of members) {
        const group = this.sessions.get(id)?.shared ? newC.peerGroup(id) : undefined;
        if (group) grouped.set(id, group);
      }
    if (grouped.size < members.size)
      for (const [id, patch] of patches)
        for (const other of newC.visiblePeers(id)) {
          const d = grouped.has(other) ? undefined : delta(other);
          if (d && !d.changed.has(id)) d.patches.push(patch);
        }
    const patchParts = new Map<string, PatchPart>();
    const policyParts = new Map<string, Uint8Array | null>();
    if (p.versions) {
      for (const id of members) {
        const node = this.state.getNode(id);
        const entry = this.sessions.get(id);
        if (!node || !entry) continue;
        const v = this.state.desiredEntryFor(node);
        if (v !== entry.desired) {
          entry.desired = v;
          delta(id)!.version = true;
        }
      }
    }
    const idBytes = new Map<string, Uint8Array>();
    const idOf = (id: string): Uint8Array => {
      let b = idBytes.get(id);
      if (!b) {
        b = Buffer.from(id);
        idBytes.set(id, b);
      }
      return b;
    };
    let sent = 0;
    // After a policy change every member's view is compared, one session per
    // step: that is the part that grows with the square of the project.
    const recipients = p.policy || grouped.size ? [...members] : [...new Set([...deltas.keys(), ...rebased])];
    for (const id of recipients) {
      yield;
      const entry = this.sessions.get(id);
      const node = this.state.getNode(id);
      if (!entry || entry !== entries.get(id) || !node) continue;
      const d = delta(id);
      if (!d) continue;
      let visible: number | undefined;
      const moved = rebased.has(id);
      if (p.policy || moved) {
        const from = moved ? entry.base : oldC;
        entry.base = newC;
        const part = entry.shared ? this.policyPart(id, from, newC, policyParts) : undefined;
        if (part === undefined) visible = this.diffVisibility(id, from, newC, delta, peerOf);
        else if (part) d.shared.push(part);
      }
      const group = grouped.get(id);
      if (group) {
        let part = patchParts.get(group.key);
        if (!part) {
          part = patchPart(group, patches);
          patchParts.set(group.key, part);
        }
        // A batch of the node's own patch alone says nothing to it.
        if (part.bytes && !(part.count === 1 && part.first === id)) d.shared.push(part.bytes);
      }
      if (p.policy || moved || filterCheck.has(id)) {
        const rules = newC.filterFor(id);
        const key = filterKey(rules);
        if (key !== entry.filterKey) {
          entry.filterKey = key;
          d.filter = rules;
        }
      }
      if (d.empty()) continue;
      const pieces: Piece[] = [];
      if (d.filter)
        pieces.push({ field: SYNC.packetFilter.number, message: filterPieces(d.filter, entry.shared) });
      if (d.version || d.self) {
        const head = create(SyncResponseSchema, {
          desiredVersion: d.version ? (entry.desired?.version ?? '') : undefined,
          desiredRelease: d.version ? desiredReleaseMessage(entry.desired) : undefined,
          self: d.self ? nodeMessage(this.state, node) : undefined,
        });
        pieces.push(toBinary(SyncResponseSchema, head));
      }
      if (d.changed.size)
        pieces.push({
          field: SYNC.peersChanged.number,
          elements: Array.from(d.changed.values(), (e) => e.peer(entry.implied)),
        });
      const removed = Array.from(d.removed, idOf);
      if (removed.length) pieces.push({ field: SYNC.peersRemoved.number, elements: removed });
      if (d.patches.length) pieces.push({ field: SYNC.peerPatches.number, elements: d.patches });
      if (d.shared.length) pieces.push({ field: SYNC.shared.number, elements: d.shared });
      const full = this.fullIfSmaller(entry, node, newC, pieces, d, removed, visible);
      this.write(entry, full ? [full] : pieces);
      sent++;
    }
    if (sent && p.urgentAt !== null) this.opts.onDelivered?.(this.now() - p.urgentAt, sent);
  }

  /**
   * The full netmap, when it is smaller than the delta `pieces`: after a
   * change of policy that replaces most of what a node sees, the ids of the
   * peers it no longer sees can outweigh the peers it still does. Building a
   * full netmap to compare costs as much as sending it, so it is built only
   * when the delta's removals alone could make it the larger, or, for a
   * stream that takes shared peers, when the delta is large. `visible`: the
   * node's number of peers now, when known.
   */
  private fullIfSmaller(
    entry: Attached,
    node: NodeRecord,
    compiled: CompiledPolicy,
    pieces: Piece[],
    d: Delta,
    removed: Uint8Array[],
    visible: number | undefined,
  ): Piece | undefined {
    if (entry.shared) {
      const deltaBytes = sizeOf(pieces);
      if (deltaBytes < SHARED_FULL_CHECK_MIN_BYTES) return undefined;
      const full = this.fullPiece(entry, node, compiled, compiled.filterFor(node.id));
      return sizeOf([full]) < deltaBytes ? full : undefined;
    }
    if (removed.length < FULL_CHECK_MIN_REMOVED) return undefined;
    let removedBytes = 0;
    for (const r of removed) removedBytes += r.length + 2;
    const deltaBytes = sizeOf(pieces);
    // Mostly peers that change: the full netmap would carry them too, and more.
    if (removedBytes * 2 < deltaBytes) return undefined;
    const v = visible ?? compiled.visiblePeers(node.id).length;
    if (removedBytes <= (v - d.changed.size) * MIN_PEER_BYTES) return undefined;
    const full = this.fullPiece(entry, node, compiled, compiled.filterFor(node.id));
    return sizeOf([full]) < deltaBytes ? full : undefined;
  }

  /**
   * What a change of policy shows and hides to the node, as a compressed part
   * shared by every node that moves between the same two groups: the peers
   * of the new group that the old lacked, and the ids of the old group's that
   * the new lacks (the node itself may be among either; the agent ignores it).
   * Null when nothing changes for the node; undefined when its peers are not
   * a group's, before or after.
   */
  private policyPart(
    id: string,
    oldC: CompiledPolicy,
    newC: CompiledPolicy,
    parts: Map<string, Uint8Array | null>,
  ): Uint8Array | null | undefined {
    if (oldC === newC) return null;
    const before = oldC.peerGroup(id);
    const after = newC.peerGroup(id);
    if (!before || !after) return undefined;
    const key = `${this.compiledId(oldC)}:${before.key}\n${this.compiledId(newC)}:${after.key}`;
    let part = parts.get(key);
    if (part === undefined) {
      const was = new Set(before.members());
      const is = after.members();
      const now = new Set(is);
      const shown = this.encodeAll(is.filter((m) => !was.has(m)));
      const hidden = [...was].filter((m) => !now.has(m)).map((m) => Buffer.from(m));
      part =
        shown.length || hidden.length
          ? compressed([
              { field: SYNC.peersChanged.number, elements: shown.map((e) => e.peer(true)) },
              { field: SYNC.peersRemoved.number, elements: hidden },
            ])
          : null;
      parts.set(key, part);
    }
    return part;
  }

  /** A number per compiled policy, for keys that must not mix groups of different policies. */
  private compiledId(c: CompiledPolicy): number {
    let id = this.compiledIds.get(c);
    if (id === undefined) {
      id = ++this.lastCompiledId;
      this.compiledIds.set(c, id);
    }
    return id;
  }

  /** Adds to the node's delta what the change of policy shows or hides; returns its number of peers now. */
  private diffVisibility(
    id: string,
    oldC: CompiledPolicy,
    newC: CompiledPolicy,
    delta: (id: string) => Delta | undefined,
    peerOf: (n: NodeRecord) => EncodedPeer,
  ): number | undefined {
    if (oldC === newC) return undefined;
    const d = delta(id);
    if (!d) return undefined;
    const visible = newC.visiblePeers(id);
    // canSee answers in O(rules) without building sets of the whole project per node.
    for (const other of visible) {
      if (oldC.canSee(id, other)) continue;
      const n = this.state.getNode(other);
      if (n) d.changed.set(other, peerOf(n));
    }
    for (const other of oldC.visiblePeers(id)) if (!newC.canSee(id, other)) d.removed.add(other);
    return visible.length;
  }

  private write(entry: Attached, pieces: Piece[]): void {
    this.handOver(entry, this.frame(entry, pieces), false);
  }

  /** The next message of the stream, numbered. */
  private frame(entry: Attached, pieces: Piece[]): Uint8Array {
    entry.seq += 1n;
    entry.lastSent = this.now();
    return assemble([seqField(entry.seq), ...pieces]);
  }

  /** Sends keepalives to quiet streams and closes the streams whose agents stopped reading. */
  private sendKeepalives(): void {
    const now = this.now();
    for (const entry of this.sessions.values()) {
      const oldest = entry.inFlight[0];
      if (oldest && oldest.at <= now - this.opts.stallMs) {
        this.detachEntry(entry);
        const seconds = Math.round((now - oldest.at) / 1000);
        entry.session.close(`the agent has not read its stream for ${seconds} s`, 'retry');
      } else if (entry.lastSent <= now - this.opts.keepaliveMs) this.write(entry, [KEEPALIVE]);
    }
  }
}

/**
 * Below this many presence patches in a batch, a project's streams get them
 * each on their own; from here on, one compressed part per group.
 */
const SHARED_PATCHES_MIN = 16;

interface PatchPart {
  /** Null when no node of the group changed. */
  bytes: Uint8Array | null;
  count: number;
  first: string | undefined;
}

/** The batch's patches of the group's nodes, compressed. */
function patchPart(group: PeerGroup, patches: [string, Uint8Array][]): PatchPart {
  const members = new Set(group.members());
  const mine = patches.filter(([id]) => members.has(id));
  return {
    bytes: mine.length
      ? compressed([{ field: SYNC.peerPatches.number, elements: mine.map(([, patch]) => patch) }])
      : null,
    count: mine.length,
    first: mine[0]?.[0],
  };
}

function union(a: string[], b: string[]): Set<string> {
  const s = new Set(a);
  for (const x of b) s.add(x);
  return s;
}
