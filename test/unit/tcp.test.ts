// The userspace TCP client against a scripted peer: every segment it sends is
// parsed back, every answer is built by hand, and the clock is the test's.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { TcpConnection, type TcpOptions } from '../../userspace/tcpip/connection.js';
import { parseAddress, parseIp } from '../../userspace/tcpip/ip.js';
import { buildSegment, Flags, parseSegment, type Segment } from '../../userspace/tcpip/segment.js';

const CLIENT = parseAddress('100.64.0.2')!;
const SERVER = parseAddress('100.64.0.1')!;
const ISS = 1000;
const PEER_ISS = 5000;

function setup(o: Partial<TcpOptions> = {}) {
  let now = 0;
  const c = new TcpConnection(
    {
      localAddress: CLIENT,
      remoteAddress: SERVER,
      localPort: 40000,
      remotePort: 22,
      iss: ISS,
      mss: 1000,
      ...o,
    },
    now,
  );
  /** What the client sent since the last call, parsed. */
  const sent = (): Segment[] =>
    c.out.splice(0).map((p) => {
      const ip = parseIp(p)!;
      return parseSegment(ip.source, ip.destination, ip.payload)!;
    });
  const from = (s: Partial<Segment> & { flags: number; seq: number }) => {
    const packet = buildSegment(SERVER, CLIENT, {
      sourcePort: 22,
      destinationPort: 40000,
      ack: 0,
      window: 65535,
      payload: new Uint8Array(0),
      ...s,
    });
    const ip = parseIp(packet)!;
    c.receive(parseSegment(ip.source, ip.destination, ip.payload)!, now);
  };
  const events = () =>
    c.events
      .splice(0)
      .map((e) =>
        e.kind === 'data'
          ? `data:${new TextDecoder().decode(e.data)}`
          : e.kind === 'error'
            ? `error:${e.code}`
            : e.kind,
      );
  const at = (ms: number) => {
    now = ms;
    c.tick(now);
  };
  /** Completes the handshake; the server's window is `window` (scaled by 2^scale). */
  const establish = (window = 65535, scale: number | undefined = 0) => {
    sent();
    from({
      flags: Flags.SYN | Flags.ACK,
      seq: PEER_ISS,
      ack: ISS + 1,
      window,
      mss: 1000,
      ...(scale === undefined ? {} : { windowScale: scale }),
    });
    sent();
    events();
  };
  return { c, sent, from, events, at, establish, now: () => now };
}

const bytes = (s: string) => new TextEncoder().encode(s);

describe('userspace TCP client', () => {
  it('opens with SYN carrying MSS and window scale, and ACKs the SYN-ACK', () => {
    const t = setup();
    const [syn] = t.sent();
    assert.equal(syn!.flags, Flags.SYN);
    assert.equal(syn!.seq, ISS);
    assert.equal(syn!.mss, 1000);
    assert.equal(syn!.windowScale, 7);
    t.from({ flags: Flags.SYN | Flags.ACK, seq: PEER_ISS, ack: ISS + 1, mss: 1400, windowScale: 2 });
    const [ack] = t.sent();
    assert.equal(ack!.flags, Flags.ACK);
    assert.equal(ack!.ack, PEER_ISS + 1);
    assert.equal(t.c.state, 'ESTABLISHED');
    assert.deepEqual(t.events(), ['connected']);
  });

  it('reports a refused connection, and retries a lost SYN with a doubling timeout', () => {
    const t = setup();
    t.sent();
    t.from({ flags: Flags.RST | Flags.ACK, seq: 0, ack: ISS + 1 });
    assert.deepEqual(t.events(), ['error:ECONNREFUSED', 'closed']);

    const u = setup();
    u.sent();
    u.at(999);
    assert.equal(u.sent().length, 0);
    u.at(1000);
    assert.equal(u.sent()[0]!.flags, Flags.SYN);
    u.at(2999);
    assert.equal(u.sent().length, 0);
    u.at(3000);
    assert.equal(u.sent().length, 1, 'the second retry after 2 s');
  });

  it('sends in segments of the peer MSS within its window, and moves on as ACKs arrive', () => {
    const t = setup();
    t.establish(2500);
    t.c.write(new Uint8Array(4000), t.now());
    const first = t.sent();
    assert.deepEqual(
      first.map((s) => s.payload.length),
      [1000, 1000, 500],
      'no more than the 2,500-byte window',
    );
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 1 + 2500, window: 2500 });
    assert.deepEqual(
      t.sent().map((s) => s.payload.length),
      [1000, 500],
      'the rest',
    );
  });

  it('applies the window scale of the SYN-ACK', () => {
    const t = setup();
    t.establish(1000, 2);
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 1, window: 1000 });
    t.c.write(new Uint8Array(3500), t.now());
    assert.deepEqual(
      t.sent().map((s) => s.payload.length),
      [1000, 1000, 1000, 500],
      '1000 << 2 = 4000 bytes of window',
    );
  });

  it('delivers out-of-order data in order, ACKing the gap at once', () => {
    const t = setup();
    t.establish();
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1 + 5, ack: ISS + 1, payload: bytes('world') });
    assert.deepEqual(t.events(), []);
    const [dup] = t.sent();
    assert.equal(dup!.ack, PEER_ISS + 1, 'a duplicate ACK for the hole');
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 1, payload: bytes('hello') });
    assert.deepEqual(t.events(), ['data:hello', 'data:world']);
    assert.equal(t.sent().at(-1)!.ack, PEER_ISS + 11);
  });

  it('reports held data in SACK blocks, the latest first, when the peer permits SACK', () => {
    const t = setup();
    assert.equal(t.sent()[0]!.sackPermitted, true, 'the SYN offers SACK');
    t.from({ flags: Flags.SYN | Flags.ACK, seq: PEER_ISS, ack: ISS + 1, mss: 1000, sackPermitted: true });
    t.sent();
    const at = (offset: number) => PEER_ISS + 1 + offset;
    t.from({ flags: Flags.ACK, seq: at(10), ack: ISS + 1, payload: bytes('ccccc') });
    t.from({ flags: Flags.ACK, seq: at(15), ack: ISS + 1, payload: bytes('ddddd') });
    t.from({ flags: Flags.ACK, seq: at(30), ack: ISS + 1, payload: bytes('fffff') });
    const acks = t.sent();
    assert.deepEqual(acks[0]!.sack, [[at(10), at(15)]]);
    assert.deepEqual(acks[1]!.sack, [[at(10), at(20)]], 'adjacent segments make one block');
    assert.deepEqual(
      acks[2]!.sack,
      [
        [at(30), at(35)],
        [at(10), at(20)],
      ],
      'the newest block first',
    );
    t.from({ flags: Flags.ACK, seq: at(0), ack: ISS + 1, payload: bytes('aaaaabbbbb') });
    const after = t.sent().at(-1)!;
    assert.equal(after.ack, at(20));
    assert.deepEqual(after.sack, [[at(30), at(35)]], 'what is delivered leaves the blocks');

    const u = setup();
    u.establish();
    u.from({ flags: Flags.ACK, seq: PEER_ISS + 11, ack: ISS + 1, payload: bytes('x') });
    assert.equal(u.sent()[0]!.sack, undefined, 'no blocks to a peer that did not permit them');
  });

  it('ignores data it has already received', () => {
    const t = setup();
    t.establish();
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 1, payload: bytes('once') });
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 1, payload: bytes('once') });
    assert.deepEqual(t.events(), ['data:once']);
  });

  it('retransmits after three duplicate ACKs without waiting for the timer', () => {
    const t = setup();
    t.establish();
    t.c.write(new Uint8Array(5000), t.now());
    const segs = t.sent();
    assert.equal(segs.length, 5);
    for (let i = 0; i < 3; i++) t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 1 });
    const re = t.sent();
    assert.equal(re.length, 1);
    assert.equal(re[0]!.seq, ISS + 1, 'the first unacknowledged segment again');
  });

  it('retransmits on the timer with RFC 6298 back-off, and times out in the end', () => {
    const t = setup();
    t.establish();
    t.c.write(bytes('x'), t.now());
    t.sent();
    // The handshake measured a round trip of 0 ms: the RTO is its 200 ms minimum.
    t.at(199);
    assert.equal(t.sent().length, 0);
    t.at(200);
    assert.equal(t.sent()[0]!.seq, ISS + 1);
    t.at(599);
    assert.equal(t.sent().length, 0, 'then twice that');
    t.at(600);
    assert.equal(t.sent().length, 1);
    for (let i = 0; i < 20 && t.c.state !== 'CLOSED'; i++) t.at(t.c.nextDeadline());
    assert.deepEqual(t.events(), ['error:ETIMEDOUT', 'closed']);
  });

  it('derives the retransmission timeout from measured round trips, not below its minimum', () => {
    const t = setup();
    t.sent();
    t.at(50);
    t.from({ flags: Flags.SYN | Flags.ACK, seq: PEER_ISS, ack: ISS + 1, mss: 1000 });
    t.sent();
    t.c.write(bytes('x'), t.now());
    t.sent();
    t.at(50 + 199);
    assert.equal(t.sent().length, 0);
    // SRTT 50, RTTVAR 25: 150 ms, raised to the 200 ms minimum.
    t.at(50 + 200);
    assert.equal(t.sent().length, 1);
  });

  it('closes actively: FIN-WAIT-1, FIN-WAIT-2, TIME-WAIT, CLOSED', () => {
    const t = setup();
    t.establish();
    t.c.write(bytes('bye'), t.now());
    t.c.end(t.now());
    const [data, fin] = t.sent();
    assert.equal(new TextDecoder().decode(data!.payload), 'bye');
    assert.equal(fin!.flags & Flags.FIN, Flags.FIN);
    assert.equal(t.c.state, 'FIN-WAIT-1');
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 5 });
    assert.equal(t.c.state, 'FIN-WAIT-2');
    t.from({ flags: Flags.ACK | Flags.FIN, seq: PEER_ISS + 1, ack: ISS + 5 });
    assert.equal(t.c.state, 'TIME-WAIT');
    assert.equal(t.sent()[0]!.ack, PEER_ISS + 2, 'the FIN is acknowledged');
    assert.deepEqual(t.events(), ['end', 'closed']);
    t.at(30_000);
    assert.equal(t.c.state, 'CLOSED');
  });

  it('closes passively: CLOSE-WAIT after the peer FIN, LAST-ACK after ours', () => {
    const t = setup();
    t.establish();
    t.from({ flags: Flags.ACK | Flags.FIN, seq: PEER_ISS + 1, ack: ISS + 1, payload: bytes('done') });
    assert.equal(t.c.state, 'CLOSE-WAIT');
    assert.deepEqual(t.events(), ['data:done', 'end']);
    t.c.end(t.now());
    assert.equal(t.c.state, 'LAST-ACK');
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 6, ack: ISS + 2 });
    assert.equal(t.c.state, 'CLOSED');
    assert.deepEqual(t.events(), ['closed']);
  });

  it('takes a reset inside the window and ignores one outside it', () => {
    const t = setup();
    t.establish();
    t.from({ flags: Flags.RST, seq: PEER_ISS + 1 + 10_000_000 });
    assert.equal(t.c.state, 'ESTABLISHED');
    t.from({ flags: Flags.RST, seq: PEER_ISS + 1 });
    assert.deepEqual(t.events(), ['error:ECONNRESET', 'closed']);
  });

  it('probes a closed window and resumes when it opens', () => {
    const t = setup();
    t.establish(0);
    t.c.write(bytes('abc'), t.now());
    assert.equal(t.sent().length, 0, 'nothing fits a zero window');
    t.at(1000);
    const [probe] = t.sent();
    assert.equal(probe!.payload.length, 1, 'a one-byte probe');
    t.from({ flags: Flags.ACK, seq: PEER_ISS + 1, ack: ISS + 2, window: 1000 });
    assert.equal(new TextDecoder().decode(t.sent()[0]!.payload), 'bc');
  });

  it('sends keepalive probes when idle and gives up when none is answered', () => {
    const t = setup({ keepaliveIdleMs: 10_000, keepaliveIntervalMs: 1_000, keepaliveProbes: 2 });
    t.establish();
    t.at(10_000);
    const [probe] = t.sent();
    assert.equal(probe!.seq, ISS, 'one before the next sequence number');
    t.at(11_000);
    t.at(12_000);
    assert.deepEqual(t.events(), ['error:ETIMEDOUT', 'closed']);
  });

  it('refuses a segment whose checksum fails', () => {
    const packet = buildSegment(SERVER, CLIENT, {
      sourcePort: 22,
      destinationPort: 40000,
      seq: 1,
      ack: 0,
      flags: Flags.ACK,
      window: 1,
      payload: bytes('x'),
    });
    const ip = parseIp(packet)!;
    const bad = ip.payload.slice();
    bad[bad.length - 1]! ^= 1;
    assert.equal(parseSegment(ip.source, ip.destination, bad), null);
    assert.ok(parseSegment(ip.source, ip.destination, ip.payload));
  });
});
