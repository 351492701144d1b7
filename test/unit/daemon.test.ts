// The agent daemon's lifecycle against a coordinator in this process (real TLS, real SQLite), with
// stand-ins for ip, wg and nft (fake-net-tools.ts): what `meshgate status` shows, what the firewall
// holds after stop, down, up and logout, what a damaged state dir says, and that a restart without
// the coordinator comes back from the cached netmap. Real WireGuard and nftables: test/e2e.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  type Stats,
  unwatchFile,
  watchFile,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import pino from 'pino';
import { ControlClient } from '../../agent/control/client.js';
import { StateDir } from '../../agent/control/identity.js';
import { AgentError } from '../../agent/control/session.js';
import { Agent, type AgentOptions } from '../../agent/daemon.js';
import { agentDown, agentLogout, agentStatus, agentUp } from '../../agent/localapi/client.js';
import type { AgentStatus } from '../../agent/localapi/types.js';
import { readRecord, writeRecord } from '../../agent/update/record.js';
import { describeError } from '../../cli/errors.js';
import { SyncRequestSchema } from '../../proto/gen/meshgate/v1/control_pb.js';
import { encodeWgKey, generateNodeKey } from '../../proto/keys.js';
import { VERSION } from '../../release/version.js';
import { agentMetrics } from '../fixtures/agent-metrics.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from '../integration/harness.js';
import { type FakeNetTools, installFakeNetTools } from './fake-net-tools.js';

async function until(what: string, pred: () => boolean | Promise<boolean>, ms = 8000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface Log {
  level: number;
  msg: string;
  [field: string]: unknown;
}

interface Node {
  agent: Agent;
  opts: AgentOptions;
  logs: Log[];
  /** Called with each log line as it is written, while the daemon is where the line says. */
  onLog: ((line: Log) => void) | null;
  status(): Promise<AgentStatus>;
  /** Stops this daemon and starts another on the same state dir, as a restart of the service does. */
  restart(over?: Partial<AgentOptions>): Promise<Node>;
}

const IFACE = 'mgt0';

describe('agent daemon', () => {
  let t: TestCoordinator;
  let tools: FakeNetTools;
  let root: string;
  const running: Agent[] = [];

  before(async () => {
    tools = installFakeNetTools();
    root = mkdtempSync(join(tmpdir(), 'meshgate-daemon-'));
    t = await startTestCoordinator();
  });
  after(async () => {
    for (const a of running) await a.stop();
    await t.close();
    tools.uninstall();
    rmSync(root, { recursive: true, force: true });
  });

  let dirs = 0;
  function options(over: Partial<AgentOptions> = {}): AgentOptions {
    const dir = join(root, `n${++dirs}`);
    return {
      coordinator: t.url,
      fingerprint: t.fingerprint,
      authKey: () => {
        throw new Error('no auth key');
      },
      stateDir: join(dir, 'state'),
      interfaceName: IFACE,
      backend: 'kernel',
      lockdownPorts: [22],
      advertiseTags: [],
      advertiseRoutes: [],
      socket: join(dir, 'agent.sock'),
      log: pino({ level: 'silent' }),
      tickMs: 3_600_000,
      nodeKeyLifetimeMs: 0,
      ...over,
    };
  }

  /** Options of an agent that reads its auth key from a key file, written now with a fresh key. */
  async function keyFileOptions(file: string, over: Partial<AgentOptions>): Promise<AgentOptions> {
    const keyFile = join(root, file);
    writeFileSync(keyFile, `${await authKey(t, 'dc')}\n`, { mode: 0o600 });
    return options({
      authKey: () => readFileSync(keyFile, 'utf8').trim(),
      authKeyFile: keyFile,
      lockdownWhenRevoked: 'release',
      ...over,
    });
  }

  async function daemon(opts: AgentOptions, onLog: Node['onLog'] = null): Promise<Node> {
    const logs: Log[] = [];
    const sink = new Writable({
      write(chunk, _enc, cb) {
        const line = JSON.parse(String(chunk)) as Log;
        logs.push(line);
        node.onLog?.(line);
        cb();
      },
    });
    const full = { ...opts, log: pino({ level: 'debug' }, sink) };
    const agent = new Agent(full);
    running.push(agent);
    const node: Node = {
      agent,
      opts: full,
      logs,
      onLog,
      status: () => agentStatus(full.socket),
      async restart(over = {}) {
        await agent.stop();
        return daemon({ ...full, ...over });
      },
    };
    await agent.start();
    return node;
  }

  const said = (n: Node, msg: RegExp | string) =>
    n.logs.some((l) => (typeof msg === 'string' ? l.msg === msg : msg.test(l.msg)));

  const unreachable = 'grpcs://127.0.0.1:1';
  const cacheOf = (n: Node) => join(n.opts.stateDir, 'netmap.bin');
  const nodes = async () => (await t.admin.call('listNodes', { project: 'dc' })).nodes;
  const since = (from: number) => tools.commands().slice(from);
  /** Writes a table the way an earlier agent would have left it. */
  const leftoverTable = () =>
    spawnSync('nft', ['-f', '-'], { input: 'table inet meshgate {\n  chain input {\n  }\n}\n' });

  let peer: SimAgent;
  let web: Node;

  it('joins, configures the peers and locks SSH down, and shows it in status and metrics', async () => {
    peer = new SimAgent(t.url, t.fingerprint);
    await peer.register(await authKey(t, 'dc'), 'db-1', {
      endpoints: ['192.0.2.10:41641'],
      routes: ['10.20.0.0/16'],
    });
    await peer.connect();
    const key = await authKey(t, 'dc');
    web = await daemon(options({ authKey: () => key, hostname: 'web-1' }));
    await until('connected', async () => (await web.status()).state.kind === 'connected');
    await until('the peer', async () => (await web.status()).peers.length === 1);
    await until('the firewall', async () => (await web.status()).firewall.kernel === 'as-applied');
    const s = await web.status();
    const [self] = (await nodes()).filter((n) => n.name === 'web-1');
    assert.deepEqual(
      { ...s.self, ipAddresses: [...s.self.ipAddresses] },
      {
        id: self!.id,
        name: 'web-1',
        project: 'dc',
        ipAddresses: self!.ipAddresses,
        tags: [],
        ephemeral: false,
        nodeKey: self!.nodeKey,
      },
    );
    assert.deepEqual(s.state, { kind: 'connected', detail: '', message: 'joined and connected' });
    assert.deepEqual(s.coordinator, { url: t.url, state: 'connected', error: '' });
    assert.equal(s.interface.name, IFACE);
    assert.equal(s.interface.backend, 'kernel');
    assert.ok(s.interface.listenPort >= 41641, String(s.interface.listenPort));
    assert.ok(s.interface.present);
    assert.deepEqual(
      s.peers.map((p) => [p.name, p.online, p.version, p.path]),
      [['db-1', true, '0.1.0', '']],
    );
    assert.notEqual(s.peers[0]!.lastSeen, '');
    assert.deepEqual(s.selfUpdate, { enabled: false, failed: null });
    assert.deepEqual(s.firewall, {
      kernel: 'as-applied',
      configuredPorts: [22],
      restores: 0,
      lastRestore: '',
    });
    assert.deepEqual(s.lockdownPorts, [22]);
    assert.match(tools.ruleset() ?? '', /^ {4}iifname != \{ "lo", "mgt0" \} tcp dport \{ 22 \} drop$/m);
    assert.match(tools.ruleset() ?? '', /meta l4proto \{ tcp, udp \} accept/);
    const peerKey = encodeWgKey(peer.nodeKey.publicKey);
    const set = tools
      .commands()
      .find((c) => c.startsWith(`wg set ${IFACE}`) && c.includes(`peer ${peerKey}`));
    assert.ok(set, tools.commands().join('\n'));
    assert.match(set, / endpoint 192\.0\.2\.10:41641 /);
    assert.ok(said(web, 'mesh is up: public SSH locked down'));
    assert.ok(said(web, 'registered'));
    const states = web.logs.filter((l) => l.state).map((l) => [l.level, l.state, l.msg]);
    assert.deepEqual(states, [
      [30, 'not-joined', 'never joined: registering with the auth key'],
      [30, 'connecting', 'joined: connecting to the coordinator'],
      [30, 'connected', 'joined and connected'],
    ]);
    assert.equal(s.dns.domain, 'dc.mesh');
    assert.deepEqual([self!.version, self!.lockdownPorts], [VERSION, [22]]);
    // The identity is kept for the next start.
    assert.deepEqual(new StateDir(web.opts.stateDir).load().node, {
      id: self!.id,
      name: 'web-1',
      project: 'dc',
      ipAddresses: self!.ipAddresses,
    });
    await until('the netmap cached', () => existsSync(cacheOf(web)));
    const m = await agentMetrics(web.opts.socket);
    assert.match(m, /^meshgate_agent_node_state\{state="connected"\} 1$/m);
    assert.match(m, /^meshgate_agent_firewall_restores_total 0$/m);
    assert.match(m, /^meshgate_agent_interface_restores_total 0$/m);
    assert.match(m, /^meshgate_agent_node_key_rotations_total 0$/m);
  });

  it('shows what WireGuard reports for a peer', async () => {
    const peerKey = encodeWgKey(peer.nodeKey.publicKey);
    tools.setPeers([
      [peerKey, '(none)', '192.0.2.10:41641', '100.64.0.2/32', '1767225600', '1024', '2048', 'off'],
    ]);
    try {
      const [p] = (await web.status()).peers;
      assert.deepEqual(
        [p?.endpoint, p?.lastHandshake, p?.rxBytes, p?.txBytes, p?.path],
        ['192.0.2.10:41641', '2026-01-01T00:00:00.000Z', 1024, 2048, 'direct'],
      );
    } finally {
      tools.setPeers([]);
    }
  });

  it("puts the policy's ports, approved routes and the desired version into effect", async () => {
    await t.admin.call('setPolicy', {
      project: 'dc',
      policy: JSON.stringify({
        acls: [
          { action: 'accept', src: ['*'], dst: ['*:22,8000-8080'] },
          { action: 'accept', src: ['*'], dst: ['*:53'], proto: 'udp' },
        ],
      }),
    });
    await until('the policy in the firewall', () => /dport \{ 53 \} accept/.test(tools.ruleset() ?? ''));
    const table = tools.ruleset() ?? '';
    assert.match(table, /meta l4proto \{ tcp, udp \} th dport \{ 22, 8000-8080 \} accept/);
    assert.match(table, /meta l4proto \{ udp \} th dport \{ 53 \} accept/);
    assert.doesNotMatch(table, /tcp, udp \} th dport \{ 53 \}/, 'udp only');
    assert.equal(
      web.logs.filter((l) => l.msg === 'mesh is up: public SSH locked down').length,
      1,
      'said when the lockdown starts, not at every change',
    );
    const writes = () => tools.commands().filter((c) => c === 'nft -f -').length;
    const before = writes();
    peer.stream!.write(
      create(SyncRequestSchema, {
        message: { case: 'endpoints', value: { endpoints: ['192.0.2.11:41641'] } },
      }),
    );
    await until('the new endpoint', () =>
      tools.commands().some((c) => c.includes(' endpoint 192.0.2.11:41641 ')),
    );
    assert.equal(writes(), before, 'a netmap that leaves the firewall as it is does not rewrite it');

    await t.admin.call('setNodeRoutes', { id: peer.id, project: 'dc', approvedRoutes: ['10.20.0.0/16'] });
    await until('the route', () =>
      tools.commands().includes(`ip -4 route replace 10.20.0.0/16 dev ${IFACE}`),
    );
    await t.admin.call('setDesiredVersion', {
      project: 'dc',
      version: '9.9.9',
      artifactUrl: 'https://releases.example/meshgate-9.9.9.tar.gz',
      sha256: 'a'.repeat(64),
      maxUnavailable: 10,
    });
    await until('the desired version', async () => (await web.status()).desiredVersion === '9.9.9');
    assert.deepEqual((await web.status()).desiredRelease, {
      version: '9.9.9',
      artifactUrl: 'https://releases.example/meshgate-9.9.9.tar.gz',
      sha256: 'a'.repeat(64),
      manifest: '',
      allowDowngrade: false,
    });
  });

  it('restores a firewall table that someone removed or changed, and counts it', async () => {
    const table = tools.ruleset();
    tools.tamper(null);
    await until('restored', async () => (await web.status()).firewall.restores === 1);
    assert.equal(tools.ruleset(), table);
    assert.ok(said(web, 'the nftables table was removed by someone else; restored it'));
    tools.tamper('table inet meshgate {\n  chain input {\n  }\n}\n');
    await until('restored again', async () => (await web.status()).firewall.restores === 2);
    assert.equal(tools.ruleset(), table);
    assert.ok(said(web, 'the nftables table was changed by someone else; restored it'));
    const s = await web.status();
    assert.notEqual(s.firewall.lastRestore, '');
    assert.equal(s.firewall.kernel, 'as-applied');
    assert.match(await agentMetrics(web.opts.socket), /^meshgate_agent_firewall_restores_total 2$/m);
  });

  it('sends its node key again when the coordinator holds another one', async () => {
    const ours = (await web.status()).self.nodeKey;
    const identity = new StateDir(web.opts.stateDir).load();
    const racing = new ControlClient({
      url: t.url,
      fingerprint: t.fingerprint,
      machineSecretKey: identity.machine.secretKey,
    });
    racing.nodeId = identity.node!.id;
    try {
      await racing.rotateNodeKey(generateNodeKey().publicKey);
    } finally {
      racing.close();
    }
    await until(
      'our key back',
      async () => (await nodes()).find((n) => n.name === 'web-1')?.nodeKey === ours,
    );
    assert.ok(said(web, 'the coordinator has another node key; sending ours'));
  });

  it('keeps the firewall and the interface on stop(), and closes its socket', async () => {
    // A netmap that came in just before the stop is cached by the stop, not lost with its timer.
    await t.admin.call('renameNode', { id: peer.id, project: 'dc', name: 'db-one' });
    await until('the rename', async () => (await web.status()).peers[0]?.name === 'db-one');
    const table = tools.ruleset();
    const from = tools.commands().length;
    const stopped = web.agent.wait();
    await web.agent.stop();
    assert.equal(await stopped, 'stopped');
    assert.equal(await web.agent.wait(), 'stopped', 'also when asked afterwards');
    assert.equal(tools.ruleset(), table, 'public SSH stays locked down while no agent runs');
    assert.deepEqual(
      since(from).filter((c) => c.startsWith('ip link del') || c.startsWith('nft -f')),
      [],
    );
    assert.ok(!existsSync(web.opts.socket), 'the local API is gone');
    await until(
      'the coordinator sees it go',
      async () => (await nodes()).find((n) => n.name === 'web-1')?.online === false,
    );
  });

  it('comes back from the cached netmap while the coordinator is away', async () => {
    const from = tools.commands().length;
    leftoverTable();
    const n = await daemon({ ...web.opts, coordinator: unreachable });
    await until('unreachable', async () => (await n.status()).state.kind === 'unreachable');
    const s = await n.status();
    assert.notEqual(s.state.detail, '');
    assert.equal(s.coordinator.state, 'offline');
    assert.deepEqual(
      s.peers.map((p) => p.name),
      ['db-one'],
    );
    assert.equal(s.self.name, 'web-1', 'who it is, from the cache');
    assert.ok(said(n, 'restoring peers from the cached netmap'));
    assert.deepEqual(
      n.logs.filter((l) => l.state).map((l) => [l.level, l.state]),
      [
        [30, 'connecting'],
        [40, 'unreachable'],
      ],
    );
    const peerKey = encodeWgKey(peer.nodeKey.publicKey);
    await until('the peer configured', () => since(from).some((c) => c.includes(`peer ${peerKey}`)));
    await until('the firewall', async () => (await n.status()).firewall.kernel === 'as-applied');
    assert.match(tools.ruleset() ?? '', /th dport \{ 22, 8000-8080 \} accept/, 'the policy, from the cache');
    // Down and up again while the coordinator is still away: the mesh's firewall comes back from
    // the cache too, not only once the coordinator answers.
    await agentDown(n.opts.socket);
    assert.doesNotMatch(tools.ruleset() ?? '', /l4proto/, 'down: the lockdown alone');
    await agentUp(n.opts.socket);
    await until('the policy from the cache again', () =>
      /th dport \{ 22, 8000-8080 \} accept/.test(tools.ruleset() ?? ''),
    );
    assert.equal((await n.status()).state.kind, 'unreachable');
    await n.agent.stop();
  });

  it('reports a damaged netmap cache, discards it and runs without it', async () => {
    writeFileSync(cacheOf(web), 'not a netmap');
    const n = await daemon({ ...web.opts, coordinator: unreachable });
    await until('unreachable', async () => (await n.status()).state.kind === 'unreachable');
    const warning = n.logs.find((l) => l.msg.startsWith(`${cacheOf(web)} is damaged (`));
    assert.ok(warning, JSON.stringify(n.logs.map((l) => l.msg)));
    assert.equal(warning.level, 40, 'a warning');
    assert.match(warning.msg, /removed it, peers come back with the next netmap from the coordinator$/);
    assert.ok(!existsSync(cacheOf(web)));
    assert.deepEqual((await n.status()).peers, []);
    await n.agent.stop();
  });

  it('stops at start with one line naming node.json when it is truncated', async () => {
    const file = join(web.opts.stateDir, 'node.json');
    const saved = readFileSync(file, 'utf8');
    writeFileSync(file, saved.slice(0, 20));
    const agent = new Agent({ ...web.opts, log: pino({ level: 'silent' }) });
    const from = tools.commands().length;
    const err = await agent
      .start()
      .then(
        () => assert.fail('started with a truncated node.json'),
        (e: unknown) => e,
      )
      .finally(() => agent.stop());
    writeFileSync(file, saved);
    const line = describeError(err);
    assert.equal(line.split('\n').length, 1, line);
    assert.ok(line.startsWith(`${file} is damaged (`), line);
    assert.deepEqual(since(from), [], 'refused before anything started');
    assert.ok(!existsSync(web.opts.socket), 'no local API either');
  });

  it('goes down keeping the lockdown, stays down across a restart, and comes up again', async () => {
    web = await daemon(web.opts);
    await until('connected', async () => (await web.status()).state.kind === 'connected');
    await until('the firewall', async () => (await web.status()).firewall.kernel === 'as-applied');
    let from = tools.commands().length;
    await agentDown(web.opts.socket);
    let s = await web.status();
    assert.deepEqual([s.state.kind, s.state.detail], ['down', '']);
    assert.equal(s.coordinator.state, 'stopped');
    assert.deepEqual(s.dns, { address: '', domain: 'dc.mesh', resolved: false });
    assert.deepEqual([s.interface.backend, s.interface.listenPort, s.interface.present], ['', 0, false]);
    assert.deepEqual(s.peers, []);
    assert.ok(since(from).includes(`ip link del dev ${IFACE}`), 'the interface is gone');
    const table = tools.ruleset() ?? '';
    assert.match(table, /tcp dport \{ 22 \} drop/, 'public SSH stays locked down');
    assert.deepEqual(
      table.split('\n').filter((l) => / accept$/.test(l) && !/established/.test(l)),
      [],
      'and nothing is open over the mesh',
    );
    await until(
      'offline at the coordinator',
      async () => (await nodes()).find((n) => n.name === 'web-1')?.online === false,
    );

    from = tools.commands().length;
    web = await web.restart();
    s = await web.status();
    assert.equal(s.state.kind, 'down');
    assert.ok(!since(from).some((c) => c.startsWith('ip link add')), 'no interface while down');
    assert.match(tools.ruleset() ?? '', /tcp dport \{ 22 \} drop/);
    // A restart into another release while down has no interface to hand on.
    const stopped = web.agent.wait();
    await web.agent.restartForUpdate();
    assert.equal(await stopped, 'restart');
    web = await daemon(web.opts);
    assert.equal((await web.status()).state.kind, 'down');

    tools.withoutWireGuard(true);
    try {
      await assert.rejects(agentUp(web.opts.socket), /kernel has no WireGuard support/);
    } finally {
      tools.withoutWireGuard(false);
    }
    s = await web.status();
    assert.deepEqual([s.state.kind, s.state.detail], ['down', ''], 'a failed up stays down');
    assert.match(tools.ruleset() ?? '', /tcp dport \{ 22 \} drop/);
    assert.ok(existsSync(join(web.opts.stateDir, 'down')), 'also across a restart');

    const history = tools.rulesetHistory().length;
    await agentUp(web.opts.socket);
    await until('connected', async () => (await web.status()).state.kind === 'connected');
    await until('the peer', async () => (await web.status()).peers.length === 1);
    await until('the mesh open again', () => /l4proto/.test(tools.ruleset() ?? ''));
    assert.ok(
      !tools.rulesetHistory().slice(history).includes('removed'),
      'public SSH stays locked down until the mesh takes over the table',
    );
    assert.ok(!existsSync(join(web.opts.stateDir, 'down')));
    from = tools.commands().length;
    await agentUp(web.opts.socket);
    // The guard may read the table meanwhile (its periodic check), and a netmap
    // arriving late the interface's addresses: reading changes nothing.
    const reads = (c: string) => c.startsWith('nft list') || c.split(' ').includes('show');
    assert.deepEqual(
      since(from).filter((c) => !reads(c)),
      [],
      'up while up changes nothing',
    );
  });

  it('keeps the interface and the firewall when it stops to restart into another release', async () => {
    const table = tools.ruleset();
    const from = tools.commands().length;
    const stopped = web.agent.wait();
    await web.agent.restartForUpdate();
    assert.equal(await stopped, 'restart');
    assert.equal(await web.agent.wait(), 'restart', 'also when asked afterwards');
    assert.equal(tools.ruleset(), table);
    assert.ok(!since(from).some((c) => c.startsWith('ip link del') || c.startsWith('nft -f')));
    web = await daemon(web.opts);
    await until('connected', async () => (await web.status()).state.kind === 'connected');
  });

  it('logs out: the coordinator forgets the node, the firewall goes, and it stays so across a restart', async () => {
    await agentLogout(web.opts.socket);
    assert.equal(
      (await nodes()).find((n) => n.name === 'web-1'),
      undefined,
    );
    assert.equal(tools.ruleset(), null, 'no lockdown without a node to reach the machine through');
    assert.ok(!existsSync(join(web.opts.stateDir, 'node.json')));
    let s = await web.status();
    assert.deepEqual([s.state.kind, s.state.detail], ['down', 'logged out']);
    assert.equal(s.self.id, '');
    assert.equal(s.self.nodeKey, '');
    leftoverTable();
    web = await web.restart();
    s = await web.status();
    assert.deepEqual([s.state.kind, s.state.detail], ['down', 'logged out']);
    assert.equal(tools.ruleset(), null);
    // Nothing left to log out of: a second logout only says so again.
    await agentLogout(web.opts.socket);
    assert.deepEqual((await web.status()).state.detail, 'logged out');
    await web.agent.stop();
  });

  it('logs out while down with one call of its own', async () => {
    const key = await authKey(t, 'dc');
    let n = await daemon(options({ authKey: () => key, hostname: 'idle-1', lockdownPorts: [] }));
    await until('connected', async () => (await n.status()).state.kind === 'connected');
    await until('the firewall', async () => (await n.status()).firewall.kernel === 'as-applied');
    await agentDown(n.opts.socket);
    assert.equal((await n.status()).state.message, 'down: the mesh is stopped until "meshgate up"');
    assert.equal(tools.ruleset(), null, 'without lockdown ports, down leaves no table');
    n = await n.restart();
    await agentLogout(n.opts.socket);
    assert.equal(
      (await nodes()).find((x) => x.name === 'idle-1'),
      undefined,
    );
    assert.deepEqual((await n.status()).state.detail, 'logged out');
    await n.agent.stop();
  });

  it('says why the first registration was refused and what to do, and stops', async () => {
    const keyFile = join(root, 'refused.key');
    writeFileSync(keyFile, 'mgk_not-a-key\n', { mode: 0o600 });
    for (const [file, fix] of [
      [keyFile, `write a new auth key to ${keyFile} and start the agent again`],
      [undefined, 'start the agent again with a new auth key'],
    ] as const) {
      const opts = options({ authKey: () => 'mgk_not-a-key', ...(file ? { authKeyFile: file } : {}) });
      const agent = new Agent(opts);
      const err = await agent.start().then(
        () => assert.fail('started with a refused auth key'),
        (e: unknown) => e as Error,
      );
      await agent.stop();
      assert.ok(err instanceof AgentError, String(err));
      assert.ok(err.message.startsWith('registration refused: '), err.message);
      assert.ok(err.message.endsWith(`; ${fix}`), err.message);
      assert.equal(describeError(err), err.message, 'one line, no stack');
    }
  });

  it('releases the lockdown while expired or deleted (release), and takes a new auth key from the key file', async () => {
    const n = await daemon(await keyFileOptions('release.key', { hostname: 'rel-1' }));
    const keyFile = n.opts.authKeyFile!;
    // The agent's watcher of the key file was there first: when this one is told of a change, the
    // agent has been told too.
    const seen: number[] = [];
    const watcher = (cur: Stats) => seen.push(cur.mtimeMs);
    watchFile(keyFile, { interval: 1000 }, watcher);
    const changeKeyFile = async (content: string | null) => {
      const before = seen.length;
      if (content === null) rmSync(keyFile);
      else writeFileSync(keyFile, content, { mode: 0o600 });
      await until('the change seen', () => seen.length > before);
    };
    const pickedUp = () =>
      n.logs.filter(
        (l) => l.msg === 'auth key file changed; registering with the new key' && l.file === keyFile,
      ).length;
    try {
      await until('connected', async () => (await n.status()).state.kind === 'connected');
      await until('locked down', () => /tcp dport \{ 22 \} drop/.test(tools.ruleset() ?? ''));
      await changeKeyFile(readFileSync(keyFile, 'utf8'));
      assert.equal(pickedUp(), 0, 'a connected node does not register again for a new key');
      // Written again just after a check: the next check, a second later, sees it (Node's default
      // is every 5 s, which would keep an expired node waiting that much longer for its new key).
      const written = Date.now();
      await changeKeyFile(readFileSync(keyFile, 'utf8'));
      assert.ok(Date.now() - written < 4000, `seen after ${Date.now() - written} ms`);

      const { id } = (await n.status()).self;
      await t.admin.call('expireNode', { id, project: 'dc' });
      await until('expired', async () => (await n.status()).state.kind === 'expired');
      const s = await n.status();
      assert.match(s.state.detail, /^auth key refused: /);
      assert.match(s.state.message, new RegExp(`^expired by an admin: write a new auth key to ${keyFile}`));
      assert.match(s.state.message, /lockdown released \(--lockdown-when-revoked release\)$/);
      await until('the lockdown released', () => tools.ruleset() === null);
      assert.ok(
        n.logs.some((l) => l.level === 40 && l.state === 'expired'),
        'a warning',
      );
      await changeKeyFile(null);
      assert.equal(pickedUp(), 0, 'a removed key file is no new key');

      await changeKeyFile(`${await authKey(t, 'dc')}\n`);
      await until('connected with the new key', async () => (await n.status()).state.kind === 'connected');
      assert.equal(pickedUp(), 1);
      await until('locked down again', () => /tcp dport \{ 22 \} drop/.test(tools.ruleset() ?? ''));

      await t.admin.call('deleteNode', { id, project: 'dc' });
      await until('deleted', async () => (await n.status()).state.kind === 'deleted');
      await until('the lockdown released', () => tools.ruleset() === null);
      await changeKeyFile(`${await authKey(t, 'dc')}\n`);
      await until('joined again with the new key', async () => (await n.status()).state.kind === 'connected');
      assert.equal(pickedUp(), 2);
      await until('locked down again', () => /tcp dport \{ 22 \} drop/.test(tools.ruleset() ?? ''));

      await agentDown(n.opts.socket);
      assert.equal(tools.ruleset(), null, 'released also while down');
    } finally {
      unwatchFile(keyFile, watcher);
      await n.agent.stop();
    }
  });

  it('keeps the lockdown of a deleted node (keep)', async () => {
    const key = await authKey(t, 'dc');
    const n = await daemon(options({ authKey: () => key, hostname: 'keep-1' }));
    await until('connected', async () => (await n.status()).state.kind === 'connected');
    await until('locked down', () => /tcp dport \{ 22 \} drop/.test(tools.ruleset() ?? ''));
    const { id } = (await n.status()).self;
    // The coordinator ends the stream of a deleted node, and the agent registers again to learn
    // why: meanwhile it is connecting, and the refused stream's reason is no detail of that.
    let reconnecting = null as Promise<AgentStatus> | null;
    n.onLog = (l) => {
      if (l.state === 'connecting') reconnecting ??= n.status();
    };
    await t.admin.call('deleteNode', { id, project: 'dc' });
    await until('deleted', async () => (await n.status()).state.kind === 'deleted');
    assert.ok(reconnecting, 'connecting again once the stream was refused');
    const during = await reconnecting;
    assert.deepEqual([during.state.kind, during.state.detail], ['connecting', '']);
    const s = await n.status();
    assert.match(s.state.message, /public SSH stays locked down \(--lockdown-when-revoked keep\)/);
    assert.ok(
      n.logs.some((l) => l.level === 40 && l.state === 'deleted'),
      'a warning',
    );
    assert.match(tools.ruleset() ?? '', /tcp dport \{ 22 \} drop/);
    assert.equal(s.firewall.kernel, 'as-applied');
    await n.agent.stop();
  });

  it('keeps the lockdown while it connects again after a restart (release)', async () => {
    const key = await authKey(t, 'dc');
    let n = await daemon(options({ authKey: () => key, hostname: 'rel-2', lockdownWhenRevoked: 'release' }));
    try {
      await until('connected', async () => (await n.status()).state.kind === 'connected');
      await until('locked down', () => /tcp dport \{ 22 \} drop/.test(tools.ruleset() ?? ''));
      const history = tools.rulesetHistory().length;
      n = await n.restart();
      await until('connected again', async () => (await n.status()).state.kind === 'connected');
      assert.ok(
        n.logs.some((l) => l.state === 'connecting'),
        'it was connecting in between',
      );
      assert.ok(
        !tools.rulesetHistory().slice(history).includes('removed'),
        'released only while revoked, not while connecting',
      );
      assert.match(tools.ruleset() ?? '', /tcp dport \{ 22 \} drop/);
    } finally {
      await n.agent.stop();
    }
  });

  it('keeps a released lockdown released while revoked, across ticks and another refusal (release)', async () => {
    const n = await daemon(await keyFileOptions('ticks.key', { hostname: 'rel-3', tickMs: 100 }));
    const keyFile = n.opts.authKeyFile!;
    try {
      await until('connected', async () => (await n.status()).state.kind === 'connected');
      // The tick applies the netmap again only when it has peers.
      await until('a peer', async () => (await n.status()).peers.length > 0);
      await until('locked down', () => /tcp dport \{ 22 \} drop/.test(tools.ruleset() ?? ''));
      const { id } = (await n.status()).self;
      await t.admin.call('expireNode', { id, project: 'dc' });
      await until('expired', async () => (await n.status()).state.kind === 'expired');
      await until('the lockdown released', () => tools.rulesetHistory().at(-1) === 'removed');
      const history = tools.rulesetHistory().length;
      // Every tick finds the stand-in interface gone and applies the netmap again.
      const ticks = (await n.status()).interface.restores;
      await until('two ticks', async () => (await n.status()).interface.restores >= ticks + 2);
      const { detail } = (await n.status()).state;
      writeFileSync(keyFile, 'mgk_not-a-key\n', { mode: 0o600 });
      await until('refused again, for another reason', async () => {
        const s = (await n.status()).state;
        return s.kind === 'expired' && s.detail !== detail;
      });
      // Down waits for an apply under way, and releases the lockdown (again).
      await agentDown(n.opts.socket);
      assert.deepEqual(tools.rulesetHistory().slice(history), ['removed'], 'never locked down in between');
    } finally {
      await n.agent.stop();
    }
  });

  it('says so when nft refuses to release the lockdown, and goes on (release)', async () => {
    const key = await authKey(t, 'dc');
    const n = await daemon(
      options({ authKey: () => key, hostname: 'rel-4', lockdownWhenRevoked: 'release' }),
    );
    try {
      await until('connected', async () => (await n.status()).state.kind === 'connected');
      await until('locked down', () => /tcp dport \{ 22 \} drop/.test(tools.ruleset() ?? ''));
      const { id } = (await n.status()).self;
      const refused = () => n.logs.find((l) => l.msg === 'could not release the lockdown');
      tools.refuseRemoval(true);
      try {
        await t.admin.call('expireNode', { id, project: 'dc' });
        await until('the error said', () => refused() !== undefined);
      } finally {
        tools.refuseRemoval(false);
      }
      const line = refused()!;
      assert.equal(line.level, 50, 'an error');
      assert.match(String(line.err), /Operation not permitted/, 'with what nft said');
      assert.match(tools.ruleset() ?? '', /tcp dport \{ 22 \} drop/, 'the table nft kept');
      assert.equal((await n.status()).state.kind, 'expired');
      await agentDown(n.opts.socket);
      assert.equal(tools.ruleset(), null, 'a later release works');
    } finally {
      await n.agent.stop();
    }
  });

  it('confirms an update into this release once connected, not before', async () => {
    const key = await authKey(t, 'upd');
    const opts = options({
      authKey: () => key,
      hostname: 'upd-1',
      autoUpdate: {
        prefix: join(root, 'upd-prefix'),
        releaseKey: '',
        releasesUrl: 'https://127.0.0.1:1',
        timeoutMs: 120_000,
      },
    });
    // What the agent that installed this release left: it waits to hear that this one connects.
    mkdirSync(opts.stateDir, { recursive: true, mode: 0o700 });
    writeRecord(opts.stateDir, {
      from: '0.0.1',
      to: VERSION,
      phase: 'restarting',
      reason: '',
      deadline: Date.now() + 120_000,
      timeoutMs: 120_000,
      setAt: 0,
    });
    const phases: [unknown, string | undefined][] = [];
    const n = await daemon(opts, (l) => {
      if (l.state) phases.push([l.state, readRecord(opts.stateDir)?.phase]);
    });
    try {
      await until('connected', async () => (await n.status()).state.kind === 'connected');
      assert.deepEqual(phases, [
        ['not-joined', 'restarting'],
        ['connecting', 'restarting'],
        ['connected', 'confirmed'],
      ]);
      assert.ok(said(n, `updated from meshgate 0.0.1 to ${VERSION}`));
      assert.deepEqual((await n.status()).selfUpdate, { enabled: true, failed: null });
    } finally {
      await n.agent.stop();
    }
  });

  it('ends a wireguard-go process on stop, and leaves it running to restart into another release', {
    skip: process.getuid?.() !== 0 && "wireguard-go's socket directory needs root",
  }, async () => {
    const key = await authKey(t, 'dc');
    // Its own name: wireguard-go's directory is the host's.
    const opts = options({
      authKey: () => key,
      hostname: 'go-1',
      backend: 'wireguard-go',
      interfaceName: 'mgtgo0',
    });
    const running = (pid: number | null) => {
      try {
        return pid !== null && process.kill(pid, 0);
      } catch {
        return false;
      }
    };
    const started: number[] = [];
    const startedNow = () => {
      const pid = tools.wireguardGoPid();
      assert.ok(pid !== null && !started.includes(pid), 'a wireguard-go of its own');
      started.push(pid);
      return pid;
    };
    try {
      let n = await daemon(opts);
      await until('connected', async () => (await n.status()).state.kind === 'connected');
      assert.equal((await n.status()).interface.backend, 'wireguard-go');
      const first = startedNow();
      assert.ok(running(first), 'wireguard-go runs');
      await n.agent.stop();
      assert.ok(!running(first), 'a stop ends it: its interface goes with it');

      n = await daemon(opts);
      await until('connected again', async () => (await n.status()).state.kind === 'connected');
      const second = startedNow();
      await n.agent.restartForUpdate();
      assert.ok(running(second), 'left running for the next release to adopt, with its peers');
    } finally {
      for (const pid of started.filter(running)) process.kill(pid, 'SIGTERM');
      rmSync('/var/run/wireguard/mgtgo0.log', { force: true });
    }
  });

  it('recreates an interface someone deleted, and counts it', async () => {
    const n = await daemon(options({ coordinator: unreachable, tickMs: 50 }));
    await until('a restore', async () => (await n.status()).interface.restores > 0);
    const s = await n.status();
    assert.notEqual(s.interface.lastRestore, '');
    assert.equal(s.state.kind, 'unreachable');
    assert.ok(said(n, /^the WireGuard interface was gone/));
    assert.match(await agentMetrics(n.opts.socket), /^meshgate_agent_interface_restores_total [1-9]\d*$/m);
    await n.agent.stop();
  });

  it('rotates the node key when it is due, and the coordinator holds the new one', async () => {
    const key = await authKey(t, 'dc');
    const n = await daemon(
      options({ authKey: () => key, hostname: 'rot-1', nodeKeyLifetimeMs: 1500, listenPort: 51999 }),
    );
    await until('connected', async () => (await n.status()).state.kind === 'connected');
    assert.equal((await n.status()).interface.listenPort, 51999);
    await until('the listen port set', () =>
      tools.commands().some((c) => c.startsWith(`wg set ${IFACE} `) && c.includes(' listen-port 51999')),
    );
    const first = (await n.status()).self.nodeKey;
    await until(
      'a rotation',
      async () => /rotations_total [1-9]/.test(await agentMetrics(n.opts.socket)),
      10_000,
    );
    assert.ok(said(n, 'rotated the node key'));
    await n.agent.stop();
    const ours = encodeWgKey(new StateDir(n.opts.stateDir).load().nodePublic);
    assert.notEqual(ours, first);
    assert.equal((await nodes()).find((x) => x.name === 'rot-1')?.nodeKey, ours);
  });

  it("rotates at once a node key older than the project's maximum key age", async () => {
    const key = await authKey(t, 'aged');
    const n = await daemon(options({ authKey: () => key, hostname: 'old-1', nodeKeyLifetimeMs: 3_600_000 }));
    await until('connected', async () => (await n.status()).state.kind === 'connected');
    // The coordinator counts the key's age from the registration, and the shortest maximum age
    // is one second: the key has to get that old first.
    const registered = Date.now();
    await until('a key older than a second', () => Date.now() - registered > 1100, 3000);
    await t.admin.call('setProjectMaxKeyAge', { project: 'aged', maxKeyAge: '1s' });
    await until(
      'a rotation',
      async () => /rotations_total [1-9]/.test(await agentMetrics(n.opts.socket)),
      15_000,
    );
    assert.ok(said(n, /maximum key age, so peers do not see this node; rotating it now$/));
    await n.agent.stop();
  });
});
