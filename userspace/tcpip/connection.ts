// One TCP connection from the client side (RFC 9293): active open with MSS
// and window scaling, in-order delivery with out-of-order segments held back,
// retransmission on a timer per RFC 6298, fast retransmit and recovery on
// three duplicate ACKs (RFC 5681), zero-window probes, keepalives and the
// closing states. Pure: segments and time in, IP packets and events out.
import { buildSegment, Flags, type Segment, seq } from './segment.js';

export type TcpState =
  | 'SYN-SENT'
  | 'ESTABLISHED'
  | 'FIN-WAIT-1'
  | 'FIN-WAIT-2'
  | 'CLOSING'
  | 'TIME-WAIT'
  | 'CLOSE-WAIT'
  | 'LAST-ACK'
  | 'CLOSED';

export interface TcpOptions {
  localAddress: Uint8Array;
  remoteAddress: Uint8Array;
  localPort: number;
  remotePort: number;
  /** Initial send sequence number (random in production, fixed in tests). */
  iss: number;
  /** Largest payload we accept per segment. */
  mss: number;
  /** Receive buffer in bytes; the advertised window never exceeds it. */
  receiveBuffer?: number;
  /** Bytes received but not yet taken by the application, for the window. */
  unread?: () => number;
  minRtoMs?: number;
  keepaliveIdleMs?: number;
  keepaliveIntervalMs?: number;
  keepaliveProbes?: number;
}

export type TcpEvent =
  | { kind: 'connected' }
  | { kind: 'data'; data: Uint8Array }
  | { kind: 'end' }
  | { kind: 'closed' }
  | { kind: 'error'; code: 'ECONNREFUSED' | 'ECONNRESET' | 'ETIMEDOUT'; message: string };

const INITIAL_RTO_MS = 1_000;
const MAX_RTO_MS = 60_000;
/** RFC 6298 rounds up to 1 s; like most stacks we allow less on a mesh whose RTTs are milliseconds. */
const DEFAULT_MIN_RTO_MS = 200;
const MAX_RETRANSMITS = 12;
const SYN_RETRIES = 6;
const DELAYED_ACK_MS = 20;
const TIME_WAIT_MS = 30_000;
const WINDOW_SCALE = 7;
/** SACK blocks per ACK: 4 fit the 40 bytes of options, 3 leave room as most stacks do. */
const MAX_SACK_BLOCKS = 3;
const DEFAULT_RECEIVE_BUFFER = 256 * 1024;

interface InFlight {
  seq: number;
  data: Uint8Array;
  fin: boolean;
}

export class TcpConnection {
  state: TcpState = 'SYN-SENT';
  readonly out: Uint8Array[] = [];
  readonly events: TcpEvent[] = [];
  private readonly o: Required<Omit<TcpOptions, 'unread'>> & { unread: () => number };
  private sndUna: number;
  private sndNxt: number;
  private sndWnd = 0;
  private sndScale = 0;
  private rcvScale = 0;
  private rcvNxt = 0;
  private peerMss = 536;
  private cwnd = 0;
  private ssthresh = Number.POSITIVE_INFINITY;
  private dupAcks = 0;
  /** Set while in fast recovery: the sndNxt at entry (NewReno's "recover"). */
  private recover: number | null = null;
  /** Bytes written by the application and not yet sent. */
  private unsent: Uint8Array[] = [];
  private unsentBytes = 0;
  /** Sent and not yet acknowledged, in order. */
  private inFlight: InFlight[] = [];
  /** After a retransmission timeout: how many of inFlight were sent again (go-back-N), else null. */
  private resendIdx: number | null = null;
  private finQueued = false;
  private finSent = false;
  private readonly outOfOrder = new Map<number, { data: Uint8Array; fin: boolean }>();
  /** Whether the peer takes SACK blocks (it said so in its SYN-ACK). */
  private sackOk = false;
  /** Start of the out-of-order segment that arrived last: its block goes first (RFC 2018). */
  private lastHeld: number | null = null;
  private srtt: number | null = null;
  private rttvar = 0;
  private rto = INITIAL_RTO_MS;
  private timed: { seq: number; at: number } | null = null;
  private retransmits = 0;
  private rtoAt: number | null = null;
  private ackAt: number | null = null;
  private unacked = 0;
  private keepaliveAt: number | null = null;
  private keepaliveProbesSent = 0;
  private timeWaitAt: number | null = null;
  private lastAdvertised = 0;

  constructor(options: TcpOptions, nowMs: number) {
    this.o = {
      receiveBuffer: DEFAULT_RECEIVE_BUFFER,
      unread: () => 0,
      minRtoMs: DEFAULT_MIN_RTO_MS,
      keepaliveIdleMs: 7_200_000,
      keepaliveIntervalMs: 75_000,
      keepaliveProbes: 9,
      ...options,
    };
    this.sndUna = options.iss >>> 0;
    this.sndNxt = seq.add(this.sndUna, 1);
    this.sendSyn(nowMs);
  }

  /** Bytes written and not yet acknowledged. */
  get buffered(): number {
    return this.unsentBytes + seq.diff(this.sndNxt, this.sndUna);
  }

  /** Queues data to send; false once the connection no longer sends. */
  write(data: Uint8Array, nowMs: number): boolean {
    if (this.finQueued || this.state === 'CLOSED') return false;
    if (data.length) {
      this.unsent.push(data);
      this.unsentBytes += data.length;
    }
    this.pump(nowMs);
    return true;
  }

  /** Sends FIN after everything written so far. */
  end(nowMs: number): void {
    if (this.finQueued || this.state === 'CLOSED') return;
    this.finQueued = true;
    this.pump(nowMs);
  }

  /** Resets the connection (RST) and forgets it. */
  abort(): void {
    if (this.state !== 'CLOSED' && this.state !== 'SYN-SENT' && this.state !== 'TIME-WAIT')
      this.emitSegment({ flags: Flags.RST | Flags.ACK, seq: this.sndNxt, ack: this.rcvNxt });
    this.closeNow();
  }

  /** The application took data out of its buffer: reopen a window that had closed. */
  windowOpened(): void {
    const now = this.window();
    if (this.lastAdvertised < 2 * this.o.mss && now >= 2 * this.o.mss && this.state !== 'SYN-SENT')
      this.sendAck();
  }

  receive(s: Segment, nowMs: number): void {
    if (this.state === 'CLOSED') return;
    if (this.state === 'SYN-SENT') {
      this.receiveSynAck(s, nowMs);
      return;
    }
    if (!this.acceptable(s)) {
      if (!(s.flags & Flags.RST)) this.sendAck();
      return;
    }
    if (s.flags & Flags.RST) {
      this.fail('ECONNRESET', 'connection reset by peer');
      return;
    }
    if (s.flags & Flags.SYN) {
      // A SYN inside the window after the handshake: RFC 5961's challenge ACK.
      this.sendAck();
      return;
    }
    if (!(s.flags & Flags.ACK)) return;
    this.keepaliveProbesSent = 0;
    this.keepaliveAt = nowMs + this.o.keepaliveIdleMs;
    this.receiveAck(s, nowMs);
    if ((this.state as TcpState) === 'CLOSED') return;
    this.receiveData(s, nowMs);
    this.pump(nowMs);
  }

  /** Runs the timers that are due. */
  tick(nowMs: number): void {
    if (this.timeWaitAt !== null && nowMs >= this.timeWaitAt) {
      this.closeNow();
      return;
    }
    if (this.ackAt !== null && nowMs >= this.ackAt) this.sendAck();
    if (this.rtoAt !== null && nowMs >= this.rtoAt) this.retransmitTimeout(nowMs);
    if (this.keepaliveAt !== null && nowMs >= this.keepaliveAt && this.state === 'ESTABLISHED') {
      if (this.keepaliveProbesSent >= this.o.keepaliveProbes) {
        this.fail('ETIMEDOUT', 'the peer stopped answering keepalives');
        return;
      }
      this.keepaliveProbesSent++;
      // One byte before the next one expected: the peer must answer with an ACK.
      this.emitSegment({ flags: Flags.ACK, seq: seq.add(this.sndNxt, -1), ack: this.rcvNxt });
      this.keepaliveAt = nowMs + this.o.keepaliveIntervalMs;
    }
  }

  nextDeadline(): number {
    let at = Number.POSITIVE_INFINITY;
    for (const t of [this.rtoAt, this.ackAt, this.keepaliveAt, this.timeWaitAt])
      if (t !== null && t < at) at = t;
    return at;
  }

  private sendSyn(nowMs: number): void {
    this.emitSegment(this.syn());
    this.rtoAt = nowMs + this.rto;
    this.timed = { seq: this.sndUna, at: nowMs };
  }

  private syn() {
    return {
      flags: Flags.SYN,
      seq: this.sndUna,
      ack: 0,
      mss: this.o.mss,
      windowScale: WINDOW_SCALE,
      sackPermitted: true,
    };
  }

  private receiveSynAck(s: Segment, nowMs: number): void {
    const ackOk = (s.flags & Flags.ACK) !== 0 && s.ack === this.sndNxt;
    if (s.flags & Flags.RST) {
      if (ackOk) this.fail('ECONNREFUSED', 'connection refused');
      return;
    }
    if (!(s.flags & Flags.SYN) || !ackOk) {
      if (s.flags & Flags.ACK && !ackOk) this.emitSegment({ flags: Flags.RST, seq: s.ack, ack: 0 });
      return;
    }
    this.rcvNxt = seq.add(s.seq, 1);
    this.sndUna = s.ack;
    if (s.windowScale !== undefined) {
      this.sndScale = s.windowScale;
      this.rcvScale = WINDOW_SCALE;
    }
    // The window in a SYN is never scaled.
    this.sndWnd = s.window;
    this.peerMss = Math.min(s.mss ?? 536, this.o.mss);
    this.sackOk = s.sackPermitted === true;
    this.cwnd = Math.min(10 * this.peerMss, Math.max(2 * this.peerMss, 14_600));
    if (this.timed && this.retransmits === 0) this.sampleRtt(nowMs - this.timed.at);
    this.timed = null;
    this.retransmits = 0;
    this.rtoAt = null;
    this.state = 'ESTABLISHED';
    this.keepaliveAt = nowMs + this.o.keepaliveIdleMs;
    this.sendAck();
    this.events.push({ kind: 'connected' });
    this.pump(nowMs);
  }

  /** RFC 9293 section 3.10.7.4's acceptability test for a segment's sequence range. */
  private acceptable(s: Segment): boolean {
    const len = s.payload.length + (s.flags & Flags.FIN ? 1 : 0);
    const wnd = this.window();
    if (len === 0)
      return wnd === 0 ? s.seq === this.rcvNxt : inWindow(s.seq, this.rcvNxt, wnd) || s.seq === this.rcvNxt;
    if (wnd === 0) return false;
    return inWindow(s.seq, this.rcvNxt, wnd) || inWindow(seq.add(s.seq, len - 1), this.rcvNxt, wnd);
  }

  private receiveAck(s: Segment, nowMs: number): void {
    const newWnd = s.window << this.sndScale;
    if (seq.lt(this.sndNxt, s.ack)) {
      // Acknowledges something not yet sent.
      this.sendAck();
      return;
    }
    if (seq.le(s.ack, this.sndUna)) {
      const duplicate =
        s.ack === this.sndUna &&
        s.payload.length === 0 &&
        !(s.flags & Flags.FIN) &&
        newWnd === this.sndWnd &&
        this.inFlight.length > 0;
      this.sndWnd = newWnd;
      if (duplicate) this.duplicateAck(nowMs);
      return;
    }
    const acked = seq.diff(s.ack, this.sndUna);
    this.sndUna = s.ack;
    this.sndWnd = newWnd;
    while (this.inFlight.length) {
      const f = this.inFlight[0]!;
      const end = seq.add(f.seq, f.data.length + (f.fin ? 1 : 0));
      if (seq.le(end, this.sndUna)) {
        this.inFlight.shift();
        if (this.resendIdx !== null) this.resendIdx = Math.max(0, this.resendIdx - 1);
      } else {
        if (seq.lt(f.seq, this.sndUna)) {
          const cut = seq.diff(this.sndUna, f.seq);
          f.data = f.data.subarray(cut);
          f.seq = this.sndUna;
        }
        break;
      }
    }
    if (this.timed && seq.lt(this.timed.seq, this.sndUna)) {
      this.sampleRtt(nowMs - this.timed.at);
      this.timed = null;
    }
    this.retransmits = 0;
    if (this.recover !== null) {
      if (seq.le(this.recover, this.sndUna)) {
        this.cwnd = this.ssthresh;
        this.recover = null;
        this.dupAcks = 0;
      } else {
        // A partial ACK: the next hole is lost too (NewReno).
        this.cwnd = Math.max(this.cwnd - acked + this.peerMss, this.peerMss);
        this.retransmitFirst();
      }
    } else {
      this.dupAcks = 0;
      this.cwnd +=
        this.cwnd < this.ssthresh
          ? Math.min(acked, this.peerMss)
          : Math.max(1, Math.floor((this.peerMss * this.peerMss) / this.cwnd));
    }
    this.rtoAt = this.inFlight.length ? nowMs + this.rto : null;
    if (this.finSent && this.inFlight.length === 0) this.finAcknowledged(nowMs);
  }

  private duplicateAck(nowMs: number): void {
    this.dupAcks++;
    if (this.recover !== null) {
      this.cwnd += this.peerMss;
    } else if (this.dupAcks === 3) {
      this.ssthresh = Math.max(Math.floor(this.flight() / 2), 2 * this.peerMss);
      this.recover = this.sndNxt;
      this.cwnd = this.ssthresh + 3 * this.peerMss;
      this.retransmitFirst();
      this.rtoAt = nowMs + this.rto;
    }
  }

  private finAcknowledged(nowMs: number): void {
    if (this.state === 'FIN-WAIT-1') this.state = 'FIN-WAIT-2';
    else if (this.state === 'CLOSING') this.enterTimeWait(nowMs);
    else if (this.state === 'LAST-ACK') this.closeNow();
  }

  private receiveData(s: Segment, nowMs: number): void {
    const fin = (s.flags & Flags.FIN) !== 0;
    if (s.payload.length === 0 && !fin) return;
    if (this.state !== 'ESTABLISHED' && this.state !== 'FIN-WAIT-1' && this.state !== 'FIN-WAIT-2') {
      this.sendAck();
      return;
    }
    let data = s.payload;
    let start = s.seq;
    if (seq.lt(start, this.rcvNxt)) {
      const skip = seq.diff(this.rcvNxt, start);
      if (skip > data.length) {
        this.sendAck();
        return;
      }
      data = data.subarray(skip);
      start = this.rcvNxt;
    }
    if (start !== this.rcvNxt) {
      // Out of order: hold it, and ACK at once so the sender counts duplicates.
      if (!this.outOfOrder.has(start) && this.outOfOrder.size < 1024)
        this.outOfOrder.set(start, { data: data.slice(), fin });
      this.lastHeld = start;
      this.sendAck();
      return;
    }
    const filledHole = this.outOfOrder.size > 0;
    let gotFin = this.accept(data, fin);
    for (
      let next = this.outOfOrder.get(this.rcvNxt);
      next && !gotFin;
      next = this.outOfOrder.get(this.rcvNxt)
    ) {
      this.outOfOrder.delete(this.rcvNxt);
      gotFin = this.accept(next.data, next.fin);
    }
    // Drop held segments that are now wholly behind rcvNxt.
    for (const [k, v] of this.outOfOrder)
      if (seq.le(seq.add(k, v.data.length), this.rcvNxt)) this.outOfOrder.delete(k);
    if (gotFin) {
      this.events.push({ kind: 'end' });
      if (this.state === 'ESTABLISHED') this.state = 'CLOSE-WAIT';
      else if (this.state === 'FIN-WAIT-1') this.state = 'CLOSING';
      else if (this.state === 'FIN-WAIT-2') this.enterTimeWait(nowMs);
      this.sendAck();
      return;
    }
    if (filledHole || this.outOfOrder.size || ++this.unacked >= 2) this.sendAck();
    else this.ackAt ??= nowMs + DELAYED_ACK_MS;
  }

  /** Takes in-order data; true when it ended with the peer's FIN. */
  private accept(data: Uint8Array, fin: boolean): boolean {
    if (data.length) {
      this.rcvNxt = seq.add(this.rcvNxt, data.length);
      this.events.push({ kind: 'data', data: data.slice() });
    }
    if (fin) this.rcvNxt = seq.add(this.rcvNxt, 1);
    return fin;
  }

  /** Sends again what a timeout left unacknowledged, then new data as the windows allow, then a queued FIN. */
  private pump(nowMs: number): void {
    const limit = Math.min(this.cwnd, this.sndWnd);
    while (this.resendIdx !== null && this.resendIdx < this.inFlight.length && limit - this.flight() > 0)
      this.emitData(this.inFlight[this.resendIdx++]!);
    if (this.resendIdx !== null) {
      if (this.resendIdx < this.inFlight.length) return;
      this.resendIdx = null;
    }
    if (this.state !== 'ESTABLISHED' && this.state !== 'CLOSE-WAIT') return;
    while (this.unsentBytes > 0) {
      const room = limit - this.flight();
      if (room <= 0) break;
      const size = Math.min(this.peerMss, room, this.unsentBytes);
      const data = this.take(size);
      this.sendData(data, false, nowMs);
    }
    if (this.unsentBytes > 0 && this.sndWnd === 0 && this.inFlight.length === 0 && this.rtoAt === null)
      this.rtoAt = nowMs + this.rto;
    if (this.finQueued && !this.finSent && this.unsentBytes === 0) {
      this.finSent = true;
      this.sendData(new Uint8Array(0), true, nowMs);
      this.state = this.state === 'ESTABLISHED' ? 'FIN-WAIT-1' : 'LAST-ACK';
    }
  }

  private take(size: number): Uint8Array {
    const out = new Uint8Array(size);
    let filled = 0;
    while (filled < size) {
      const head = this.unsent[0]!;
      const n = Math.min(head.length, size - filled);
      out.set(head.subarray(0, n), filled);
      filled += n;
      if (n === head.length) this.unsent.shift();
      else this.unsent[0] = head.subarray(n);
    }
    this.unsentBytes -= size;
    return out;
  }

  private sendData(data: Uint8Array, fin: boolean, nowMs: number): void {
    const f: InFlight = { seq: this.sndNxt, data, fin };
    this.inFlight.push(f);
    this.sndNxt = seq.add(this.sndNxt, data.length + (fin ? 1 : 0));
    this.timed ??= { seq: f.seq, at: nowMs };
    this.rtoAt ??= nowMs + this.rto;
    this.emitData(f);
  }

  private emitData(f: InFlight): void {
    this.emitSegment({
      flags: Flags.ACK | (f.fin ? Flags.FIN : 0) | (f.data.length ? Flags.PSH : 0),
      seq: f.seq,
      ack: this.rcvNxt,
      payload: f.data,
    });
  }

  private retransmitFirst(): void {
    const f = this.inFlight[0];
    if (!f) return;
    this.timed = null;
    this.emitData(f);
  }

  private retransmitTimeout(nowMs: number): void {
    this.rtoAt = null;
    if (this.state === 'SYN-SENT') {
      if (++this.retransmits > SYN_RETRIES) {
        this.fail('ETIMEDOUT', 'connection timed out');
        return;
      }
      this.rto = Math.min(this.rto * 2, MAX_RTO_MS);
      this.timed = null;
      this.emitSegment(this.syn());
      this.rtoAt = nowMs + this.rto;
      return;
    }
    if (this.inFlight.length === 0) {
      // The peer's window is closed: probe it with one byte.
      if (this.unsentBytes > 0 && this.sndWnd === 0) {
        this.sendData(this.take(1), false, nowMs);
        this.rto = Math.min(this.rto * 2, MAX_RTO_MS);
        this.rtoAt = nowMs + this.rto;
      }
      return;
    }
    if (++this.retransmits > MAX_RETRANSMITS) {
      this.fail('ETIMEDOUT', 'connection timed out');
      return;
    }
    this.ssthresh = Math.max(Math.floor(this.flight() / 2), 2 * this.peerMss);
    this.cwnd = this.peerMss;
    this.recover = null;
    this.dupAcks = 0;
    this.rto = Math.min(this.rto * 2, MAX_RTO_MS);
    this.timed = null;
    this.resendIdx = 0;
    this.pump(nowMs);
    this.rtoAt = nowMs + this.rto;
  }

  private sampleRtt(r: number): void {
    if (this.srtt === null) {
      this.srtt = r;
      this.rttvar = r / 2;
    } else {
      this.rttvar = 0.75 * this.rttvar + 0.25 * Math.abs(this.srtt - r);
      this.srtt = 0.875 * this.srtt + 0.125 * r;
    }
    this.rto = Math.min(Math.max(this.srtt + Math.max(1, 4 * this.rttvar), this.o.minRtoMs), MAX_RTO_MS);
  }

  /** Bytes sent and unacknowledged; after a timeout, only those sent again so far. */
  private flight(): number {
    const resent = this.resendIdx === null ? undefined : this.inFlight[this.resendIdx];
    return seq.diff(resent ? resent.seq : this.sndNxt, this.sndUna);
  }

  private window(): number {
    return Math.max(0, this.o.receiveBuffer - this.o.unread());
  }

  private sendAck(): void {
    this.ackAt = null;
    this.unacked = 0;
    this.emitSegment({ flags: Flags.ACK, seq: this.sndNxt, ack: this.rcvNxt });
  }

  private emitSegment(s: Partial<Segment> & { flags: number; seq: number; ack: number }): void {
    const wnd =
      this.state === 'SYN-SENT' && s.flags & Flags.SYN
        ? Math.min(this.window(), 65_535)
        : this.window() >> this.rcvScale;
    const window = Math.min(wnd, 65_535);
    if (!(s.flags & Flags.SYN)) this.lastAdvertised = window << this.rcvScale;
    const sack = this.sackOk && s.flags === Flags.ACK && this.outOfOrder.size ? this.sackBlocks() : undefined;
    if (s.flags & Flags.ACK) {
      this.ackAt = null;
      this.unacked = 0;
    }
    this.out.push(
      buildSegment(this.o.localAddress, this.o.remoteAddress, {
        sourcePort: this.o.localPort,
        destinationPort: this.o.remotePort,
        window,
        payload: new Uint8Array(0),
        ...(sack ? { sack } : {}),
        ...s,
      }),
    );
  }

  /** The held data as [left, right) ranges, the one with the segment that came last first. */
  private sackBlocks(): [number, number][] {
    const held = [...this.outOfOrder.entries()]
      .map(([start, h]) => [start, seq.add(start, h.data.length + (h.fin ? 1 : 0))] as [number, number])
      .sort((a, b) => seq.diff(a[0], b[0]));
    const blocks: [number, number][] = [];
    for (const [l, r] of held) {
      const last = blocks.at(-1);
      if (last && seq.le(l, last[1])) {
        if (seq.lt(last[1], r)) last[1] = r;
      } else blocks.push([l, r]);
    }
    const first = blocks.findIndex(
      ([l, r]) => this.lastHeld !== null && seq.le(l, this.lastHeld) && seq.lt(this.lastHeld, r),
    );
    if (first > 0) blocks.unshift(...blocks.splice(first, 1));
    return blocks.slice(0, MAX_SACK_BLOCKS);
  }

  private enterTimeWait(nowMs: number): void {
    this.state = 'TIME-WAIT';
    this.rtoAt = this.keepaliveAt = null;
    this.timeWaitAt = nowMs + TIME_WAIT_MS;
    this.events.push({ kind: 'closed' });
  }

  private fail(code: 'ECONNREFUSED' | 'ECONNRESET' | 'ETIMEDOUT', message: string): void {
    this.events.push({ kind: 'error', code, message });
    this.closeNow();
  }

  private closeNow(): void {
    const wasOpen = this.state !== 'CLOSED' && this.state !== 'TIME-WAIT';
    this.state = 'CLOSED';
    this.rtoAt = this.ackAt = this.keepaliveAt = this.timeWaitAt = null;
    this.inFlight = [];
    this.resendIdx = null;
    this.unsent = [];
    this.unsentBytes = 0;
    if (wasOpen) this.events.push({ kind: 'closed' });
  }
}

function inWindow(x: number, start: number, size: number): boolean {
  return seq.le(start, x) && seq.lt(x, seq.add(start, size));
}
