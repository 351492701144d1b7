// Simulated agents for the load generator: the integration harness's SimAgent
// (real Ed25519 machine key, real signed Register and Sync calls) with changes
// that let one process hold thousands of them:
//  - every agent has a TLS connection of its own, as real agents do; groups of
//    agents can share one instead (AgentFleet.agentsPerConnection);
//  - sync messages are not decoded: bench/lib/wire.ts reads the peer ids (and
//    the name and tag of ids seen for the first time) from the bytes;
//  - the netmap is kept as a set of peer indexes, updated per delta in
//    O(size of the delta) with the same rules as proto/netmap.ts applySync
//    (which copies the whole netmap per message: fine for one agent on its
//    own machine, seconds per delta for 1,000 agents in one process);
//  - a lost stream is reopened like the real agent does it (register again,
//    then sync) after a jittered backoff.
import { generateKeyPairSync } from 'node:crypto';
import { create, toBinary } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import { status } from '@grpc/grpc-js';
import { Backoff } from '../../agent/control/backoff.js';
import { dial, type Endpoint } from '../../proto/dial.js';
import {
  ControlService,
  RegisterRequestSchema,
  type SyncRequest,
  SyncRequestSchema,
  type SyncResponse,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import { CLIENT_RECEIVE_LIMIT, makeClient, methodPath, unary } from '../../proto/grpc.js';
import type { MachineKeyPair } from '../../proto/keys.js';
import { IMPLIED_PEER_FIELDS, NETMAP_FEATURES_HEADER, SHARED_PEERS } from '../../proto/netmap.js';
import { SimAgent } from '../../test/integration/harness.js';
import { checkSameSignatures, NodeSigner } from './signer.js';
import { nowMs } from './stats.js';
import { checkScanner, type PeerView, type SyncView, scanSync, syncViewOf } from './wire.js';

/** Reconnect backoff of the bench agents: 100 ms doubling to 2 s, each delay jittered in [d/2, d]. */
export const RECONNECT_BACKOFF = { baseMs: 100, maxMs: 2000 };
export const ENDPOINTS = ['192.0.2.10:41641'];

/** Who signs the agents' calls: the agent's ControlClient (tweetnacl) or node:crypto (same bytes). */
export type Signer = 'agent' | 'node';

const method = (name: string) =>
  methodPath(ControlService, ControlService.methods.find((m) => m.name === name)!);
const REGISTER = method('Register');
const SYNC = method('Sync');
const serializeSyncRequest = (req: SyncRequest) => Buffer.from(toBinary(SyncRequestSchema, req));

/** A sync stream of the `node` mode yields the encoded messages, of the `agent` mode decoded ones. */
type SyncStream = grpc.ClientDuplexStream<SyncRequest, Buffer | SyncResponse>;

/**
 * An Ed25519 machine key in tweetnacl's layout (seed ‖ public key), made with
 * node:crypto: tweetnacl takes ~4 ms per key, which would dominate setting up
 * 10,000 agents. The key is the same kind of key; signing still uses tweetnacl.
 * The DER encodings are asked of the generator itself: exporting the key
 * objects as JWK afterwards deadlocks Node 20.20 within a few thousand keys
 * (a GC inside the export destroys the key-generation job while it holds the
 * key's mutex).
 */
export function machineKey(): MachineKeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519', {
    publicKeyEncoding: { type: 'spki', format: 'der' },
    privateKeyEncoding: { type: 'pkcs8', format: 'der' },
  });
  // SPKI: 12 bytes of header, then the key; PKCS#8: 16 bytes of header, then the seed.
  const pub = publicKey.subarray(12);
  return {
    publicKey: new Uint8Array(pub),
    secretKey: new Uint8Array(Buffer.concat([privateKey.subarray(16), pub])),
  };
}

/** A growable bit set over small integers. */
class Bits {
  private b = new Uint8Array(128);
  size = 0;

  has(i: number): boolean {
    return ((this.b[i >> 3] ?? 0) & (1 << (i & 7))) !== 0;
  }

  /** Returns true when `i` was not in the set. */
  add(i: number): boolean {
    if (i >> 3 >= this.b.length) {
      const grown = new Uint8Array(Math.max(this.b.length * 2, (i >> 3) + 1));
      grown.set(this.b);
      this.b = grown;
    }
    if (this.has(i)) return false;
    this.b[i >> 3] = this.b[i >> 3]! | (1 << (i & 7));
    this.size++;
    return true;
  }

  /** Returns true when `i` was in the set. */
  delete(i: number): boolean {
    if (!this.has(i)) return false;
    this.b[i >> 3] = this.b[i >> 3]! & ~(1 << (i & 7));
    this.size--;
    return true;
  }

  clear(): void {
    this.b.fill(0);
    this.size = 0;
  }
}

/** Waits until `test` holds for every agent, and notes when each one got there. */
export class Watch {
  readonly reachedAt = new Map<BenchAgent, number>();
  private readonly pending: Set<BenchAgent>;
  private resolve!: () => void;
  readonly done: Promise<void>;
  /** When the last agent got there (or the wait began). */
  private progressAt = nowMs();

  constructor(
    agents: Iterable<BenchAgent>,
    private readonly test: (a: BenchAgent) => boolean,
  ) {
    this.pending = new Set(agents);
    this.done = new Promise((r) => {
      this.resolve = r;
    });
    for (const a of this.pending) this.check(a);
  }

  get remaining(): number {
    return this.pending.size;
  }

  check(a: BenchAgent): void {
    if (!this.pending.has(a) || !this.test(a)) return;
    this.pending.delete(a);
    this.progressAt = nowMs();
    this.reachedAt.set(a, this.progressAt);
    if (!this.pending.size) this.resolve();
  }

  /**
   * Resolves when every agent got there. Rejects when no agent got there for
   * `stallMs`: a limit on the whole wait would have to grow with the work
   * (connecting 10,000 agents of one project takes many minutes), a limit on
   * the time without progress does not.
   */
  async wait(stallMs: number, what: string): Promise<void> {
    this.progressAt = nowMs();
    let timer: NodeJS.Timeout | undefined;
    const stalled = new Promise<never>((_, reject) => {
      timer = setInterval(
        () => {
          if (nowMs() - this.progressAt > stallMs)
            reject(
              new Error(
                `no agent got ${what} for ${stallMs} ms: ${this.pending.size} of ` +
                  `${this.pending.size + this.reachedAt.size} agents lack it, such as ` +
                  [...this.pending]
                    .slice(0, 3)
                    .map((a) => a.describe())
                    .join('; '),
              ),
            );
        },
        Math.min(1000, stallMs),
      );
    });
    try {
      await Promise.race([this.done, stalled]);
    } finally {
      clearInterval(timer);
    }
  }

  /** Milliseconds from `t0` to when each agent got there. */
  latencies(t0: number): number[] {
    return [...this.reachedAt.values()].map((t) => Math.max(0, t - t0));
  }
}

/** Agents of one load-generating process, their shared connections and peer index. */
export class AgentFleet {
  readonly agents: BenchAgent[] = [];
  private readonly channels: grpc.Client[] = [];
  private readonly watches = new Set<Watch>();
  private readonly index = new Map<string, number>();
  private readonly tagByIndex: string[] = [];
  private readonly idByName = new Map<string, string>();
  /** Messages received and sequence errors, over all agents. */
  messages = 0;
  sequenceErrors = 0;
  /** Register calls tried again after DEADLINE_EXCEEDED or UNAVAILABLE. */
  registerRetries = 0;
  created = 0;
  /** Encoded size of the first full netmap any agent received. */
  fullNetmapBytes = 0;
  /** How streams ended: "CODE details" -> count. */
  readonly endings = new Map<string, number>();

  private constructor(
    readonly url: string,
    readonly fingerprint: string,
    private readonly endpoint: Endpoint,
    readonly agentsPerConnection: number,
    readonly signer: Signer,
  ) {}

  static async open(
    url: string,
    fingerprint: string,
    agentsPerConnection: number,
    signer: Signer,
  ): Promise<AgentFleet> {
    if (signer === 'node') {
      checkSameSignatures(machineKey());
      checkScanner();
    }
    return new AgentFleet(url, fingerprint, await dial(url, { fingerprint }), agentsPerConnection, signer);
  }

  /** Connections opened so far (closed ones included). */
  get connections(): number {
    return this.channels.length;
  }

  /**
   * The client of the connection for the next agent. All channels use the
   * same credentials object, so grpc-js would put them on one subchannel (one
   * TCP connection); a distinct dummy option per group keeps them apart.
   */
  private channel(): grpc.Client {
    const k = Math.floor(this.created / this.agentsPerConnection);
    this.created++;
    if (!this.channels[k]) {
      this.channels[k] = makeClient(ControlService, this.endpoint.target, this.endpoint.credentials, {
        'grpc.keepalive_time_ms': 30_000,
        'grpc.keepalive_timeout_ms': 10_000,
        'grpc.keepalive_permit_without_calls': 1,
        ...CLIENT_RECEIVE_LIMIT,
        // Retry a refused connection as quickly as the agents' own backoff.
        'grpc.initial_reconnect_backoff_ms': RECONNECT_BACKOFF.baseMs,
        'grpc.max_reconnect_backoff_ms': RECONNECT_BACKOFF.maxMs,
        // One agent on its own connection has a 64 KiB HTTP/2 window; a group
        // sharing a connection gets that per agent, or full netmaps queue behind
        // one window. (The option also raises the per-stream window.)
        ...(this.agentsPerConnection > 1
          ? { 'grpc-node.flow_control_window': 65_535 * this.agentsPerConnection }
          : {}),
        ...this.endpoint.options,
        'meshgate.bench.conn': k,
      });
    }
    return this.channels[k]!;
  }

  /** A new agent with a fresh machine key, not yet registered. */
  agent(tag = ''): BenchAgent {
    const a = new BenchAgent(this, this.channel(), tag);
    this.agents.push(a);
    return a;
  }

  peerIndex(p: PeerView): number {
    let i = this.index.get(p.id);
    if (i === undefined) {
      i = this.index.size;
      this.index.set(p.id, i);
      this.tagByIndex[i] = p.tag;
      this.idByName.set(p.name, p.id);
    }
    return i;
  }

  /** Ids whose name and tag the fleet has, so the scanner need not read them. */
  readonly knows = (id: string): boolean => this.index.has(id);

  indexOf(id: string): number | undefined {
    return this.index.get(id);
  }

  tagOf(i: number): string {
    return this.tagByIndex[i] ?? '';
  }

  idOfName(name: string): string | undefined {
    return this.idByName.get(name);
  }

  watch(agents: Iterable<BenchAgent>, test: (a: BenchAgent) => boolean): Watch {
    const w = new Watch(agents, test);
    if (w.remaining) {
      this.watches.add(w);
      void w.done.then(() => this.watches.delete(w));
    }
    return w;
  }

  /** Called by an agent after it applied a message. */
  changed(a: BenchAgent): void {
    for (const w of this.watches) w.check(a);
  }

  close(): void {
    for (const a of this.agents) a.stop();
    for (const c of this.channels) c.close();
  }
}

export class BenchAgent {
  readonly sim: SimAgent;
  /** Indexes (AgentFleet.peerIndex) of the peers in this agent's netmap. */
  readonly peers = new Bits();
  /** Peers that carry this agent's own tag. */
  sameTag = 0;
  seq = 0n;
  hasFull = false;
  /** Counts of full netmaps and of packet filters received. */
  fulls = 0;
  filters = 0;
  messages = 0;
  patches = 0;
  lastFullAt = 0;
  private stream: SyncStream | null = null;
  private stopped = false;
  private retry: NodeJS.Timeout | null = null;
  private readonly backoff = new Backoff(RECONNECT_BACKOFF.baseMs, RECONNECT_BACKOFF.maxMs);
  /** Reconnect after the stream ends (on for the reconnect storm, off otherwise). */
  autoReconnect = false;
  /** Register + Sync attempts after a lost stream. */
  reconnects = 0;
  hostname = '';

  private readonly signer: NodeSigner | null;

  constructor(
    private readonly fleet: AgentFleet,
    private readonly channel: grpc.Client,
    readonly tag: string,
  ) {
    this.sim = new SimAgent(fleet.url, fleet.fingerprint, machineKey());
    this.signer = fleet.signer === 'node' ? new NodeSigner(this.sim.machine) : null;
    // ControlClient dials on first use and keeps its grpc.Client in a private
    // field; a client handed in beforehand puts this agent on the shared connection.
    (this.sim.client as unknown as { client: grpc.Client }).client = channel;
  }

  get id(): string {
    return this.sim.id;
  }

  async register(authKey: string, hostname: string): ReturnType<SimAgent['register']> {
    this.hostname = hostname;
    const tags = this.tag ? [this.tag] : [];
    if (!this.signer) return this.sim.register(authKey, hostname, { tags, endpoints: ENDPOINTS });
    // What SimAgent.register sends, signed with node:crypto.
    const req = create(RegisterRequestSchema, {
      authKey,
      machineKey: this.sim.machine.publicKey,
      nodeKey: this.sim.nodeKey.publicKey,
      hostname,
      os: 'linux',
      version: '0.1.0',
      requestedTags: tags,
      endpoints: ENDPOINTS,
    });
    // A call that could not even get its connection in time is tried again,
    // as the agent does: with thousands of connections opening at once the
    // load generator itself can fall that far behind. Each try is counted.
    for (let attempt = 1; ; attempt++) {
      const md = this.signer.metadata(REGISTER, '', toBinary(RegisterRequestSchema, req));
      try {
        const res = await unary(this.channel, ControlService, 'register', req, md, {
          deadline: Date.now() + 30_000,
        });
        this.sim.client.nodeId = res.node?.id ?? '';
        return res;
      } catch (err) {
        const code = (err as grpc.ServiceError).code;
        if (attempt >= 3 || (code !== status.DEADLINE_EXCEEDED && code !== status.UNAVAILABLE)) throw err;
        this.fleet.registerRetries++;
      }
    }
  }

  private async sync(): Promise<SyncStream> {
    if (!this.signer) return this.sim.client.sync();
    const md = this.signer.metadata(SYNC, this.id, new Uint8Array());
    // As the agent's client asks for it (agent/control/client.ts).
    md.set(NETMAP_FEATURES_HEADER, `${IMPLIED_PEER_FIELDS},${SHARED_PEERS}`);
    return this.channel.makeBidiStreamRequest(SYNC, serializeSyncRequest, (buf: Buffer) => buf, md);
  }

  private view(msg: Buffer | SyncResponse): SyncView {
    return msg instanceof Uint8Array
      ? scanSync(msg, this.fleet.knows)
      : syncViewOf(msg, msg.full !== undefined && !this.fleet.fullNetmapBytes, this.id);
  }

  hasPeer(id: string): boolean {
    const i = this.fleet.indexOf(id);
    return i !== undefined && this.peers.has(i);
  }

  /** Opens the sync stream; resolves when the full netmap is in, rejects if the stream ends first. */
  connect(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.open(resolve, reject);
    });
  }

  private open(onFull?: () => void, onEnd?: (err: Error) => void): void {
    void this.sync().then((stream) => {
      this.stream = stream;
      this.seq = 0n;
      this.hasFull = false;
      let ended = false;
      const end = (err: Error & { code?: number; details?: string }) => {
        if (ended) return;
        ended = true;
        const why = `${err.code ?? '-'} ${err.details ?? err.message}`.slice(0, 80);
        this.fleet.endings.set(why, (this.fleet.endings.get(why) ?? 0) + 1);
        if (this.stream === stream) this.stream = null;
        onEnd?.(err);
        onEnd = undefined;
        if (this.autoReconnect && !this.stopped) this.scheduleReconnect();
      };
      stream.on('data', (msg: Buffer | SyncResponse) => {
        let v: SyncView;
        try {
          v = this.view(msg);
        } catch (err) {
          stream.cancel();
          return end(err as Error);
        }
        if (!this.apply(v)) {
          stream.cancel();
          return end(new Error(`sequence error at ${v.seq}`));
        }
        if (v.full) {
          this.backoff.reset();
          onFull?.();
          onFull = undefined;
        }
        this.fleet.changed(this);
      });
      stream.on('status', (s: grpc.StatusObject) => end(Object.assign(new Error(s.details), s)));
      stream.on('error', (e: Error) => end(e));
      stream.write(
        create(SyncRequestSchema, {
          message: { case: 'hello', value: { version: '0.1.0', endpoints: ENDPOINTS } },
        }),
      );
    }, onEnd);
  }

  /**
   * Like the real agent: register again (idempotent with a known machine key),
   * then sync. Unlike it, wait for the connection first, so that this process
   * does not spend its CPU signing calls that cannot reach a stopped coordinator.
   */
  private scheduleReconnect(): void {
    if (this.retry) return;
    this.retry = setTimeout(() => {
      this.retry = null;
      this.channel.waitForReady(Date.now() + RECONNECT_BACKOFF.maxMs, (notReady) => {
        if (notReady || this.stopped) return this.scheduleReconnect();
        this.reconnects++;
        this.register('', this.hostname).then(
          () => this.open(),
          () => this.scheduleReconnect(),
        );
      });
    }, this.backoff.next());
  }

  /** The rules of applySync on a set of peer indexes; false on a sequence error. */
  private apply(msg: SyncView): boolean {
    this.fleet.messages++;
    this.messages++;
    if (msg.seq !== this.seq + 1n && !(msg.full && msg.seq === 1n)) {
      this.fleet.sequenceErrors++;
      return false;
    }
    this.seq = msg.seq;
    if (msg.full) {
      if (!this.fleet.fullNetmapBytes) this.fleet.fullNetmapBytes = msg.bytes;
      this.peers.clear();
      this.sameTag = 0;
      for (const p of msg.shared) if (p.id !== this.id) this.addPeer(p);
      for (const p of msg.full) this.addPeer(p);
      this.hasFull = true;
      this.fulls++;
      this.filters++;
      this.lastFullAt = nowMs();
      return true;
    }
    if (msg.keepalive) return true;
    if (!this.hasFull) {
      this.fleet.sequenceErrors++;
      return false;
    }
    for (const id of [...msg.parts.flatMap((p) => p.removed), ...msg.removed]) {
      const i = this.fleet.indexOf(id);
      if (i !== undefined && this.peers.delete(i) && this.tag && this.fleet.tagOf(i) === this.tag)
        this.sameTag--;
    }
    for (const part of msg.parts) {
      for (const p of part.changed) if (p.id !== this.id) this.addPeer(p);
      this.patches += part.patches;
    }
    for (const p of msg.changed) this.addPeer(p);
    this.patches += msg.patches;
    if (msg.packetFilter) this.filters++;
    return true;
  }

  private addPeer(p: PeerView): void {
    const i = this.fleet.peerIndex(p);
    if (this.peers.add(i) && this.tag && this.fleet.tagOf(i) === this.tag) this.sameTag++;
  }

  /** What a person debugging a stalled wait needs to know of the agent, on one line. */
  describe(): string {
    return (
      `${this.id} (${this.tag || 'no tag'}): ${this.peers.size} peers, ${this.sameTag} of its own tag, ` +
      `seq ${this.seq}, ${this.fulls} full netmaps, ${this.filters} packet filters, ` +
      `${this.messages} messages, stream ${this.stream ? 'open' : 'closed'}, ${this.reconnects} reconnects`
    );
  }

  /** Ends the stream for good. */
  stop(): void {
    this.stopped = true;
    if (this.retry) clearTimeout(this.retry);
    this.stream?.cancel();
    this.stream = null;
  }

  /**
   * Ends the stream and, when this agent has its connection to itself, closes
   * it: agents that only register (the sequential run, the propagation trials)
   * would otherwise keep thousands of idle TLS connections open on both sides.
   */
  close(): void {
    this.stop();
    if (this.fleet.agentsPerConnection === 1) this.channel.close();
  }
}

/** Runs `fn` over `items` with at most `concurrency` calls in flight. */
export async function pool<T>(
  items: readonly T[],
  concurrency: number,
  fn: (item: T, i: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
}
