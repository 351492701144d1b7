// A mesh node inside one process, without TUN or root: it registers like an
// agent, keeps the netmap, carries WireGuard over an unprivileged UDP socket
// (and the coordinator's relay), and runs TCP connections and pings on top.
import { randomBytes, randomInt } from 'node:crypto';
import { createSocket, type Socket } from 'node:dgram';
import { hostname as osHostname } from 'node:os';
import { Duplex } from 'node:stream';
import { ControlClient } from '../agent/control/client.js';
import { formatEndpoint, localAddresses } from '../agent/control/endpoints.js';
import { type Identity, StateDir } from '../agent/control/identity.js';
import { ControlSession } from '../agent/control/session.js';
import { RelayConnection } from '../agent/relay/connection.js';
import { explainUnavailable } from '../proto/dial.js';
import type { NetMap, Node } from '../proto/gen/meshgate/v1/types_pb.js';
import {
  decodeWgKey,
  encodeWgKey,
  generateMachineKey,
  generateNodeKey,
  nodePublicKey,
} from '../proto/keys.js';
import { VERSION } from '../release/version.js';
import { TcpConnection } from './tcpip/connection.js';
import { buildEcho, parseEcho } from './tcpip/icmp.js';
import { formatAddress, type IpPacket, Protocol, parseAddress, parseIp } from './tcpip/ip.js';
import { buildSegment, Flags, parseSegment } from './tcpip/segment.js';
import { DEFAULT_TIMERS, Device, type Output, type Peer as WgPeer } from './wireguard/device.js';
import { MessageType, messageType } from './wireguard/messages.js';

/** Mesh interfaces carry 1420-byte packets (WireGuard over a 1500-byte path). */
const MESH_MTU = 1420;
const DIAL_TIMEOUT_MS = 15_000;
/** A stream's writes wait while this much is queued in its connection. */
const SEND_HIGH_WATER = 1024 * 1024;
const RELAY = 'relay:';
const UDP_RECEIVE_BUFFER = 4 * 1024 * 1024;
const RELAY_BACKLOG = 64;
/** Peers add a node that has just joined when their netmap update is applied, some 100 ms later. */
const FIRST_RETRANSMIT_MS = 250;
/** How long one handshake attempt tries the direct paths alone before the relay too. */
const RELAY_AFTER_MS = 500;

export class MeshError extends Error {
  override name = 'MeshError';
  /**
   * Like a socket error's code where one fits: ENOTFOUND (no such node, or an
   * ambiguous prefix), ETIMEDOUT, ENETUNREACH, ECONNREFUSED, ECONNRESET.
   */
  code?: string;

  constructor(message: string, code?: string) {
    super(message);
    if (code) this.code = code;
  }
}

export interface JoinOptions {
  coordinator: string;
  fingerprint?: string;
  /**
   * The auth key, or a function that reads it: with a state dir that holds a
   * registered identity it is only called if the coordinator wants a key again.
   */
  authKey: string | (() => string);
  /** Name asked for at registration; the coordinator may add a suffix. */
  hostname?: string;
  /**
   * Keeps the node's identity (machine key, node key, node.json) in this
   * directory (0700, files 0600): the node is then not ephemeral, rejoins as
   * the same node and does not log out on close(). Without it the node has
   * fresh keys and logs out on close().
   */
  stateDir?: string;
  /** Called with one line per notable event. */
  log?: (line: string) => void;
}

export interface MeshPeer {
  id: string;
  name: string;
  ipAddresses: string[];
  online: boolean;
  tags: string[];
}

interface PeerEntry {
  info: MeshPeer;
  wg: WgPeer;
  addresses: Uint8Array[];
  candidates: string[];
  /** When the handshake attempt under way sent its first initiation. */
  initiatingSince: number | null;
}

/** Joins the mesh; resolves once the first netmap has arrived. */
export async function joinMesh(o: JoinOptions): Promise<Mesh> {
  const mesh = new Mesh(o);
  try {
    await mesh.start();
  } catch (e) {
    await mesh.close();
    throw e;
  }
  return mesh;
}

export class Mesh {
  private readonly state: StateDir | null;
  private readonly identity: Identity;
  private readonly device: Device;
  private readonly client: ControlClient;
  private readonly session: ControlSession;
  private readonly relay: RelayConnection;
  private readonly socket: Socket;
  private self: Node | null = null;
  private readonly own: Uint8Array[] = [];
  private relayEnabled = false;
  /** The mesh's DNS domain ("<project>.mesh"): "fw1.<domain>" names fw1. */
  private domain = '';
  private readonly entries = new Map<string, PeerEntry>();
  private readonly byKey = new Map<string, PeerEntry>();
  private readonly connections = new Map<string, TcpConnection>();
  /** Each connection's stream and the id of the peer it goes to. */
  private readonly streams = new Map<TcpConnection, { socket: MeshSocket; peerId: string }>();
  private readonly pings = new Map<number, () => void>();
  /** Datagrams for the relay sent before its stream was open. */
  private readonly relayBacklog: [string, Uint8Array][] = [];
  /** Connections with received segments whose answers and data wait for the end of the batch. */
  private readonly received = new Set<TcpConnection>();
  private timer: NodeJS.Timeout | null = null;
  private timerAt = Number.POSITIVE_INFINITY;
  private closed = false;

  constructor(private readonly o: JoinOptions) {
    this.state = o.stateDir ? new StateDir(o.stateDir) : null;
    this.identity = this.state?.load() ?? freshIdentity();
    this.device = new Device({
      privateKey: this.identity.nodeSecret,
      timers: { firstRetransmitMs: FIRST_RETRANSMIT_MS },
    });
    this.client = new ControlClient({
      url: o.coordinator,
      fingerprint: o.fingerprint,
      machineSecretKey: this.identity.machine.secretKey,
    });
    this.relay = new RelayConnection(this.client);
    this.relay.on('datagram', (peerId, payload) => {
      if (this.entries.has(peerId)) this.handle(this.device.receive(payload, RELAY + peerId, Date.now()));
    });
    this.relay.on('open', () => {
      for (const [peerId, data] of this.relayBacklog.splice(0)) this.relay.send(peerId, data);
    });
    this.socket = createSocket('udp4');
    this.socket.on('message', (msg, r) =>
      this.handle(this.device.receive(msg, `${r.address}:${r.port}`, Date.now())),
    );
    this.socket.on('error', (e) => this.log(`UDP socket: ${e.message}`));
    this.session = new ControlSession(
      this.client,
      {
        authKey: typeof o.authKey === 'function' ? o.authKey : () => o.authKey as string,
        nodePublic: this.identity.nodePublic,
        machinePublic: this.identity.machine.publicKey,
        hostname: o.hostname ?? osHostname(),
        os: process.platform,
        version: VERSION,
        requestedTags: [],
        advertisedRoutes: [],
        lockdownPorts: [],
        endpoints: () => this.localEndpoints(),
      },
      this.identity.node !== null,
    );
  }

  async start(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      this.socket.once('error', reject);
      this.socket.bind(0, () => {
        this.socket.off('error', reject);
        resolve();
      });
    });
    // A bulk sender fills the default buffer (about 200 KB) before this
    // process reads it; a drop costs a SACK recovery. Linux caps the size at
    // net.core.rmem_max on its own, other systems refuse too large a one.
    for (const size of [UDP_RECEIVE_BUFFER, UDP_RECEIVE_BUFFER / 4]) {
      try {
        this.socket.setRecvBufferSize(size);
        break;
      } catch {}
    }
    const first = new Promise<void>((resolve, reject) => {
      this.session.once('netmap', () => resolve());
      this.session.on('state', (s, detail) => {
        if (s !== 'offline' || this.self) return;
        explainUnavailable(
          this.o.coordinator,
          this.o.fingerprint ? { fingerprint: this.o.fingerprint } : {},
        ).then(
          (why) => reject(why ?? new MeshError(`cannot join the mesh: ${detail}`)),
          () => reject(new MeshError(`cannot join the mesh: ${detail}`)),
        );
      });
    });
    this.session.on('registered', (node) => {
      this.self = node;
      this.client.nodeId = node.id;
      this.state?.saveNode({
        id: node.id,
        name: node.name,
        project: node.project,
        ipAddresses: [...node.ipAddresses],
      });
    });
    this.session.on('netmap', (map) => this.onNetMap(map));
    await this.session.start();
    await first;
  }

  /** This node as the coordinator sees it. */
  get node(): Node | null {
    return this.self;
  }

  peers(): MeshPeer[] {
    return [...this.entries.values()].map((e) => e.info);
  }

  /**
   * The peer that `name` names: an exact node name, else a mesh address, else
   * a unique name prefix; a name may end in the mesh's DNS domain.
   */
  resolve(name: string): MeshPeer {
    const target =
      this.domain && name.toLowerCase().endsWith(`.${this.domain.toLowerCase()}`)
        ? name.slice(0, -this.domain.length - 1)
        : name;
    const all = this.peers();
    const exact = all.find((p) => p.name === target);
    if (exact) return exact;
    const address = parseAddress(target);
    const byAddress =
      address &&
      [...this.entries.values()].find((e) => e.addresses.some((a) => Buffer.from(a).equals(address)));
    if (byAddress) return byAddress.info;
    const prefixed = all.filter((p) => p.name.startsWith(target));
    if (prefixed.length === 1) return prefixed[0]!;
    if (prefixed.length > 1)
      throw new MeshError(
        `"${target}" matches ${prefixed.length} nodes: ${prefixed
          .map((p) => p.name)
          .sort()
          .join(', ')}`,
        'ENOTFOUND',
      );
    throw new MeshError(
      `no node "${target}" in this mesh (peers: ${
        all
          .map((p) => p.name)
          .sort()
          .join(', ') || 'none'
      })`,
      'ENOTFOUND',
    );
  }

  /** A TCP connection to `port` on `target` over the mesh. */
  async dial(target: string, port: number, timeoutMs = DIAL_TIMEOUT_MS): Promise<Duplex> {
    if (!Number.isInteger(port) || port < 1 || port > 65535)
      throw new MeshError(`${port} is not a TCP port (1-65535)`);
    if (this.closed) throw new MeshError('this node has left the mesh');
    const peer = this.entries.get(this.resolve(target).id)!;
    const [remote, local] = this.route(peer);
    let localPort: number;
    do localPort = randomInt(49152, 65536);
    while (this.connections.has(connKey(remote, port, localPort)));
    const socket = new MeshSocket(this);
    const conn = new TcpConnection(
      {
        localAddress: local,
        remoteAddress: remote,
        localPort,
        remotePort: port,
        iss: randomBytes(4).readUInt32BE(0),
        mss: MESH_MTU - (remote.length === 4 ? 40 : 60),
        unread: () => socket.readableLength,
      },
      Date.now(),
    );
    socket.attach(conn);
    this.connections.set(connKey(remote, port, localPort), conn);
    this.streams.set(conn, { socket, peerId: peer.info.id });
    this.flushTcp(conn);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(
          new MeshError(
            `${peer.info.name}:${port} did not answer over the mesh within ${timeoutMs / 1000} s`,
            'ETIMEDOUT',
          ),
        );
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        resolve(socket);
      });
      socket.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  /** Round trip of one ICMP echo to `target` in ms. */
  async ping(target: string, timeoutMs = 5_000, seq = 1): Promise<number> {
    if (this.closed) throw new MeshError('this node has left the mesh');
    const peer = this.entries.get(this.resolve(target).id)!;
    const [remote, local] = this.route(peer);
    let id: number;
    do id = randomInt(1, 65536);
    while (this.pings.has(id));
    const started = performance.now();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pings.delete(id);
        reject(new MeshError(`no answer from ${peer.info.name} within ${timeoutMs / 1000} s`, 'ETIMEDOUT'));
      }, timeoutMs);
      this.pings.set(id, () => {
        this.pings.delete(id);
        clearTimeout(timer);
        resolve(performance.now() - started);
      });
      this.handle(
        this.device.send(
          peer.wg,
          buildEcho(local, remote, { reply: false, id, seq, data: new Uint8Array(16) }),
          Date.now(),
        ),
      );
    });
  }

  /** Whether close() keeps the node registered (a node with a state dir). */
  get persistent(): boolean {
    return this.state !== null;
  }

  /**
   * Leaves the mesh: connections are reset; a node without a state dir logs
   * out, so the coordinator forgets it at once.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const conn of this.connections.values()) conn.abort();
    if (this.self && !this.state) await this.session.logout().catch(() => {});
    this.session.stop();
    this.relay.stop();
    if (this.timer) clearTimeout(this.timer);
    this.socket.close();
  }

  /** Sends what the connection has queued, then hands its events to its stream. */
  flushTcp(conn: TcpConnection): void {
    this.received.delete(conn);
    const stream = this.streams.get(conn);
    const entry = stream && this.entries.get(stream.peerId);
    const now = Date.now();
    const packets = conn.out.splice(0);
    if (entry)
      for (let i = 0; i < packets.length; i++) {
        // A pure ACK that a later one in the same batch supersedes is not sent (a stretch ACK).
        if (i + 1 < packets.length && supersededAck(packets[i]!, packets[i + 1]!)) continue;
        this.handle(this.device.send(entry.wg, packets[i]!, now));
      }
    // Consecutive data goes to the stream as one chunk: one write downstream instead of one per segment.
    const events = conn.events.splice(0);
    for (let i = 0; i < events.length; i++) {
      const e = events[i]!;
      if (e.kind !== 'data' || events[i + 1]?.kind !== 'data') {
        stream?.socket.event(e);
        continue;
      }
      const chunks: Uint8Array[] = [];
      while (events[i]?.kind === 'data') chunks.push((events[i++] as { data: Uint8Array }).data);
      i--;
      stream?.socket.event({ kind: 'data', data: Buffer.concat(chunks) });
    }
    stream?.socket.progress();
    if (conn.state === 'CLOSED') {
      for (const [k, c] of this.connections) if (c === conn) this.connections.delete(k);
      this.streams.delete(conn);
    }
    this.schedule();
  }

  private route(peer: PeerEntry): [Uint8Array, Uint8Array] {
    for (const remote of peer.addresses) {
      const local = this.own.find((a) => a.length === remote.length);
      if (local) return [remote, local];
    }
    throw new MeshError(`${peer.info.name} has no mesh address this node can reach`, 'ENETUNREACH');
  }

  private onNetMap(map: NetMap): void {
    this.relayEnabled = map.relay?.enabled === true;
    this.domain = map.domain.replace(/\.$/, '');
    if (this.relayEnabled) this.relay.start();
    if (map.self) {
      this.self = map.self;
      this.own.length = 0;
      for (const a of map.self.ipAddresses) {
        const b = parseAddress(a);
        if (b) this.own.push(b);
      }
    }
    const seen = new Set<string>();
    for (const p of map.peers) {
      seen.add(p.id);
      let entry = this.entries.get(p.id);
      if (entry && encodeWgKey(entry.wg.publicKey) !== p.nodeKey) {
        this.device.removePeer(entry.wg.key);
        this.byKey.delete(entry.wg.key);
        entry = undefined;
      }
      const candidates = [
        ...p.endpoints.map(unbracket),
        ...(this.relayEnabled && p.relay ? [RELAY + p.id] : []),
      ];
      const info = {
        id: p.id,
        name: p.name,
        ipAddresses: [...p.ipAddresses],
        online: p.online,
        tags: [...p.tags],
      };
      const addresses = p.ipAddresses.map(parseAddress).filter((a): a is Uint8Array => a !== null);
      if (!entry) {
        const wg = this.device.addPeer({
          publicKey: decodeWgKey(p.nodeKey),
          persistentKeepaliveSeconds: map.keepaliveSeconds || 25,
        });
        entry = { info, wg, addresses, candidates, initiatingSince: null };
        this.entries.set(p.id, entry);
        this.byKey.set(wg.key, entry);
      } else Object.assign(entry, { info, addresses, candidates });
      entry.wg.endpoint ??= candidates[0] ?? null;
      if (entry.wg.endpoint && !candidates.includes(entry.wg.endpoint))
        entry.wg.endpoint = candidates[0] ?? null;
    }
    for (const [id, e] of this.entries) {
      if (seen.has(id)) continue;
      this.device.removePeer(e.wg.key);
      this.byKey.delete(e.wg.key);
      this.entries.delete(id);
    }
  }

  private handle(outputs: Output[]): void {
    for (const o of outputs) {
      if (o.kind === 'transmit') this.transmit(o.to, o.data);
      else if (o.kind === 'deliver') this.deliver(o.peer, o.packet);
    }
    this.schedule();
  }

  /**
   * Handshake initiations go to every direct candidate at once, and after
   * RELAY_AFTER_MS of one attempt also to the relay; the path that answers
   * first wins (WireGuard roams to it). The relay waits because a peer that
   * has not yet added this node drops the first direct copy, and a relayed
   * copy arriving after it has would otherwise pin the session to the relay.
   */
  private transmit(to: string, data: Uint8Array): void {
    if (messageType(data) !== MessageType.Initiation) {
      this.sendTo(to, data);
      return;
    }
    const entry = [...this.entries.values()].find((e) => e.wg.endpoint === to || e.candidates.includes(to));
    if (!entry) {
      this.sendTo(to, data);
      return;
    }
    const now = Date.now();
    // A new attempt after a confirmed session (or a stale one) tries direct first again.
    const confirmed = entry.wg.current?.createdMs ?? -1;
    if (
      entry.initiatingSince === null ||
      confirmed >= entry.initiatingSince ||
      now - entry.initiatingSince > DEFAULT_TIMERS.rekeyAttemptMs
    )
      entry.initiatingSince = now;
    const direct = entry.candidates.filter((c) => !c.startsWith(RELAY));
    const relayToo = direct.length === 0 || now - entry.initiatingSince >= RELAY_AFTER_MS;
    for (const c of relayToo ? entry.candidates : direct) this.sendTo(c, data);
  }

  private sendTo(to: string, data: Uint8Array): void {
    if (to.startsWith(RELAY)) {
      // Right after joining the relay stream may still be opening: the first
      // handshake waits for it instead of waiting REKEY_TIMEOUT to be sent again.
      if (this.relay.connected) this.relay.send(to.slice(RELAY.length), data);
      else if (this.relayBacklog.length < RELAY_BACKLOG)
        this.relayBacklog.push([to.slice(RELAY.length), data]);
      return;
    }
    const i = to.lastIndexOf(':');
    const host = to.slice(0, i);
    if (host.includes(':')) return;
    this.socket.send(data, Number(to.slice(i + 1)), host);
  }

  private deliver(wg: WgPeer, packet: Uint8Array): void {
    const entry = this.byKey.get(wg.key);
    const ip = parseIp(packet);
    // Cryptokey routing: a peer may only send from its own mesh addresses.
    if (!entry || !ip || !entry.addresses.some((a) => Buffer.from(a).equals(ip.source))) return;
    if (ip.protocol === Protocol.TCP) this.deliverTcp(entry, ip);
    else {
      const echo = parseEcho(ip);
      if (echo?.reply) this.pings.get(echo.id)?.();
    }
  }

  private deliverTcp(entry: PeerEntry, ip: IpPacket): void {
    const seg = parseSegment(ip.source, ip.destination, ip.payload);
    if (!seg) return;
    const conn = this.connections.get(connKey(ip.source, seg.sourcePort, seg.destinationPort));
    if (conn) {
      conn.receive(seg, Date.now());
      // Answered once the datagrams that arrived together are all in (the poll
      // phase reads up to 32 at a time): fewer ACKs, and fewer, larger chunks.
      if (this.received.size === 0) setImmediate(() => this.flushReceived());
      this.received.add(conn);
      return;
    }
    if (seg.flags & Flags.RST) return;
    // Nothing listens here: refuse, as a host would.
    const len = seg.payload.length + (seg.flags & Flags.SYN ? 1 : 0) + (seg.flags & Flags.FIN ? 1 : 0);
    const rst =
      seg.flags & Flags.ACK
        ? { flags: Flags.RST, seq: seg.ack, ack: 0 }
        : { flags: Flags.RST | Flags.ACK, seq: 0, ack: (seg.seq + len) >>> 0 };
    const reply = buildSegment(ip.destination, ip.source, {
      sourcePort: seg.destinationPort,
      destinationPort: seg.sourcePort,
      window: 0,
      payload: new Uint8Array(0),
      ...rst,
    });
    this.handle(this.device.send(entry.wg, reply, Date.now()));
  }

  private flushReceived(): void {
    if (this.closed) return;
    for (const conn of [...this.received]) this.flushTcp(conn);
  }

  private schedule(): void {
    if (this.closed) return;
    let at = this.device.nextDeadline();
    for (const c of this.connections.values()) at = Math.min(at, c.nextDeadline());
    if (at >= this.timerAt && this.timer) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.timerAt = at;
    if (!Number.isFinite(at)) return;
    this.timer = setTimeout(() => this.tick(), Math.max(0, at - Date.now()));
  }

  private tick(): void {
    this.timer = null;
    this.timerAt = Number.POSITIVE_INFINITY;
    const now = Date.now();
    this.handle(this.device.tick(now));
    for (const c of [...this.connections.values()]) {
      if (c.nextDeadline() <= now) {
        c.tick(now);
        this.flushTcp(c);
      }
    }
    this.schedule();
  }

  private localEndpoints(): string[] {
    const port = this.socket.address().port;
    return localAddresses('')
      .filter((a) => a.family === 4)
      .map((a) => formatEndpoint(a.address, port));
  }

  private log(line: string): void {
    this.o.log?.(line);
  }
}

/** A TCP connection over the mesh as a Node stream. */
export class MeshSocket extends Duplex {
  private conn!: TcpConnection;
  private pendingWrite: (() => void) | null = null;

  constructor(private readonly mesh: Mesh) {
    super({ allowHalfOpen: true });
  }

  attach(conn: TcpConnection): void {
    this.conn = conn;
  }

  event(e: TcpConnection['events'][number]): void {
    switch (e.kind) {
      case 'connected':
        this.emit('connect');
        break;
      case 'data':
        this.push(e.data);
        break;
      case 'end':
        this.push(null);
        break;
      case 'error':
        this.destroy(new MeshError(e.message, e.code));
        break;
      case 'closed':
        if (!this.destroyed && this.readableEnded) this.destroy();
        break;
    }
  }

  /** Lets a held-back write go on once the connection has room again. */
  progress(): void {
    if (this.pendingWrite && this.conn.buffered < SEND_HIGH_WATER) {
      const cb = this.pendingWrite;
      this.pendingWrite = null;
      cb();
    }
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    if (!this.conn.write(new Uint8Array(chunk), Date.now())) {
      cb(new MeshError('the connection is closed'));
      return;
    }
    this.mesh.flushTcp(this.conn);
    if (this.conn.buffered < SEND_HIGH_WATER) cb();
    else this.pendingWrite = () => cb();
  }

  override _read(): void {
    if (!this.conn) return;
    this.conn.windowOpened();
    this.mesh.flushTcp(this.conn);
  }

  override _final(cb: (e?: Error | null) => void): void {
    this.conn.end(Date.now());
    this.mesh.flushTcp(this.conn);
    cb();
  }

  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    if (this.conn && this.conn.state !== 'CLOSED') {
      this.conn.abort();
      this.mesh.flushTcp(this.conn);
    }
    cb(err);
  }
}

/**
 * Whether `a`, a pure ACK (no data, no other flag), is made redundant by `b`,
 * the next pure ACK of the same connection: `b` acknowledges more, or carries
 * SACK blocks, which describe everything held at least as well as `a`'s did.
 * Equal ACKs without SACK blocks are duplicates that a sender counts, so both
 * go out.
 */
export function supersededAck(a: Uint8Array, b: Uint8Array): boolean {
  const pureAck = (p: Uint8Array): { ack: number; options: boolean } | null => {
    const off = p[0]! >> 4 === 4 ? (p[0]! & 0x0f) * 4 : 40;
    const header = (p[off + 12]! >> 4) * 4;
    if (p.length !== off + header || p[off + 13] !== Flags.ACK) return null;
    const ack = ((p[off + 8]! << 24) | (p[off + 9]! << 16) | (p[off + 10]! << 8) | p[off + 11]!) >>> 0;
    return { ack, options: header > 20 };
  };
  const x = pureAck(a);
  const y = x && pureAck(b);
  return x !== null && y !== null && (x.ack !== y.ack || y.options);
}

function freshIdentity(): Identity {
  const machine = generateMachineKey();
  const nodeSecret = generateNodeKey().secretKey;
  return { machine, nodeSecret, nodePublic: nodePublicKey(nodeSecret), node: null };
}

function connKey(remote: Uint8Array, remotePort: number, localPort: number): string {
  return `${formatAddress(remote)}|${remotePort}|${localPort}`;
}

/** "[v6]:port" as "v6:port"; the socket layer splits at the last colon. */
function unbracket(endpoint: string): string {
  return endpoint.replace(/^\[(.*)\]:(\d+)$/, '$1:$2');
}
