// Two hosts (network namespaces a and b) joined by a veth pair, each running the agent's data plane
// on wireguard-go. Checks what an operator would see: the mesh carries traffic, an unrelated netmap
// change does not disturb an existing session, the firewall closes public SSH while SSH over the
// mesh works, and a crashed wireguard-go comes back with its configuration.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { BackendEvent } from '../../agent/dataplane/backend.js';
import type { DesiredPeer } from '../../agent/dataplane/reconcile.js';
import { WireGuardDevice } from '../../agent/dataplane/wireguard.js';
import { applyFirewall, removeFirewall } from '../../agent/firewall/nftables.js';
import { encodeWgKey, generateNodeKey } from '../../proto/keys.js';
import { Topology, waitForOutput } from './harness/netns.js';
import { requireTools } from './harness/tools.js';

const PORT = 51820;
const A = { veth: '198.51.100.1', v4: '100.64.0.1', v6: 'fd7a:115c:a1e0::1' };
const B = { veth: '198.51.100.2', v4: '100.64.0.2', v6: 'fd7a:115c:a1e0::2' };

// Prints one word per outcome instead of failing, so a test can assert refused vs. reachable.
const CLIENT = `
const s = require('node:net').connect({ host: process.argv[1], port: Number(process.argv[2]), timeout: 1500 });
let got = '';
s.on('data', (d) => { got += d; });
s.on('end', () => { console.log('open:' + got.trim()); process.exit(0); });
s.on('timeout', () => { console.log('timeout'); process.exit(0); });
s.on('error', (e) => { console.log(e.code); process.exit(0); });
`;

const SERVER = `
const net = require('node:net');
for (const port of process.argv.slice(1).map(Number)) {
  net.createServer((c) => c.end('hello ' + port + '\\n'))
    .listen({ host: '::', port, ipv6Only: false }, () => console.log('listening ' + port));
}
`;

test('data plane and firewall between two network namespaces', async (t) => {
  if (!requireTools(t, ['ip', 'wg', 'wireguard-go', 'nft', 'ping', 'sysctl'])) return;

  const topo = new Topology();
  const devices: WireGuardDevice[] = [];
  const stateDir = await mkdtemp(join(tmpdir(), 'meshgate-e2e-'));
  t.after(async () => {
    for (const d of devices) await d.destroy().catch(() => {});
    await topo.destroy();
    await rm(stateDir, { recursive: true, force: true });
  });

  await topo.addHost('a');
  await topo.addHost('b');
  await topo.link('a', 'b', { addrA: A.veth, addrB: B.veth, prefix: 24 });

  const keyA = generateNodeKey();
  const keyB = generateNodeKey();
  const pubA = encodeWgKey(keyA.publicKey);
  const pubB = encodeWgKey(keyB.publicKey);

  const events: BackendEvent[] = [];
  let restarted: () => void = () => {};
  const restartedA = new Promise<void>((resolve) => {
    restarted = resolve;
  });

  const devA = await WireGuardDevice.create({
    name: topo.wgName(),
    backend: 'wireguard-go',
    netns: topo.ns('a'),
    stateDir: join(stateDir, 'a'),
    onEvent: (e) => events.push(e),
    onRestart: () => restarted(),
  });
  devices.push(devA);
  // `auto` falls back to wireguard-go where the kernel has no WireGuard, as on most CI machines.
  const devB = await WireGuardDevice.create({
    name: topo.wgName(),
    backend: 'auto',
    netns: topo.ns('b'),
    stateDir: join(stateDir, 'b'),
  });
  devices.push(devB);

  const keyFileA = await devA.writePrivateKey(encodeWgKey(keyA.secretKey));
  const keyFileB = await devB.writePrivateKey(encodeWgKey(keyB.secretKey));
  const peerB: DesiredPeer = {
    publicKey: pubB,
    allowedIps: [`${B.v4}/32`, `${B.v6}/128`],
    endpoint: `${B.veth}:${PORT}`,
  };
  const peerA: DesiredPeer = {
    publicKey: pubA,
    allowedIps: [`${A.v4}/32`, `${A.v6}/128`],
    endpoint: `${A.veth}:${PORT}`,
  };
  const desiredA = { privateKeyFile: keyFileA, listenPort: PORT, peers: [peerB] };

  await devA.configureLink({ addresses: [`${A.v4}/32`, `${A.v6}/128`] });
  await devB.configureLink({ addresses: [`${B.v4}/32`, `${B.v6}/128`] });
  await devA.apply(desiredA);
  await devB.apply({ privateKeyFile: keyFileB, listenPort: PORT, peers: [peerA] });

  const ping = (from: string, to: string) => topo.exec(from, 'ping', ['-c', '1', '-W', '2', to]);
  const connect = async (from: string, host: string, port: number) =>
    (await topo.exec(from, process.execPath, ['-e', CLIENT, host, String(port)])).trim();

  await t.test('the key file is private and stays out of the dump', async () => {
    const { mode } = await stat(keyFileA);
    assert.equal(mode & 0o777, 0o600);
    assert.equal((await readFile(keyFileA, 'utf8')).trim(), encodeWgKey(keyA.secretKey));
    const shown = await devA.show();
    assert.equal(shown.publicKey, pubA);
    assert.equal(shown.listenPort, PORT);
    assert.ok(!JSON.stringify(shown).includes(encodeWgKey(keyA.secretKey)));
  });

  await t.test('a pings b over the mesh, IPv4 and IPv6', async () => {
    await ping('a', B.v4);
    await ping('a', B.v6);
  });

  await t.test('applying the same configuration again changes nothing', async () => {
    assert.deepEqual(await devA.apply(desiredA), { interfaceArgs: [], ops: [], commands: 0 });
    assert.deepEqual(await devA.configureLink({ addresses: [`${A.v4}/32`, `${A.v6}/128`] }), []);
  });

  await t.test('an unrelated new peer does not reset the session with b', async () => {
    const before = (await devA.show()).peers.find((p) => p.publicKey === pubB);
    assert.ok(before && before.latestHandshake > 0, 'a has a handshake with b');
    // A forced re-handshake would then carry a later timestamp (whole seconds).
    await sleep(1100);
    const extra = { publicKey: encodeWgKey(generateNodeKey().publicKey), allowedIps: ['100.64.0.3/32'] };
    const result = await devA.apply({ ...desiredA, peers: [peerB, extra] });
    assert.deepEqual(result.ops, [
      { kind: 'add', publicKey: extra.publicKey, allowedIps: ['100.64.0.3/32'] },
    ]);
    await ping('a', B.v4);
    const after = (await devA.show()).peers.find((p) => p.publicKey === pubB);
    assert.ok(after);
    assert.equal(after.latestHandshake, before.latestHandshake);
    assert.ok(after.rxBytes > before.rxBytes, 'counters continue, so the peer was not re-created');
    assert.equal((await devA.show()).peers.length, 2);
  });

  await t.test('firewall in b: SSH only over the mesh, and only what the filter allows', async () => {
    const server = topo.spawn('b', process.execPath, ['-e', SERVER, '22', '8080']);
    await waitForOutput(server, /listening 22[\s\S]*listening 8080|listening 8080[\s\S]*listening 22/);
    // Without the firewall everything is reachable, so the refusals below are the firewall's doing.
    assert.equal(await connect('a', B.veth, 22), 'open:hello 22');
    assert.equal(await connect('a', B.v4, 8080), 'open:hello 8080');

    await applyFirewall(
      {
        meshInterface: devB.name,
        filter: [
          {
            srcCidrs: [`${A.v4}/32`],
            dstCidrs: [`${B.v4}/32`],
            ports: [{ first: 22, last: 22 }],
            protocols: ['tcp'],
          },
        ],
        lockdownPorts: [22],
      },
      { netns: topo.ns('b') },
    );
    assert.equal(await connect('a', B.v4, 22), 'open:hello 22');
    assert.equal(await connect('a', B.veth, 22), 'timeout');
    assert.equal(await connect('a', B.v4, 8080), 'timeout');
    assert.equal(await connect('a', B.v6, 22), 'timeout', 'the filter allows IPv4 from a only');
    await assert.rejects(ping('a', B.v4), 'ICMP over the mesh is not in the filter');
    assert.equal(await connect('a', B.veth, 8080), 'open:hello 8080', 'lockdown closes port 22 only');

    await removeFirewall({ netns: topo.ns('b') });
    assert.doesNotMatch(await topo.exec('b', 'nft', ['list', 'tables']), /meshgate/);
    await removeFirewall({ netns: topo.ns('b') });
    assert.equal(await connect('a', B.veth, 22), 'open:hello 22');
    await ping('a', B.v4);
  });

  await t.test('a killed wireguard-go is restarted and configured again', async () => {
    const pids = (await topo.exec('a', 'ip', ['netns', 'pids', topo.ns('a')])).split('\n').filter(Boolean);
    const wgPids = [];
    for (const pid of pids) {
      const comm = await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '');
      if (comm.trim() === 'wireguard-go') wgPids.push(Number(pid));
    }
    assert.equal(wgPids.length, 1);
    process.kill(wgPids[0]!, 'SIGKILL');
    const timeout = new AbortController();
    await Promise.race([
      restartedA,
      sleep(10_000, undefined, { signal: timeout.signal }).then(() =>
        assert.fail(`no restart within 10 s: ${JSON.stringify(events)}`),
      ),
    ]).finally(() => timeout.abort());
    assert.deepEqual(
      events.map((e) => e.kind),
      ['exited', 'restarted'],
    );
    const shown = await devA.show();
    assert.equal(shown.listenPort, PORT);
    assert.equal(shown.publicKey, pubA);
    assert.equal(shown.peers.length, 2);
    await ping('a', B.v4);
    await ping('a', B.v6);
  });
});
