// A WireGuard device without sockets or clocks: datagrams and IP packets go
// in with the time, datagrams to transmit and packets to deliver come out.
// It keeps the peers' keypairs, handshakes and cookies and runs the timers of
// the whitepaper's section 6; the caller asks nextDeadline() when to tick().
import { randomBytes } from 'node:crypto';
import {
  CookieChecker,
  type MacKeys,
  mac1Valid,
  macKeys,
  openCookieReply,
  receiverOf,
  stampMacs,
} from './cookie.js';
import { generateKeyPair, type KeyPair, open, publicKeyOf, seal } from './crypto.js';
import {
  DATA_HEADER_LEN,
  Data,
  Initiation,
  MessageType,
  messageType,
  Response,
  readCounter,
  readIndex,
  view,
  writeCounter,
  writeHeader,
} from './messages.js';
import {
  type ConsumedInitiation,
  consumeInitiation,
  consumeResponse,
  createInitiation,
  createResponse,
  type InitiatorState,
  ZERO_PSK,
} from './noise.js';
import { ReplayWindow } from './replay.js';

/** The protocol's time and message limits; tests shorten them. */
export interface Timers {
  rekeyAfterMs: number;
  rejectAfterMs: number;
  rekeyAttemptMs: number;
  rekeyTimeoutMs: number;
  keepaliveTimeoutMs: number;
  rekeyAfterMessages: number;
  rejectAfterMessages: number;
  /**
   * While there is no confirmed session with a peer (an initiation it
   * answered does not count), retransmit after this,
   * doubling up to REKEY_TIMEOUT; 0 keeps REKEY_TIMEOUT throughout. A node
   * that has just joined is often not yet in its peers' configuration, which
   * drops its first initiation.
   */
  firstRetransmitMs: number;
}

export const DEFAULT_TIMERS: Timers = {
  rekeyAfterMs: 120_000,
  rejectAfterMs: 180_000,
  rekeyAttemptMs: 90_000,
  rekeyTimeoutMs: 5_000,
  keepaliveTimeoutMs: 10_000,
  rekeyAfterMessages: 2 ** 60,
  rejectAfterMessages: 2 ** 64 - 2 ** 13 - 1,
  firstRetransmitMs: 0,
};

/** Initiations from one peer closer together than this are dropped (flood protection). */
const INITIATION_MIN_INTERVAL_MS = 20;
/** Packets waiting for a handshake, per peer; the oldest go first. */
const MAX_QUEUED = 128;
const EMPTY = new Uint8Array(0);

/** Where a datagram came from or goes to; the caller's own notation (e.g. "ip:port"). */
export type Endpoint = string;

export type Output =
  | { kind: 'transmit'; to: Endpoint; data: Uint8Array }
  | { kind: 'deliver'; peer: Peer; packet: Uint8Array }
  | { kind: 'established'; peer: Peer };

interface Keypair {
  send: Uint8Array;
  receive: Uint8Array;
  localIndex: number;
  remoteIndex: number;
  createdMs: number;
  initiator: boolean;
  sendCounter: number;
  replay: ReplayWindow;
}

export interface PeerOptions {
  publicKey: Uint8Array;
  presharedKey?: Uint8Array;
  endpoint?: Endpoint;
  persistentKeepaliveSeconds?: number;
}

export class Peer {
  readonly publicKey: Uint8Array;
  readonly presharedKey: Uint8Array;
  readonly macKeys: MacKeys;
  endpoint: Endpoint | null;
  persistentKeepaliveMs: number;
  current: Keypair | null = null;
  previous: Keypair | null = null;
  next: Keypair | null = null;
  handshake: InitiatorState | null = null;
  /** When the first initiation of the attempt under way was sent, and how many followed it. */
  handshakeStartedMs = 0;
  handshakeRetries = 0;
  lastInitiationMs = Number.NEGATIVE_INFINITY;
  lastHandshakeMs: number | null = null;
  /** MAC1 of the last handshake message sent: a cookie reply is bound to it. */
  sentMac1: Uint8Array | null = null;
  cookie: { value: Uint8Array; receivedMs: number } | null = null;
  lastTimestamp: Uint8Array | null = null;
  lastInitiationConsumedMs = Number.NEGATIVE_INFINITY;
  /** Whether a rekey was already asked for by an ageing receive keypair. */
  rekeyAskedOnReceive = false;
  readonly queue: Uint8Array[] = [];
  rxBytes = 0;
  txBytes = 0;
  /** Deadlines (ms), or null when the timer is off. */
  retransmitAt: number | null = null;
  keepaliveAt: number | null = null;
  newHandshakeAt: number | null = null;
  zeroAt: number | null = null;
  persistentAt: number | null = null;

  constructor(o: PeerOptions) {
    this.publicKey = new Uint8Array(o.publicKey);
    this.presharedKey = o.presharedKey ? new Uint8Array(o.presharedKey) : ZERO_PSK;
    this.macKeys = macKeys(this.publicKey);
    this.endpoint = o.endpoint ?? null;
    this.persistentKeepaliveMs = (o.persistentKeepaliveSeconds ?? 0) * 1000;
  }

  get key(): string {
    return Buffer.from(this.publicKey).toString('base64');
  }
}

export interface DeviceOptions {
  privateKey: Uint8Array;
  timers?: Partial<Timers>;
  random?: (n: number) => Uint8Array;
  /** Whether handshakes must prove their source with MAC2 first; by default, above 64 a second. */
  underLoad?: (nowMs: number) => boolean;
}

type IndexEntry = { peer: Peer; keypair: Keypair | null };

export class Device {
  readonly timers: Timers;
  private readonly local: KeyPair;
  private readonly ownMacKeys: MacKeys;
  private readonly random: (n: number) => Uint8Array;
  private readonly cookies: CookieChecker;
  private readonly underLoad: (nowMs: number) => boolean;
  private readonly peers = new Map<string, Peer>();
  private readonly indices = new Map<number, IndexEntry>();
  private handshakesThisSecond = 0;
  private secondStartedMs = Number.NEGATIVE_INFINITY;

  constructor(o: DeviceOptions) {
    this.timers = { ...DEFAULT_TIMERS, ...o.timers };
    this.local = { privateKey: new Uint8Array(o.privateKey), publicKey: publicKeyOf(o.privateKey) };
    this.ownMacKeys = macKeys(this.local.publicKey);
    this.random = o.random ?? ((n) => new Uint8Array(randomBytes(n)));
    this.cookies = new CookieChecker(this.ownMacKeys, this.random);
    this.underLoad = o.underLoad ?? (() => this.handshakesThisSecond > 64);
  }

  get publicKey(): Uint8Array {
    return this.local.publicKey;
  }

  addPeer(o: PeerOptions): Peer {
    const peer = new Peer(o);
    this.removePeer(peer.key);
    this.peers.set(peer.key, peer);
    return peer;
  }

  peer(publicKey: Uint8Array | string): Peer | undefined {
    return this.peers.get(
      typeof publicKey === 'string' ? publicKey : Buffer.from(publicKey).toString('base64'),
    );
  }

  listPeers(): Peer[] {
    return [...this.peers.values()];
  }

  removePeer(key: string): void {
    const peer = this.peers.get(key);
    if (!peer) return;
    this.wipe(peer);
    this.peers.delete(key);
  }

  /** Encrypts `packet` for `peer`, or queues it and starts a handshake. */
  send(peer: Peer, packet: Uint8Array, nowMs: number): Output[] {
    const out: Output[] = [];
    const kp = peer.current;
    if (!kp || !this.usable(kp, nowMs) || !peer.endpoint) {
      if (peer.queue.length >= MAX_QUEUED) peer.queue.shift();
      peer.queue.push(packet);
      this.initiate(peer, nowMs, false, out);
      return out;
    }
    this.encrypt(peer, kp, packet, nowMs, out);
    if (
      kp.initiator &&
      (nowMs - kp.createdMs >= this.timers.rekeyAfterMs || kp.sendCounter >= this.timers.rekeyAfterMessages)
    )
      this.initiate(peer, nowMs, false, out);
    return out;
  }

  /** Starts a handshake now unless one was sent within REKEY_TIMEOUT. */
  connect(peer: Peer, nowMs: number): Output[] {
    const out: Output[] = [];
    this.initiate(peer, nowMs, false, out);
    return out;
  }

  receive(data: Uint8Array, from: Endpoint, nowMs: number): Output[] {
    const out: Output[] = [];
    switch (messageType(data)) {
      case MessageType.Initiation:
        this.receiveInitiation(data, from, nowMs, out);
        break;
      case MessageType.Response:
        this.receiveResponse(data, from, nowMs, out);
        break;
      case MessageType.CookieReply:
        this.receiveCookieReply(data, nowMs);
        break;
      case MessageType.Data:
        this.receiveData(data, from, nowMs, out);
        break;
    }
    return out;
  }

  /** Runs every timer that is due. */
  tick(nowMs: number): Output[] {
    const out: Output[] = [];
    for (const peer of this.peers.values()) {
      if (peer.retransmitAt !== null && peer.retransmitAt <= nowMs) {
        peer.retransmitAt = null;
        if (nowMs - peer.handshakeStartedMs >= this.timers.rekeyAttemptMs) {
          // Give up this attempt; the next packet to send starts a new one.
          this.freeHandshake(peer);
          peer.queue.length = 0;
          peer.keepaliveAt = null;
          peer.zeroAt ??= nowMs + 3 * this.timers.rejectAfterMs;
        } else {
          peer.handshakeRetries++;
          this.initiate(peer, nowMs, true, out);
        }
      }
      if (peer.keepaliveAt !== null && peer.keepaliveAt <= nowMs) {
        peer.keepaliveAt = null;
        this.keepalive(peer, nowMs, out);
      }
      if (peer.newHandshakeAt !== null && peer.newHandshakeAt <= nowMs) {
        peer.newHandshakeAt = null;
        this.initiate(peer, nowMs, false, out);
      }
      if (peer.zeroAt !== null && peer.zeroAt <= nowMs) this.wipe(peer);
      if (peer.persistentAt !== null && peer.persistentAt <= nowMs) {
        peer.persistentAt = null;
        this.keepalive(peer, nowMs, out);
      }
    }
    return out;
  }

  /** The earliest time tick() has work, or Infinity. */
  nextDeadline(): number {
    let at = Number.POSITIVE_INFINITY;
    for (const p of this.peers.values())
      for (const t of [p.retransmitAt, p.keepaliveAt, p.newHandshakeAt, p.zeroAt, p.persistentAt])
        if (t !== null && t < at) at = t;
    return at;
  }

  private usable(kp: Keypair, nowMs: number): boolean {
    return (
      nowMs - kp.createdMs < this.timers.rejectAfterMs && kp.sendCounter < this.timers.rejectAfterMessages
    );
  }

  private newIndex(entry: IndexEntry): number {
    for (;;) {
      const i = view(this.random(4)).getUint32(0, true);
      if (!this.indices.has(i)) {
        this.indices.set(i, entry);
        return i;
      }
    }
  }

  private initiate(peer: Peer, nowMs: number, retry: boolean, out: Output[]): void {
    if (!retry && peer.handshake && nowMs - peer.lastInitiationMs < this.timers.rekeyTimeoutMs) return;
    if (!retry) {
      peer.handshakeStartedMs = nowMs;
      peer.handshakeRetries = 0;
    }
    this.freeHandshake(peer);
    const localIndex = this.newIndex({ peer, keypair: null });
    const made = createInitiation(this.local, peer.publicKey, localIndex, generateKeyPair(), nowMs);
    if (!made) {
      this.indices.delete(localIndex);
      return;
    }
    peer.handshake = made.state;
    peer.lastInitiationMs = nowMs;
    // Jitter keeps two peers that started together from retrying in lockstep.
    const first = this.timers.firstRetransmitMs;
    const wait =
      peer.current === null && first > 0
        ? Math.min(first * 2 ** peer.handshakeRetries, this.timers.rekeyTimeoutMs)
        : this.timers.rekeyTimeoutMs;
    peer.retransmitAt = nowMs + wait + (view(this.random(2)).getUint16(0) % 334);
    this.transmitHandshake(peer, made.message, Initiation.mac1, nowMs, out);
  }

  private transmitHandshake(
    peer: Peer,
    msg: Uint8Array,
    macOffset: number,
    nowMs: number,
    out: Output[],
  ): void {
    const cookie = peer.cookie && nowMs - peer.cookie.receivedMs < 120_000 ? peer.cookie.value : null;
    stampMacs(msg, macOffset, peer.macKeys, cookie);
    peer.sentMac1 = msg.slice(macOffset, macOffset + 16);
    if (!peer.endpoint) return;
    this.sentAuthenticated(peer, nowMs);
    peer.txBytes += msg.length;
    out.push({ kind: 'transmit', to: peer.endpoint, data: msg });
  }

  /** Checks MAC1 and, under load, MAC2 (answering with a cookie reply); false drops the message. */
  private admit(msg: Uint8Array, macOffset: number, from: Endpoint, nowMs: number, out: Output[]): boolean {
    if (!mac1Valid(msg, macOffset, this.ownMacKeys)) return false;
    if (nowMs - this.secondStartedMs >= 1000) {
      this.secondStartedMs = nowMs;
      this.handshakesThisSecond = 0;
    }
    this.handshakesThisSecond++;
    if (!this.underLoad(nowMs) || this.cookies.mac2Valid(msg, macOffset, from, nowMs)) return true;
    out.push({ kind: 'transmit', to: from, data: this.cookies.reply(msg, macOffset, from, nowMs) });
    return false;
  }

  private receiveInitiation(msg: Uint8Array, from: Endpoint, nowMs: number, out: Output[]): void {
    if (!this.admit(msg, Initiation.mac1, from, nowMs, out)) return;
    const consumed = consumeInitiation(this.local, msg);
    if (!consumed) return;
    const peer = this.peer(consumed.remoteStatic);
    if (!peer || !this.freshInitiation(peer, consumed, nowMs)) return;
    const localIndex = this.newIndex({ peer, keypair: null });
    const made = createResponse(consumed, localIndex, generateKeyPair(), peer.presharedKey);
    if (!made) {
      this.indices.delete(localIndex);
      return;
    }
    const kp: Keypair = {
      ...made.keys,
      localIndex,
      remoteIndex: consumed.remoteIndex,
      createdMs: nowMs,
      initiator: false,
      sendCounter: 0,
      replay: new ReplayWindow(),
    };
    this.indices.set(localIndex, { peer, keypair: kp });
    // The responder's keypair waits in `next` until the initiator uses it.
    if (peer.next) this.indices.delete(peer.next.localIndex);
    peer.next = kp;
    peer.endpoint = from;
    this.receivedAuthenticated(peer, nowMs);
    this.derived(peer, nowMs);
    this.transmitHandshake(peer, made.message, Response.mac1, nowMs, out);
  }

  /** A newer timestamp than the last initiation's, and not a flood. */
  private freshInitiation(peer: Peer, c: ConsumedInitiation, nowMs: number): boolean {
    if (peer.lastTimestamp && Buffer.compare(c.timestamp, peer.lastTimestamp) <= 0) return false;
    if (nowMs - peer.lastInitiationConsumedMs < INITIATION_MIN_INTERVAL_MS) return false;
    peer.lastTimestamp = c.timestamp;
    peer.lastInitiationConsumedMs = nowMs;
    return true;
  }

  private receiveResponse(msg: Uint8Array, from: Endpoint, nowMs: number, out: Output[]): void {
    if (!this.admit(msg, Response.mac1, from, nowMs, out)) return;
    const index = readIndex(msg, Response.receiver);
    const entry = this.indices.get(index);
    if (!entry) return;
    const peer = entry.peer;
    if (!peer.handshake || entry.keypair || peer.handshake.localIndex !== index) return;
    const done = consumeResponse(this.local, peer.handshake, msg, peer.presharedKey);
    if (!done) return;
    const kp: Keypair = {
      ...done.keys,
      localIndex: index,
      remoteIndex: done.remoteIndex,
      createdMs: nowMs,
      initiator: true,
      sendCounter: 0,
      replay: new ReplayWindow(),
    };
    entry.keypair = kp;
    peer.handshake = null;
    peer.retransmitAt = null;
    if (peer.next) {
      this.retire(peer.previous);
      this.retire(peer.current);
      peer.previous = peer.next;
      peer.next = null;
    } else {
      this.retire(peer.previous);
      peer.previous = peer.current;
    }
    peer.current = kp;
    peer.endpoint = from;
    this.receivedAuthenticated(peer, nowMs);
    this.derived(peer, nowMs);
    out.push({ kind: 'established', peer });
    // Data (or a keepalive) on the new keypair is what tells the responder to use it.
    if (peer.queue.length === 0) this.encrypt(peer, kp, EMPTY, nowMs, out);
    else for (const p of peer.queue.splice(0)) this.encrypt(peer, kp, p, nowMs, out);
  }

  private receiveCookieReply(msg: Uint8Array, nowMs: number): void {
    const peer = this.indices.get(receiverOf(msg))?.peer;
    if (!peer?.sentMac1) return;
    const cookie = openCookieReply(msg, peer.macKeys, peer.sentMac1);
    if (cookie) peer.cookie = { value: cookie, receivedMs: nowMs };
  }

  private receiveData(msg: Uint8Array, from: Endpoint, nowMs: number, out: Output[]): void {
    const entry = this.indices.get(readIndex(msg, Data.receiver));
    const kp = entry?.keypair;
    if (!entry || !kp || nowMs - kp.createdMs >= this.timers.rejectAfterMs) return;
    const peer = entry.peer;
    const counter = readCounter(msg);
    if (counter >= this.timers.rejectAfterMessages) return;
    const plain = open(kp.receive, BigInt(counter), msg.subarray(DATA_HEADER_LEN), EMPTY);
    if (!plain || !kp.replay.accept(counter)) return;
    if (kp === peer.next) {
      this.retire(peer.previous);
      peer.previous = peer.current;
      peer.current = kp;
      peer.next = null;
      out.push({ kind: 'established', peer });
      for (const p of peer.queue.splice(0)) this.encrypt(peer, kp, p, nowMs, out);
    }
    peer.endpoint = from;
    peer.rxBytes += msg.length;
    this.receivedAuthenticated(peer, nowMs);
    if (
      kp === peer.current &&
      kp.initiator &&
      !peer.rekeyAskedOnReceive &&
      nowMs - kp.createdMs >=
        this.timers.rejectAfterMs - this.timers.keepaliveTimeoutMs - this.timers.rekeyTimeoutMs
    ) {
      peer.rekeyAskedOnReceive = true;
      this.initiate(peer, nowMs, false, out);
    }
    if (plain.length === 0) return;
    // Answer data with a keepalive if we have nothing to say within KEEPALIVE_TIMEOUT.
    peer.keepaliveAt ??= nowMs + this.timers.keepaliveTimeoutMs;
    out.push({ kind: 'deliver', peer, packet: trimPadding(plain) });
  }

  private encrypt(peer: Peer, kp: Keypair, packet: Uint8Array, nowMs: number, out: Output[]): void {
    const padded = new Uint8Array(Math.ceil(packet.length / 16) * 16);
    padded.set(packet);
    const msg = new Uint8Array(DATA_HEADER_LEN + padded.length + 16);
    writeHeader(msg, MessageType.Data);
    view(msg).setUint32(Data.receiver, kp.remoteIndex, true);
    writeCounter(msg, kp.sendCounter);
    msg.set(seal(kp.send, BigInt(kp.sendCounter), padded, EMPTY), DATA_HEADER_LEN);
    kp.sendCounter++;
    if (packet.length > 0)
      peer.newHandshakeAt ??= nowMs + this.timers.keepaliveTimeoutMs + this.timers.rekeyTimeoutMs;
    this.sentAuthenticated(peer, nowMs);
    peer.txBytes += msg.length;
    if (peer.endpoint) out.push({ kind: 'transmit', to: peer.endpoint, data: msg });
  }

  private keepalive(peer: Peer, nowMs: number, out: Output[]): void {
    const kp = peer.current;
    if (kp && this.usable(kp, nowMs)) this.encrypt(peer, kp, EMPTY, nowMs, out);
    else this.initiate(peer, nowMs, false, out);
  }

  private sentAuthenticated(peer: Peer, nowMs: number): void {
    peer.keepaliveAt = null;
    if (peer.persistentKeepaliveMs > 0) peer.persistentAt = nowMs + peer.persistentKeepaliveMs;
  }

  private receivedAuthenticated(peer: Peer, nowMs: number): void {
    peer.newHandshakeAt = null;
    if (peer.persistentKeepaliveMs > 0) peer.persistentAt = nowMs + peer.persistentKeepaliveMs;
  }

  private derived(peer: Peer, nowMs: number): void {
    peer.lastHandshakeMs = nowMs;
    peer.rekeyAskedOnReceive = false;
    peer.zeroAt = nowMs + 3 * this.timers.rejectAfterMs;
  }

  private retire(kp: Keypair | null): void {
    if (kp) this.indices.delete(kp.localIndex);
  }

  private freeHandshake(peer: Peer): void {
    if (peer.handshake) this.indices.delete(peer.handshake.localIndex);
    peer.handshake = null;
    peer.retransmitAt = null;
  }

  /** Forgets every key of `peer` (after 3 x REJECT_AFTER_TIME without a handshake, or on removal). */
  private wipe(peer: Peer): void {
    this.freeHandshake(peer);
    for (const kp of [peer.previous, peer.current, peer.next]) this.retire(kp);
    peer.previous = peer.current = peer.next = null;
    peer.queue.length = 0;
    peer.keepaliveAt = peer.newHandshakeAt = peer.zeroAt = null;
  }
}

/** The IP packet without the zero padding WireGuard adds up to a multiple of 16 bytes. */
function trimPadding(p: Uint8Array): Uint8Array {
  const version = p[0]! >> 4;
  let len = p.length;
  if (version === 4 && p.length >= 20) len = (p[2]! << 8) | p[3]!;
  else if (version === 6 && p.length >= 40) len = 40 + ((p[4]! << 8) | p[5]!);
  return len <= p.length ? p.subarray(0, len) : p;
}
