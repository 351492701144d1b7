// A locked-down node fails safe: its lockdown and its interface come back when someone removes
// them, an expired or deleted node says so and keeps (or releases, as configured) its lockdown
// until a new key is written to its key file, and `meshgate down` survives a supervisor that
// restarts the agent.
//
// fw has public sshd and --lockdown-ssh with a single-use key; op is an operator with a reusable
// key. The steps run in order, each starting from what the one before left.
import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { after, before, describe } from 'node:test';
import { agentMetrics } from '../fixtures/agent-metrics.js';
import { TOOLS } from './harness/datacenter.js';
import { buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

const PROJECT = 'safe';

/** GET on the agent's local API socket (unix sockets are not namespaced). */

describe('fail-safe node', { skip: suiteSkip(TOOLS) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;
  let fwKey = '';
  /** Extra flags fw is started with. */
  let fwExtra: string[] = [];
  /** While set, fw is started again whenever it exits, like systemd's Restart=always. */
  let supervise = false;
  let fwStarts = 0;
  const { step, printLogsIfFailed } = labSteps(() => lab);

  const startFw = () => {
    fwStarts++;
    const h = lab.startAgent('fw', 'fw', { keyFile: fwKey, lockdown: true, extra: fwExtra });
    h.proc.once('exit', () => {
      if (supervise) startFw();
    });
    return h;
  };
  const publicSsh = () => lab.ssh('coord', addr.fw!);
  const meshPing = async (from: string, to: string) => {
    const ip = await lab.meshIp(to);
    await lab.topo.exec(from, 'ping', ['-c', '1', '-W', '1', ip]);
    return true;
  };
  /** A new single-use key written over fw's key file, as an admin would on the console. */
  const writeNewKey = () => {
    const fresh = lab.authKey(PROJECT);
    writeFileSync(fwKey, readFileSync(fresh), { mode: 0o600 });
  };

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', 'fw', 'op']);
    await lab.startCoordinator('coord', addr.coord!);
    await lab.startSshd('fw');
  });
  after(async () => {
    supervise = false;
    printLogsIfFailed();
    await lab.destroy();
  });

  step('fw joins with lockdown; public SSH is closed, SSH over the mesh works', async () => {
    assert.equal(await publicSsh(), 0, 'before meshgate, public SSH to fw answers');
    fwKey = lab.authKey(PROJECT);
    startFw();
    lab.startAgent('op', 'op', { keyFile: lab.authKey(PROJECT, { reusable: true }) });
    await lab.waitForPeer('op', 'fw');
    await until('lockdown on fw', async () => (await lab.status('fw')).lockdownPorts.includes(22));
    assert.notEqual(await publicSsh(), 0, 'public SSH to fw is refused');
    await until(
      'op reaches fw over the mesh',
      async () => lab.ssh('op', await lab.meshIp('fw')).then((c) => c === 0),
      20_000,
    );
    const s = await lab.status('fw');
    assert.equal(s.state.message, 'joined and connected');
  });

  step('names: ssh fw hostname with the system ssh resolves through the mesh DNS', async () => {
    const s = await lab.status('op');
    assert.ok(s.dns.address, `op answers DNS on its mesh address (status: ${JSON.stringify(s.dns)})`);
    // What systemd-resolved would do with the agent's registration: resolv.conf of op's namespace
    // (ip netns exec mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf).
    const etc = join('/etc/netns', lab.topo.ns('op'));
    mkdirSync(etc, { recursive: true });
    try {
      writeFileSync(join(etc, 'resolv.conf'), `nameserver ${s.dns.address}\nsearch ${s.dns.domain}\n`);
      const fwIps = (await lab.status('fw')).self.ipAddresses;
      const hosts = await lab.topo.exec('op', 'getent', ['hosts', 'fw']);
      assert.ok(fwIps.includes(hosts.split(/\s+/)[0]!), `getent hosts fw: ${hosts.trim()} (fw: ${fwIps})`);
      assert.match(hosts, new RegExp(`fw\\.${s.dns.domain.replace('.', '\\.')}`), 'under the mesh domain');
      const out = await lab.topo.exec('op', 'ssh', [...lab.sshOptions(), 'fw', 'hostname'], {
        timeoutMs: 20_000,
      });
      assert.equal(out.trim(), hostname(), 'ssh fw hostname ran on fw');
      await assert.rejects(
        lab.topo.exec('op', 'getent', ['hosts', 'nope']),
        'an unknown name does not resolve',
      );
    } finally {
      rmSync(etc, { recursive: true, force: true });
    }
  });

  step('nft flush ruleset: the lockdown is back within 2 s and status shows the restore', async (t) => {
    const t0 = performance.now();
    await lab.topo.exec('fw', 'nft', ['flush', 'ruleset']);
    await until(
      'the table back in the kernel',
      async () => (await lab.topo.exec('fw', 'nft', ['list', 'tables'])).includes('inet meshgate'),
      5_000,
      20,
    );
    const restoredAfter = performance.now() - t0;
    t.diagnostic(`table restored ${restoredAfter.toFixed(0)} ms after nft flush ruleset`);
    assert.ok(restoredAfter < 2_000, `restored after ${restoredAfter.toFixed(0)} ms (limit 2000 ms)`);
    assert.notEqual(await publicSsh(), 0, 'public SSH to fw is refused again');
    const s = await lab.status('fw');
    assert.equal(s.firewall.restores, 1, 'status counts one restore');
    assert.equal(s.firewall.kernel, 'as-applied');
    assert.deepEqual(s.lockdownPorts, [22]);
    const text = await lab.local('fw', 'fw', ['status']);
    assert.match(text, /lockdown\s+tcp 22 only over the mesh; restored 1 time/);
    const metrics = await agentMetrics(lab.agents.get('fw')!.socket);
    assert.match(metrics, /^meshgate_agent_firewall_restores_total 1$/m);
    assert.match(lab.agents.get('fw')!.log.join(''), /table was removed by someone else; restored it/);
  });

  step('a rule deleted by hand is put back as well', async () => {
    const listing = await lab.topo.exec('fw', 'nft', ['-a', 'list', 'chain', 'inet', 'meshgate', 'input']);
    const handle = /tcp dport 22 drop # handle (\d+)/.exec(listing)?.[1];
    assert.ok(handle, `the lockdown rule is listed: ${listing}`);
    await lab.topo.exec('fw', 'nft', ['delete', 'rule', 'inet', 'meshgate', 'input', 'handle', handle]);
    await until('the restore', async () => (await lab.status('fw')).firewall.restores === 2, 2_000, 20);
    assert.notEqual(await publicSsh(), 0, 'public SSH to fw is refused');
  });

  step('the WireGuard interface deleted by hand: peers reach fw again within 5 s', async (t) => {
    await meshPing('op', 'fw');
    const t0 = performance.now();
    await lab.topo.exec('fw', 'ip', ['link', 'del', lab.agents.get('fw')!.iface]);
    await until('op to ping fw again', () => meshPing('op', 'fw'), 5_000, 100);
    const back = performance.now() - t0;
    t.diagnostic(`op pinged fw again ${back.toFixed(0)} ms after ip link del`);
    assert.ok(back < 5_000, `reachable again after ${back.toFixed(0)} ms (limit 5000 ms)`);
    const s = await lab.status('fw');
    assert.ok(s.interface.present, 'status shows the interface present');
    assert.equal(s.interface.restores, 1, 'status counts one recreation');
    assert.match(await lab.local('fw', 'fw', ['status']), /recreated 1 time/);
  });

  step('expired with a spent key, keep: public SSH stays closed and status says what to do', async () => {
    const pid = lab.agents.get('fw')!.proc.pid;
    lab.admin(['nodes', 'expire', 'fw', '--project', PROJECT]);
    const s = await until('fw to see it was expired', async () => {
      const st = await lab.status('fw');
      return st.state.kind === 'expired' && st;
    });
    assert.ok(
      s.state.message.startsWith(`expired by an admin: write a new auth key to ${fwKey}`),
      s.state.message,
    );
    assert.match(s.state.message, /single-use/, 'it says why the key on file does not help');
    assert.match(
      await lab.local('fw', 'fw', ['status']),
      /^state\s+expired by an admin: write a new auth key/m,
    );
    assert.doesNotMatch(lab.agents.get('fw')!.log.join(''), /coordinator unreachable/);
    assert.deepEqual(s.lockdownPorts, [22], 'the lockdown stays in the kernel');
    assert.notEqual(await publicSsh(), 0, 'public SSH to fw stays closed');

    writeNewKey();
    await until(
      'fw to come back with the new key',
      async () => (await lab.status('fw')).state.kind === 'connected',
      15_000,
    );
    assert.equal(lab.agents.get('fw')!.proc.pid, pid, 'without a restart');
    await lab.waitForPeer('op', 'fw');
    await until('op reaches fw over the mesh again', () => meshPing('op', 'fw'), 15_000);
  });

  step('deleted with a spent key: status says so; a new key brings the node back', async () => {
    lab.admin(['nodes', 'delete', 'fw', '--project', PROJECT]);
    const s = await until('fw to see it was deleted', async () => {
      const st = await lab.status('fw');
      return st.state.kind === 'deleted' && st;
    });
    assert.ok(
      s.state.message.startsWith(`deleted by an admin: write a new auth key to ${fwKey}`),
      s.state.message,
    );
    assert.notEqual(await publicSsh(), 0, 'public SSH to fw stays closed');
    writeNewKey();
    await until('fw to come back', async () => (await lab.status('fw')).state.kind === 'connected', 15_000);
    await lab.waitForPeer('op', 'fw');
  });

  step('expired with --lockdown-when-revoked release: public SSH opens', async () => {
    fwExtra = ['--lockdown-when-revoked', 'release'];
    await lab.stopAgent('fw');
    startFw();
    await until('fw connected', async () => (await lab.status('fw')).state.kind === 'connected', 20_000);
    lab.admin(['nodes', 'expire', 'fw', '--project', PROJECT]);
    await until('fw to see it was expired', async () => (await lab.status('fw')).state.kind === 'expired');
    await until('public SSH to open', async () => (await publicSsh()) === 0, 10_000);
    const s = await lab.status('fw');
    assert.deepEqual(s.lockdownPorts, [], 'status shows no lockdown');
    assert.match(s.state.message, /lockdown released/);
    writeNewKey();
    await until(
      'fw back and locked down',
      async () => {
        const st = await lab.status('fw');
        return st.state.kind === 'connected' && st.lockdownPorts.includes(22);
      },
      15_000,
    );
    assert.notEqual(await publicSsh(), 0, 'public SSH closed again');
    fwExtra = [];
  });

  step('an auth key file readable by others: the agent refuses to start', async () => {
    const loose = join(lab.dir, 'loose-key');
    writeFileSync(loose, 'mgkey_auth_x_y\n');
    chmodSync(loose, 0o644);
    const h = lab.startAgent('op', 'loose', { keyFile: loose });
    const code = await new Promise<number>((resolve) => h.proc.once('exit', (c) => resolve(c ?? 128)));
    assert.notEqual(code, 0, 'it exits non-zero');
    assert.match(
      h.log.join(''),
      new RegExp(`auth key file ${loose} is readable by group or others: run "chmod 600`),
    );
    lab.agents.delete('loose');
  });

  step('meshgate down under a restarting supervisor stays down; up restores the mesh', async () => {
    await lab.stopAgent('fw');
    supervise = true;
    startFw();
    await until('fw connected', async () => (await lab.status('fw')).state.kind === 'connected', 20_000);
    await until('op reaches fw', () => meshPing('op', 'fw'), 15_000);
    const out = await lab.local('fw', 'fw', ['down']);
    assert.equal(out, '', 'down prints nothing on stdout');
    const starts = fwStarts;
    lab.agents.get('fw')!.proc.kill('SIGKILL');
    await until(
      'the supervisor to restart fw',
      async () => fwStarts > starts && (await lab.status('fw')),
      20_000,
    );
    const s = await lab.status('fw');
    assert.equal(s.state.kind, 'down', `still down after the restart: ${s.state.message}`);
    assert.match(s.state.message, /^down: the mesh is stopped until "meshgate up"/);
    await assert.rejects(
      lab.topo.exec('fw', 'ip', ['link', 'show', lab.agents.get('fw')!.iface]),
      'no WireGuard interface while down',
    );
    assert.deepEqual(s.lockdownPorts, [22], 'keep: the lockdown stays while down');
    assert.notEqual(await publicSsh(), 0, 'public SSH stays closed while down');
    await assert.rejects(meshPing('op', 'fw'), 'fw is not reachable over the mesh while down');

    await lab.local('fw', 'fw', ['up']);
    await until(
      'fw connected again',
      async () => (await lab.status('fw')).state.kind === 'connected',
      20_000,
    );
    await until('op reaches fw again', () => meshPing('op', 'fw'), 15_000);
    assert.equal(await lab.ssh('op', await lab.meshIp('fw')), 0, 'ssh over the mesh works again');
    assert.notEqual(await publicSsh(), 0, 'public SSH stays closed');
  });

  step('meshgate logout: the coordinator deletes the node and the agent forgets its identity', async () => {
    const before = (await lab.status('op')).self.id;
    await lab.local('op', 'op', ['logout']);
    const nodes = JSON.parse(lab.admin(['nodes', 'list', '--project', PROJECT, '-o', 'json'])) as {
      id: string;
    }[];
    assert.ok(!nodes.some((n) => n.id === before), 'op (not ephemeral) is gone from nodes list');
    const s = await lab.status('op');
    assert.equal(s.state.kind, 'down');
    assert.equal(s.self.id, '', 'no identity left');
    await lab.local('op', 'op', ['up']);
    const again = await until(
      'op to join anew',
      async () => {
        const st = await lab.status('op');
        return st.state.kind === 'connected' && st;
      },
      20_000,
    );
    assert.notEqual(again.self.id, before, 'as a new node');
    await until('op reaches fw', () => meshPing('op', 'fw'), 15_000);
  });
});
