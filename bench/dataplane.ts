// Agent and data-plane benchmarks in network namespaces (needs root and
// wireguard-go, wg, ip, nft, iperf3): one JSON object on stdout, a summary
// on stderr.
//
//   node --import tsx bench/dataplane.ts                      everything
//   node --import tsx bench/dataplane.ts --only apply --peers 1000
//   node --import tsx bench/dataplane.ts --only throughput,relay --seconds 5
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type { DesiredPeer } from '../agent/dataplane/reconcile.js';
import { WireGuardDevice } from '../agent/dataplane/wireguard.js';
import { encodeWgKey, generateNodeKey } from '../proto/keys.js';
import { buildOnce, MeshLab, until } from '../test/e2e/harness/mesh.js';
import { Topology } from '../test/e2e/harness/netns.js';
import { star } from '../test/e2e/harness/star.js';
import { missingPrerequisites } from '../test/e2e/harness/tools.js';
import { log, machineInfo } from './lib/report.js';
import { round, summarize } from './lib/stats.js';

const { values } = parseArgs({
  options: {
    only: { type: 'string', default: 'apply,throughput,relay' },
    peers: { type: 'string', default: '1000' },
    runs: { type: 'string', default: '5' },
    seconds: { type: 'string', default: '5' },
  },
});
const only = new Set(values.only!.split(','));
const PEERS = Number(values.peers);
const RUNS = Number(values.runs);
const SECONDS = Number(values.seconds);

const missing = missingPrerequisites(['ip', 'wg', 'wireguard-go', 'nft', 'iperf3', 'ping']);
if (missing) {
  console.error(`dataplane benchmarks: ${missing}`);
  process.exit(1);
}

function peer(i: number): DesiredPeer {
  return {
    publicKey: encodeWgKey(generateNodeKey().publicKey),
    allowedIps: [`100.${64 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}/32`],
    endpoint: `198.51.100.${1 + (i % 250)}:${41641 + (i % 1000)}`,
    persistentKeepalive: 25,
  };
}

/** Median time to apply PEERS peers to an empty wireguard-go, and one peer on top of them. */
async function applyBench(): Promise<Record<string, unknown>> {
  const topo = new Topology();
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-bench-'));
  try {
    await topo.addHost('x');
    const device = await WireGuardDevice.create({
      name: topo.wgName(),
      backend: 'wireguard-go',
      netns: topo.ns('x'),
      stateDir: dir,
    });
    const keyFile = await device.writePrivateKey(encodeWgKey(generateNodeKey().secretKey));
    const desired = (peers: DesiredPeer[]) => ({ privateKeyFile: keyFile, listenPort: 51820, peers });
    const peers = Array.from({ length: PEERS }, (_, i) => peer(i + 2));
    const full: number[] = [];
    const one: number[] = [];
    let commands = 0;
    for (let r = 0; r < RUNS; r++) {
      await device.apply(desired([]));
      const t0 = performance.now();
      const res = await device.apply(desired(peers));
      full.push(performance.now() - t0);
      commands = res.commands;
    }
    const extra = peer(PEERS + 10);
    for (let r = 0; r < RUNS * 2; r++) {
      const t0 = performance.now();
      await device.apply(desired(r % 2 === 0 ? [...peers, extra] : peers));
      one.push(performance.now() - t0);
    }
    await device.destroy();
    return {
      peers: PEERS,
      runs: RUNS,
      fromEmptyMs: summarize(full),
      wgSetCalls: commands,
      onePeerChangeMs: summarize(one),
    };
  } finally {
    await topo.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function iperf(lab: MeshLab, from: string, to: string, address: string): Promise<number> {
  const server = lab.topo.spawn(to, 'iperf3', ['-s', '-1', '-B', address]);
  await until(
    'iperf3 server',
    async () => (await lab.topo.exec(to, 'ss', ['-ltn'])).includes(`${address}:5201`),
    5000,
    50,
  );
  const out = await lab.topo.exec(from, 'iperf3', ['-c', address, '-t', String(SECONDS), '-J'], {
    timeoutMs: (SECONDS + 20) * 1000,
  });
  server.kill();
  return JSON.parse(out).end.sum_received.bits_per_second / 1e6;
}

async function rtt(lab: MeshLab, from: string, address: string): Promise<number> {
  const out = await lab.topo.exec(from, 'ping', ['-c', '20', '-i', '0.2', '-q', address], {
    timeoutMs: 30_000,
  });
  const m = /= [\d.]+\/([\d.]+)\//.exec(out);
  return m ? Number(m[1]) : Number.NaN;
}

/** a and b as meshgate agents, plus the same kind of tunnel set up by hand beside it. */
async function meshBench(withRelay: boolean, withThroughput: boolean): Promise<Record<string, unknown>> {
  buildOnce();
  const lab = new MeshLab(new Topology());
  try {
    const addr = await star(lab.topo, ['coord', 'a', 'b']);
    await lab.startCoordinator('coord', addr.coord!);
    const key = lab.authKey('bench', { reusable: true });
    lab.startAgent('a', 'a', { keyFile: key });
    lab.startAgent('b', 'b', { keyFile: key });
    await lab.waitForPeer('a', 'b');
    const ipB = await lab.meshIp('b');
    await until(
      'mesh ping',
      async () => Boolean(await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '1', ipB])),
      20_000,
    );
    const result: Record<string, unknown> = {};

    if (withThroughput) {
      // The hand-made tunnel: same wireguard-go, keys and addresses set with wg and ip only.
      const [ka, kb] = [generateNodeKey(), generateNodeKey()];
      const hand = { a: lab.topo.wgName(), b: lab.topo.wgName() };
      for (const [h, own, other, ip, port] of [
        ['a', ka, kb, '10.77.0.1', 51901],
        ['b', kb, ka, '10.77.0.2', 51902],
      ] as const) {
        const dev = hand[h];
        lab.topo.spawn(h, 'wireguard-go', ['-f', dev]);
        await until(
          `${dev} up`,
          async () => Boolean(await lab.topo.exec(h, 'ip', ['link', 'show', dev])),
          5000,
          50,
        );
        const keyFile = join(lab.dir, `${dev}.key`);
        writeFileSync(keyFile, encodeWgKey(own.secretKey), { mode: 0o600 });
        await lab.topo.exec(h, 'wg', ['set', dev, 'private-key', keyFile, 'listen-port', String(port)]);
        const peerAddr = h === 'a' ? `${addr.b}:51902` : `${addr.a}:51901`;
        await lab.topo.exec(h, 'wg', [
          'set',
          dev,
          'peer',
          encodeWgKey(other.publicKey),
          'allowed-ips',
          '10.77.0.0/24',
          'endpoint',
          peerAddr,
        ]);
        await lab.topo.exec(h, 'ip', ['addr', 'add', `${ip}/24`, 'dev', dev]);
        await lab.topo.exec(h, 'ip', ['link', 'set', dev, 'mtu', '1280', 'up']);
      }
      await until(
        'hand-made tunnel',
        async () => Boolean(await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '1', '10.77.0.2'])),
        10_000,
      );
      const meshgate: number[] = [];
      const byHand: number[] = [];
      for (let r = 0; r < 3; r++) {
        meshgate.push(await iperf(lab, 'a', 'b', ipB));
        byHand.push(await iperf(lab, 'a', 'b', '10.77.0.2'));
      }
      const m = summarize(meshgate).p50;
      const h = summarize(byHand).p50;
      result.throughput = {
        seconds: SECONDS,
        rounds: 3,
        meshgateMbitPerS: round(m),
        byHandMbitPerS: round(h),
        ratio: round(m / h, 3),
        directRttMs: await rtt(lab, 'a', ipB),
      };
    }

    if (withRelay) {
      const directRtt = await rtt(lab, 'a', ipB);
      await lab.topo.exec('net', 'nft', ['-f', '-'], {
        input: `table inet block {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n  ip saddr { ${addr.a}, ${addr.b} } ip daddr { ${addr.a}, ${addr.b} } meta l4proto udp drop\n }\n}\n`,
      });
      // Existing sessions notice the block only when the handshake fails; restart both agents' paths.
      await lab.stopAgent('a');
      await lab.stopAgent('b');
      lab.startAgent('a', 'a', { keyFile: key });
      lab.startAgent('b', 'b', { keyFile: key });
      await until(
        'relayed path',
        async () => (await lab.status('a')).peers[0]?.path === 'relay',
        60_000,
        500,
      );
      await until(
        'ping through the relay',
        async () => Boolean(await lab.topo.exec('a', 'ping', ['-c', '1', '-W', '1', ipB])),
        30_000,
      );
      const relayRtt = await rtt(lab, 'a', ipB);
      const relayed: number[] = [];
      for (let r = 0; r < 2; r++) relayed.push(await iperf(lab, 'a', 'b', ipB));
      result.relay = {
        seconds: SECONDS,
        relayedMbitPerS: round(summarize(relayed).p50),
        directRttMs: directRtt,
        relayedRttMs: relayRtt,
        addedRttMs: round(relayRtt - directRtt, 3),
        coordinatorLimitBytesPerS: 4 * 1024 * 1024,
      };
    }
    return result;
  } finally {
    await lab.destroy();
  }
}

const results: Record<string, unknown> = {};
if (only.has('apply')) {
  log(`applying ${PEERS} peers to wireguard-go, ${RUNS} runs`);
  results.apply = await applyBench();
}
if (only.has('throughput') || only.has('relay')) {
  log('meshgate tunnel vs. hand-made tunnel, then through the relay');
  Object.assign(results, await meshBench(only.has('relay'), only.has('throughput')));
}
process.stdout.write(
  `${JSON.stringify({ benchmark: 'dataplane', machine: machineInfo(), inputs: values, results }, null, 2)}\n`,
);
const s = results as {
  apply?: { fromEmptyMs: { p50: number }; onePeerChangeMs: { p50: number } };
  throughput?: { meshgateMbitPerS: number; byHandMbitPerS: number; ratio: number };
  relay?: { relayedMbitPerS: number; addedRttMs: number };
};
if (s.apply)
  log(`apply ${PEERS} peers: ${s.apply.fromEmptyMs.p50} ms; one change: ${s.apply.onePeerChangeMs.p50} ms`);
if (s.throughput)
  log(
    `throughput: meshgate ${s.throughput.meshgateMbitPerS} Mbit/s, by hand ${s.throughput.byHandMbitPerS} Mbit/s (${s.throughput.ratio})`,
  );
if (s.relay) log(`relay: ${s.relay.relayedMbitPerS} Mbit/s, +${s.relay.addedRttMs} ms RTT`);
