// The userspace WireGuard core between two devices with a hand-driven clock:
// handshakes, transport, replay protection, cookies under load and the
// timers. Interoperability with wireguard-go is the end-to-end suite's job.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { generateKeyPair } from '../../userspace/wireguard/crypto.js';
import { Device, type Output, type Peer, type Timers } from '../../userspace/wireguard/device.js';
import { MessageType, messageType } from '../../userspace/wireguard/messages.js';
import { ReplayWindow, WINDOW } from '../../userspace/wireguard/replay.js';

/** Two devices, "a" at endpoint A and "b" at B, and the wire between them. */
function pair(o: { timers?: Partial<Timers>; bUnderLoad?: () => boolean } = {}) {
  const ka = generateKeyPair();
  const kb = generateKeyPair();
  const a = new Device({ privateKey: ka.privateKey, timers: o.timers ?? {} });
  const b = new Device({
    privateKey: kb.privateKey,
    timers: o.timers ?? {},
    ...(o.bUnderLoad ? { underLoad: o.bUnderLoad } : {}),
  });
  const peerB = a.addPeer({ publicKey: kb.publicKey, endpoint: 'B' });
  const peerA = b.addPeer({ publicKey: ka.publicKey });
  const delivered = { a: [] as Uint8Array[], b: [] as Uint8Array[] };
  const wire: { to: string; data: Uint8Array }[] = [];
  let now = 1_000_000;
  /** Carries every datagram until the wire is quiet, unless `drop` says otherwise; returns all that was sent. */
  const run = (outs: Output[], drop: (d: Uint8Array) => boolean = () => false) => {
    const sent: Uint8Array[] = [];
    const queue = [...outs];
    while (queue.length) {
      const o = queue.shift()!;
      if (o.kind === 'deliver') (o.peer === peerB ? delivered.a : delivered.b).push(o.packet);
      if (o.kind !== 'transmit') continue;
      wire.push(o);
      sent.push(o.data);
      if (drop(o.data)) continue;
      queue.push(...(o.to === 'B' ? b.receive(o.data, 'A', now) : a.receive(o.data, 'B', now)));
    }
    return sent;
  };
  return {
    a,
    b,
    peerA,
    peerB,
    delivered,
    wire,
    run,
    now: () => now,
    advance: (ms: number) => {
      now += ms;
      return now;
    },
  };
}

/** A minimal IPv4 packet whose total length is its own length, as trimPadding expects. */
function packet(text: string): Uint8Array {
  const body = new TextEncoder().encode(text);
  const p = new Uint8Array(20 + body.length);
  p[0] = 0x45;
  p[2] = p.length >> 8;
  p[3] = p.length & 0xff;
  p.set(body, 20);
  return p;
}
const text = (p: Uint8Array | undefined) => (p ? new TextDecoder().decode(p.subarray(20)) : undefined);
const types = (ds: Uint8Array[]) => ds.map((d) => messageType(d));

describe('replay window', () => {
  it('accepts each counter once, late ones within the window, none behind it', () => {
    const w = new ReplayWindow();
    assert.equal(w.accept(0), true);
    assert.equal(w.accept(0), false);
    assert.equal(w.accept(10), true);
    assert.equal(w.accept(5), true, 'a late counter within the window');
    assert.equal(w.accept(5), false);
    assert.equal(w.accept(10 + 5 * WINDOW), true, 'a jump far ahead');
    assert.equal(w.accept(10 + 4 * WINDOW - 1), false, 'now behind the window');
    assert.equal(w.accept(10 + 4 * WINDOW), true, 'the window edge itself');
    assert.equal(w.accept(10 + 5 * WINDOW - 1), true, 'cleared by the jump, not seen');
    assert.equal(w.accept(-1), false);
  });
});

describe('userspace WireGuard device', () => {
  it('completes a handshake on first send and carries packets both ways', () => {
    const t = pair();
    const crossed = t.run(t.a.send(t.peerB, packet('hello b'), t.now()));
    assert.deepEqual(types(crossed), [MessageType.Initiation, MessageType.Response, MessageType.Data]);
    assert.equal(
      text(t.delivered.b[0]),
      'hello b',
      'the queued packet went out once the handshake completed',
    );
    t.run(t.b.send(t.peerA, packet('hello a'), t.now()));
    assert.equal(text(t.delivered.a[0]), 'hello a');
    assert.equal(t.peerA.endpoint, 'A', 'the responder learned the endpoint from the handshake');
  });

  it('the responder sends nothing on its new keypair until the initiator has used it', () => {
    const t = pair();
    t.run(t.a.connect(t.peerB, t.now()), (d) => messageType(d) === MessageType.Data);
    assert.equal(t.peerA.current, null);
    const outs = t.b.send(t.peerA, packet('early'), t.now());
    assert.deepEqual(
      outs.filter((o) => o.kind === 'transmit').map((o) => o.kind === 'transmit' && messageType(o.data)),
      [MessageType.Initiation],
      'queued behind a handshake of its own instead',
    );
  });

  it('drops replayed and tampered data messages', () => {
    const t = pair();
    t.run(t.a.send(t.peerB, packet('one'), t.now()));
    const data = t.wire.find((w) => messageType(w.data) === MessageType.Data)!.data;
    assert.deepEqual(t.b.receive(data, 'A', t.now()), [], 'replayed');
    t.run(t.a.send(t.peerB, packet('two'), t.now()), () => true);
    const second = t.wire.at(-1)!.data.slice();
    second[second.length - 1]! ^= 1;
    assert.deepEqual(t.b.receive(second, 'A', t.now()), [], 'tampered');
    assert.deepEqual(t.delivered.b.map(text), ['one']);
  });

  it('drops a replayed initiation, so a recorded one cannot reset the session', () => {
    const t = pair();
    t.run(t.a.connect(t.peerB, t.now()));
    const initiation = t.wire.find((w) => messageType(w.data) === MessageType.Initiation)!.data;
    const before = t.peerA.current;
    t.advance(1_000);
    assert.deepEqual(t.b.receive(initiation, 'A', t.now()), []);
    assert.equal(t.peerA.current, before);
  });

  it('refuses handshakes whose MAC1 is not for this device', () => {
    const t = pair();
    const outs = t.a.connect(t.peerB, t.now());
    const init = (outs[0] as { data: Uint8Array }).data.slice();
    init[120]! ^= 1;
    assert.deepEqual(t.b.receive(init, 'A', t.now()), []);
  });

  it('under load answers with a cookie, and accepts the retry that carries it as MAC2', () => {
    const t = pair({ bUnderLoad: () => true });
    const first = t.run(t.a.connect(t.peerB, t.now()));
    assert.deepEqual(types(first), [MessageType.Initiation, MessageType.CookieReply]);
    assert.ok(t.peerB.cookie, 'a took the cookie');
    assert.equal(t.peerA.next, null, 'b spent nothing on the initiation');
    t.advance(t.a.nextDeadline() - t.now());
    const retry = t.run(t.a.tick(t.now()));
    assert.deepEqual(types(retry), [MessageType.Initiation, MessageType.Response, MessageType.Data]);
    assert.ok(t.peerB.current && t.peerA.current, 'both have a session');
  });

  it('retransmits a lost initiation every REKEY_TIMEOUT and gives up after REKEY_ATTEMPT_TIME', () => {
    const t = pair({ timers: { rekeyTimeoutMs: 5_000, rekeyAttemptMs: 15_000 } });
    const sent = t.run(t.a.send(t.peerB, packet('lost'), t.now()), () => true);
    assert.deepEqual(types(sent), [MessageType.Initiation]);
    let initiations = 1;
    for (let i = 0; i < 10 && Number.isFinite(t.a.nextDeadline()) && t.peerB.handshake; i++) {
      t.advance(t.a.nextDeadline() - t.now());
      initiations += t.run(t.a.tick(t.now()), () => true).length;
    }
    assert.equal(initiations, 3, 'three attempts in 15 s');
    assert.equal(t.peerB.handshake, null, 'then it stops');
    assert.equal(t.peerB.queue.length, 0, 'and drops what waited for it');
  });

  it('retransmits a first initiation sooner with firstRetransmitMs, doubling up to REKEY_TIMEOUT, and not once a handshake completed', () => {
    const t = pair({ timers: { rekeyTimeoutMs: 5_000, rekeyAttemptMs: 15_000, firstRetransmitMs: 250 } });
    const started = t.now();
    t.run(t.a.send(t.peerB, packet('lost'), t.now()), () => true);
    const at: number[] = [];
    for (let i = 0; i < 20 && Number.isFinite(t.a.nextDeadline()) && t.peerB.handshake; i++) {
      t.advance(t.a.nextDeadline() - t.now());
      if (t.run(t.a.tick(t.now()), () => true).length) at.push(t.now() - started);
    }
    const gaps = at.map((x, i) => x - (at[i - 1] ?? 0));
    const floors = [250, 500, 1_000, 2_000, 4_000, 5_000];
    for (const [i, floor] of floors.entries())
      assert.ok(gaps[i]! >= floor && gaps[i]! < floor + 334, `retry ${i + 1} after ${gaps[i]} ms`);
    assert.ok(at.at(-1)! < 15_000, `gives up after REKEY_ATTEMPT_TIME: ${at.join(', ')}`);
    assert.equal(t.peerB.handshake, null);

    const u = pair({ timers: { rekeyTimeoutMs: 5_000, firstRetransmitMs: 250, rekeyAfterMs: 60_000 } });
    u.run(u.a.send(u.peerB, packet('0'), u.now()));
    assert.ok(u.peerB.current, 'a session');
    u.advance(61_000);
    u.run(u.a.send(u.peerB, packet('1'), u.now()), (d) => messageType(d) === MessageType.Initiation);
    const next = u.peerB.retransmitAt! - u.now();
    assert.ok(next >= 5_000, `a rekey is retried after REKEY_TIMEOUT, not ${next} ms`);
  });

  it('the initiator rekeys after REKEY_AFTER_TIME and nobody uses a keypair past REJECT_AFTER_TIME', () => {
    const t = pair({ timers: { rekeyAfterMs: 120_000, rejectAfterMs: 180_000 } });
    t.run(t.a.send(t.peerB, packet('0'), t.now()));
    const first = t.peerB.current;
    t.advance(121_000);
    const crossed = t.run(t.a.send(t.peerB, packet('1'), t.now()));
    assert.deepEqual(types(crossed), [
      MessageType.Data,
      MessageType.Initiation,
      MessageType.Response,
      MessageType.Data,
    ]);
    assert.notEqual(t.peerB.current, first);
    assert.equal(t.peerB.previous, first, 'the old keypair still decrypts late packets');

    const u = pair({ timers: { rekeyAfterMs: 120_000, rejectAfterMs: 180_000 } });
    u.run(u.a.send(u.peerB, packet('0'), u.now()));
    u.advance(181_000);
    const late = u.run(u.b.send(u.peerA, packet('late'), u.now()));
    assert.equal(
      types(late)[0],
      MessageType.Initiation,
      'an expired keypair is not used; a handshake comes first',
    );
    assert.deepEqual(u.delivered.a.map(text), ['late']);
  });

  it('answers received data with a keepalive after KEEPALIVE_TIMEOUT when it has nothing to send', () => {
    const t = pair({ timers: { keepaliveTimeoutMs: 10_000 } });
    t.run(t.a.send(t.peerB, packet('ping'), t.now()));
    assert.equal(t.b.nextDeadline() - t.now(), 10_000);
    t.advance(10_000);
    const out = t.b.tick(t.now());
    assert.equal(out.length, 1);
    const keepalive = (out[0] as { data: Uint8Array }).data;
    assert.equal(messageType(keepalive), MessageType.Data);
    assert.equal(keepalive.length, 32, 'an empty payload: header and tag only');
    assert.deepEqual(t.a.receive(keepalive, 'B', t.now()), [], 'nothing to deliver');
  });

  it('starts a new handshake when sent data gets no answer within KEEPALIVE_TIMEOUT + REKEY_TIMEOUT', () => {
    const t = pair({ timers: { keepaliveTimeoutMs: 10_000, rekeyTimeoutMs: 5_000 } });
    t.run(t.a.send(t.peerB, packet('first'), t.now()));
    t.run(t.a.send(t.peerB, packet('unanswered'), t.now()), () => true);
    t.advance(15_000);
    assert.deepEqual(types(t.run(t.a.tick(t.now()), () => true)), [MessageType.Initiation]);
  });

  it('sends persistent keepalives', () => {
    const t = pair();
    const p: Peer = t.peerB;
    p.persistentKeepaliveMs = 25_000;
    t.run(t.a.send(p, packet('x'), t.now()));
    t.advance(10_000);
    t.run(t.b.tick(t.now()));
    // 25 s after the last packet in either direction: b's keepalive.
    t.advance(25_000);
    const keepalives = t.run(t.a.tick(t.now()));
    assert.deepEqual(types(keepalives), [MessageType.Data]);
    assert.equal(keepalives[0]!.length, 32);
    assert.equal(t.a.nextDeadline(), t.now() + 25_000, 'and the next one in 25 s');
  });

  it('forgets a removed peer', () => {
    const t = pair();
    t.run(t.a.send(t.peerB, packet('x'), t.now()));
    t.a.removePeer(t.peerB.key);
    assert.equal(t.a.peer(t.peerB.key), undefined);
    t.run(t.b.send(t.peerA, packet('to nobody'), t.now()));
    assert.deepEqual(t.delivered.a, []);
  });
});
