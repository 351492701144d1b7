// The userspace WireGuard implementation against wireguard-go, each in its own
// network namespace: handshakes with it as initiator and as responder, IPv4
// and IPv6 packets both ways, and rekeying with short timers while traffic
// flows. Interoperating with an independent implementation is the test of a
// protocol implementation; a transcript of our own proves little.
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import { WireGuardDevice } from '../../agent/dataplane/wireguard.js';
import { encodeWgKey } from '../../proto/keys.js';
import { generateKeyPair, type KeyPair } from '../../userspace/wireguard/crypto.js';
import type { Timers } from '../../userspace/wireguard/device.js';
import { Topology } from './harness/netns.js';
import { requireTools } from './harness/tools.js';

const WG = { veth: '198.51.100.1', v4: '100.64.0.1', v6: 'fd7a:115c:a1e0::1', port: 51820 };
const US1 = { v4: '100.64.0.2', v6: 'fd7a:115c:a1e0::2', port: 51821 };
const US2 = { v4: '100.64.0.3', v6: 'fd7a:115c:a1e0::3', port: 51822 };
const US_VETH = '198.51.100.2';
const PEER_SCRIPT = join(import.meta.dirname, 'harness', 'wg-peer.ts');

interface Event {
  event: string;
  seq?: number;
  from?: string;
}

/** A userspace peer process and the events it printed. */
class UserspacePeer {
  readonly events: Event[] = [];
  private waiters: (() => void)[] = [];

  constructor(readonly child: ChildProcess) {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      this.events.push(JSON.parse(line) as Event);
      for (const w of this.waiters.splice(0)) w();
    });
  }

  send(cmd: object): void {
    this.child.stdin!.write(`${JSON.stringify(cmd)}\n`);
  }

  count(event: string, pred: (e: Event) => boolean = () => true): number {
    return this.events.filter((e) => e.event === event && pred(e)).length;
  }

  /** Resolves once `pred` holds over the events, or fails after `timeoutMs`. */
  async until(what: string, pred: () => boolean, timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}; events: ${JSON.stringify(this.events)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }
}

test('userspace WireGuard interoperates with wireguard-go', async (t) => {
  if (!requireTools(t, ['ip', 'wg', 'wireguard-go', 'ping'])) return;
  const topo = new Topology();
  const stateDir = await mkdtemp(join(tmpdir(), 'meshgate-e2e-'));
  let device: WireGuardDevice | null = null;
  t.after(async () => {
    await device?.destroy().catch(() => {});
    await topo.destroy();
    await rm(stateDir, { recursive: true, force: true });
  });

  await topo.addHost('wg');
  await topo.addHost('us');
  await topo.link('wg', 'us', { addrA: WG.veth, addrB: US_VETH, prefix: 24 });

  const wgKey = generateKeyPair();
  const us1Key = generateKeyPair();
  const us2Key = generateKeyPair();
  device = await WireGuardDevice.create({
    name: topo.wgName(),
    backend: 'wireguard-go',
    netns: topo.ns('wg'),
    stateDir,
  });
  const peerOf = (key: KeyPair, node: typeof US1) => ({
    publicKey: encodeWgKey(key.publicKey),
    allowedIps: [`${node.v4}/32`, `${node.v6}/128`],
    endpoint: `${US_VETH}:${node.port}`,
  });
  await device.configureLink({ addresses: [`${WG.v4}/32`, `${WG.v6}/128`] });
  await device.apply({
    privateKeyFile: await device.writePrivateKey(encodeWgKey(wgKey.privateKey)),
    listenPort: WG.port,
    peers: [peerOf(us1Key, US1), peerOf(us2Key, US2)],
  });

  const start = async (key: KeyPair, node: typeof US1, timers: Partial<Timers> = {}) => {
    const peer = new UserspacePeer(
      topo.spawn('us', process.execPath, ['--import', 'tsx', PEER_SCRIPT], { stdin: true }),
    );
    peer.send({
      privateKey: Buffer.from(key.privateKey).toString('base64'),
      listenPort: node.port,
      addresses: [node.v4, node.v6],
      peer: { publicKey: Buffer.from(wgKey.publicKey).toString('base64'), endpoint: `${WG.veth}:${WG.port}` },
      timers,
    });
    await peer.until('the UDP socket', () => peer.count('listening') === 1, 30_000);
    return peer;
  };
  const handshakeOf = async (key: KeyPair) =>
    (await device!.show()).peers.find((p) => p.publicKey === encodeWgKey(key.publicKey))?.latestHandshake ??
    0;

  // Rekey after 2 s instead of 120 s; the others scaled alike.
  const us1 = await start(us1Key, US1, {
    rekeyAfterMs: 2_000,
    rejectAfterMs: 3_000,
    rekeyTimeoutMs: 500,
    keepaliveTimeoutMs: 500,
    rekeyAttemptMs: 10_000,
  });

  await t.test('as initiator: a ping to wireguard-go is answered, over IPv4 and IPv6', async () => {
    us1.send({ ping: { to: WG.v4, seq: 1 } });
    await us1.until('the echo reply', () => us1.count('echo-reply', (e) => e.seq === 1) === 1);
    assert.equal(us1.count('established'), 1, 'one handshake');
    assert.equal(us1.events.find((e) => e.event === 'echo-reply')?.from, WG.v4);
    us1.send({ ping: { to: WG.v6, seq: 2 } });
    await us1.until('the ICMPv6 echo reply', () => us1.count('echo-reply', (e) => e.seq === 2) === 1);
    assert.equal(us1.events.find((e) => e.seq === 2)?.from, WG.v6);
    assert.ok((await handshakeOf(us1Key)) > 0, 'wireguard-go shows the handshake');
  });

  await t.test('as responder: wireguard-go pings the userspace peer and gets its reply', async () => {
    const us2 = await start(us2Key, US2);
    await topo.exec('wg', 'ping', ['-c', '1', '-W', '5', US2.v4]);
    assert.equal(
      us2.count('echo-request', (e) => e.from === WG.v4),
      1,
    );
    assert.equal(us2.count('established'), 1, 'the responder confirmed its keypair when data arrived on it');
    await topo.exec('wg', 'ping', ['-c', '1', '-W', '5', US2.v6]);
    assert.equal(
      us2.count('echo-request', (e) => e.from === WG.v6),
      1,
      'ICMPv6 echo with a valid checksum',
    );
  });

  await t.test('rekeys with short timers while traffic keeps flowing', async () => {
    const first = await handshakeOf(us1Key);
    // Seven seconds at 2 s per key: at least two more handshakes, each begun by the userspace side.
    for (let seq = 10; seq < 24; seq++) {
      us1.send({ ping: { to: WG.v4, seq } });
      await new Promise((r) => setTimeout(r, 500));
    }
    await us1.until('the last echo reply', () => us1.count('echo-reply', (e) => e.seq === 23) === 1);
    const answered = us1.count('echo-reply', (e) => (e.seq ?? 0) >= 10);
    assert.ok(answered >= 13, `${answered} of 14 pings answered across rekeys`);
    assert.ok(us1.count('established') >= 3, `${us1.count('established')} handshakes`);
    assert.ok((await handshakeOf(us1Key)) > first, 'wireguard-go saw a newer handshake');
  });
});
