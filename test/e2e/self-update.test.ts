// Self-update and rollout control end to end: three machines installed by
// install.sh from the coordinator join at 0.1.0 with --auto-update. Each
// agent runs under a loop that starts it again whenever it exits, as
// systemd's Restart=always does. Then:
//   versions set 0.1.1 --max-unavailable 1   every node moves, one at a time,
//                                            while an SSH session over the mesh streams
//   versions set 0.1.2 (tampered)            refused by the signature, reported, halted
//   versions set 0.1.3 (cannot start)        rolled back by the watchdog, reported, halted
import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe } from 'node:test';
import { run } from '../../agent/dataplane/exec.js';
import { type AdminClient, connectAdmin } from '../../cli/admin-client.js';
import type { NodeUpdate } from '../../proto/gen/meshgate/v1/admin_pb.js';
import { loadSigningKey, MANIFEST_FORMAT, signManifest } from '../../release/manifest.js';
import { TOOLS } from './harness/datacenter.js';
import { BIN, buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { installWithScript, machinePrefix } from './harness/provision.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

const MACHINES = ['m1', 'm2', 'm3'];
const UPDATE_TIMEOUT_S = 8;

describe('agent self-update and rollout control', { skip: suiteSkip([...TOOLS, 'curl', 'pgrep']) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;
  let admin: AdminClient;
  let releaseKey = '';
  let pin = '';
  const releases = () => join(lab.dir, 'releases');
  const signingKey = () => join(lab.dir, 'signing.key');

  const pack = (version: string) =>
    run(
      process.execPath,
      [BIN, 'release', 'pack', '--version', version, '--signing-key', signingKey(), '--out', releases()],
      { timeoutMs: 120_000 },
    );

  /** A release made from 0.1.1's artifact: `change` edits the bytes; `sign` false keeps 0.1.1's signature. */
  const derive = (version: string, change: (text: string) => string, sign: boolean) => {
    const src = join(releases(), '0.1.1');
    const bytes = Buffer.from(change(readFileSync(join(src, 'meshgate-0.1.1.mjs'), 'utf8')));
    const dst = join(releases(), version);
    mkdirSync(dst);
    writeFileSync(join(dst, `meshgate-${version}.mjs`), bytes, { mode: 0o755 });
    const fields = {
      version,
      file: `meshgate-${version}.mjs`,
      size: bytes.length,
      sha256: createHash('sha256').update(bytes).digest('hex'),
    };
    const old = JSON.parse(readFileSync(join(src, 'manifest.json'), 'utf8'));
    const manifest = sign
      ? signManifest(
          {
            format: MANIFEST_FORMAT,
            name: 'meshgate',
            commit: old.commit,
            node: old.node,
            platform: old.platform,
            created: new Date().toISOString(),
            ...fields,
          },
          loadSigningKey(readFileSync(signingKey(), 'utf8')),
        )
      : { ...old, ...fields };
    writeFileSync(join(dst, 'manifest.json'), JSON.stringify(manifest));
  };

  const rollout = async (): Promise<NodeUpdate[]> =>
    (await admin.call('listDesiredVersions', { project: 'upd' })).nodes;

  /** Polls the coordinator's view until `done`; returns the most nodes seen updating at once. */
  const watchRollout = async (what: string, done: (nodes: NodeUpdate[]) => boolean, timeoutMs = 60_000) => {
    let most = 0;
    await until(
      what,
      async () => {
        const nodes = await rollout();
        most = Math.max(most, nodes.filter((n) => n.state === 'updating').length);
        return done(nodes);
      },
      timeoutMs,
      100,
    );
    return most;
  };

  const wireguardGoPid = (iface: string) =>
    execFileSync('pgrep', ['-f', `^wireguard-go -f ${iface}$`], { encoding: 'utf8' }).trim();

  const current = (m: string) => readlinkSync(join(machinePrefix(lab, m).opt, 'current'));
  const agentLog = (m: string) => lab.agents.get(m)!.log.join('');

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', ...MACHINES]);
    releaseKey = execFileSync(process.execPath, [BIN, 'release', 'keygen', '--out', signingKey()], {
      encoding: 'utf8',
    }).trim();
    // Both from this tree, at once: bundling is most of the setup time.
    await Promise.all([pack('0.1.0'), pack('0.1.1')]);
    derive('0.1.2', (text) => `${text}\n;\n`, false);
    derive('0.1.3', (text) => text.replace('\n', "\nthrow new Error('this release cannot start');\n"), true);
    await lab.startCoordinator('coord', addr.coord!, ['--releases-dir', releases()]);
    admin = await connectAdmin({ socket: join(lab.dataDir, 'admin.sock'), output: 'json' });
  });
  after(async () => {
    printLogsIfFailed();
    admin?.close();
    await lab.destroy();
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  step('three machines installed by install.sh join at 0.1.0 with --auto-update', async () => {
    pin = execFileSync(
      process.execPath,
      [BIN, 'coordinator', 'fingerprint', '--curl', '--data-dir', lab.dataDir],
      { encoding: 'utf8' },
    ).trim();
    const key = readFileSync(lab.authKey('upd', { reusable: true }), 'utf8').trim();
    lab.admin(['versions', 'set', '--project', 'upd', '0.1.0']);
    for (const m of MACHINES) {
      const p = machinePrefix(lab, m);
      const iface = lab.topo.wgName();
      const r = await installWithScript({
        lab,
        host: m,
        prefix: p,
        coordAddress: addr.coord!,
        pin,
        iface,
        args: ['--release-key', releaseKey, '--auto-update', '--lockdown-ssh', 'false', '--hostname', m],
        authKey: key,
      });
      assert.equal(r.code, 0, r.stderr);
      const config = readFileSync(join(p.etc, 'agent.yaml'), 'utf8');
      assert.match(config, /^autoUpdate: true$/m);
      assert.match(config, new RegExp(`^installPrefix: ${p.opt}$`, 'm'));
      // What systemd does with Restart=always, for the installed command.
      const socket = join(p.root, 'agent.sock');
      const agent = [
        join(p.bin, 'meshgate'),
        'agent',
        '--config',
        join(p.etc, 'agent.yaml'),
        '--backend',
        'wireguard-go',
        '--socket',
        socket,
        '--log-level',
        'debug',
        '--update-timeout',
        `${UPDATE_TIMEOUT_S}s`,
      ].join(' ');
      const proc = lab.topo.spawn(m, 'sh', [
        '-c',
        `while :; do ${agent}; echo "supervisor: the agent exited with status $?" >&2; sleep 0.5; done`,
      ]);
      const log: string[] = [];
      const keep = (d: Buffer) => log.push(String(d));
      proc.stderr?.on('data', keep);
      proc.stdout?.on('data', keep);
      lab.agents.set(m, { name: m, host: m, proc, socket, stateDir: p.state, iface, args: [], log });
    }
    for (const m of MACHINES)
      for (const peer of MACHINES) if (peer !== m) await lab.waitForPeer(m, peer, true, 30_000);
    const nodes = await rollout();
    assert.deepEqual(
      nodes.map((n) => [n.name, n.running, n.state]),
      MACHINES.map((m) => [m, '0.1.0', 'current']),
    );
  });

  step(
    'versions set 0.1.1 --max-unavailable 1 moves every node, one at a time, while SSH over the mesh streams',
    async (t) => {
      await lab.startSshd('m2');
      const ipM2 = await lab.meshIp('m2');
      await until('ssh m1 -> m2 over the mesh', async () => (await lab.ssh('m1', ipM2)) === 0, 20_000);
      const pids = Object.fromEntries(MACHINES.map((m) => [m, wireguardGoPid(lab.agents.get(m)!.iface)]));
      const session: ChildProcess = spawn(
        'ip',
        [
          'netns',
          'exec',
          lab.topo.ns('m1'),
          'ssh',
          ...lab.sshOptions(),
          ipM2,
          'while :; do echo line; sleep 0.2; done',
        ],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let lines = 0;
      let last = 0;
      let longestGap = 0;
      session.stdout!.on('data', (d: Buffer) => {
        const now = Date.now();
        if (last) longestGap = Math.max(longestGap, now - last);
        last = now;
        lines += String(d).split('\n').length - 1;
      });
      try {
        await until('the session to stream', async () => lines > 2);
        const started = Date.now();
        lab.admin(['versions', 'set', '--project', 'upd', '0.1.1', '--max-unavailable', '1']);
        const most = await watchRollout('every node on 0.1.1', (nodes) =>
          nodes.every((n) => n.running === '0.1.1' && n.state === 'current' && n.online),
        );
        t.diagnostic(
          `rollout of 3 nodes took ${Date.now() - started} ms; longest pause in the SSH stream ${longestGap} ms`,
        );
        assert.equal(most, 1, 'one node updating at a time');
        assert.equal(session.exitCode, null, 'the SSH session is still open');
        await until('a line after the rollout', async () => Date.now() - last < 1000);
        assert.ok(longestGap < 5_000, `the SSH stream paused for ${longestGap} ms`);
      } finally {
        session.kill();
      }
      for (const m of MACHINES) {
        assert.equal(current(m), '0.1.1');
        assert.match(agentLog(m), /updated from meshgate 0\.1\.0 to 0\.1\.1/);
        assert.equal(
          wireguardGoPid(lab.agents.get(m)!.iface),
          pids[m],
          `${m}: the same wireguard-go process carries the interface`,
        );
        assert.equal((await lab.status(m)).version, '0.1.1');
      }
      assert.match(
        lab.admin(['versions', 'list', '--project', 'upd']),
        /upd\s+m1\s+0\.1\.1\s+0\.1\.1\s+current/,
      );
    },
  );

  step('a tampered release is refused, reported, and halts the rollout', async () => {
    lab.admin(['versions', 'set', '--project', 'upd', '0.1.2']);
    const most = await watchRollout('a node to refuse 0.1.2', (nodes) =>
      nodes.some((n) => n.state === 'failed'),
    );
    assert.ok(most <= 1);
    const nodes = await rollout();
    const failed = nodes.find((n) => n.state === 'failed')!;
    assert.equal(failed.name, 'm1');
    assert.match(failed.reason, /release 0\.1\.2: the manifest signature does not match the release key/);
    for (const n of nodes.filter((x) => x !== failed)) {
      assert.equal(n.state, 'waiting');
      assert.equal(n.reason, 'rollout halted: the update of m1 failed');
    }
    for (const m of MACHINES) assert.equal(current(m), '0.1.1');
    assert.ok(
      nodes.every((n) => n.running === '0.1.1' && n.online),
      'every agent keeps running 0.1.1',
    );
    const status = await lab.status('m1');
    assert.equal(
      status.selfUpdate.failed?.version,
      '0.1.2',
      'meshgate status says which release was refused',
    );
    assert.match(status.selfUpdate.failed!.reason, /signature does not match/);
    const table = lab.admin(['versions', 'list', '--project', 'upd']);
    assert.match(table, /m1\s+0\.1\.1\s+0\.1\.2\s+failed: release 0\.1\.2: the manifest signature/);
    assert.match(table, /the rollout in project upd is halted by a failed update/);
  });

  step('a release that cannot start is rolled back, reported, and halts the rollout', async () => {
    lab.admin(['versions', 'set', '--project', 'upd', '0.1.3']);
    const most = await watchRollout(
      'the watchdog to roll 0.1.3 back',
      (nodes) => nodes.some((n) => n.state === 'failed' && n.online && n.running === '0.1.1'),
      UPDATE_TIMEOUT_S * 1000 + 30_000,
    );
    assert.ok(most <= 1);
    const nodes = await rollout();
    const failed = nodes.find((n) => n.state === 'failed')!;
    assert.equal(failed.name, 'm1');
    assert.equal(
      failed.reason,
      `meshgate 0.1.3 did not start as the agent within ${UPDATE_TIMEOUT_S}s; rolled back to 0.1.1`,
    );
    assert.match(agentLog('m1'), /this release cannot start/);
    assert.equal(current('m1'), '0.1.1');
    for (const n of nodes.filter((x) => x !== failed)) assert.equal(n.state, 'waiting');
    await until('the rolled-back agent to answer', async () => (await lab.status('m1')).selfUpdate.failed);
    assert.equal((await lab.status('m1')).selfUpdate.failed?.reason, failed.reason);
    // A boot of a waiting machine runs install.sh again: it leaves the release to the agent.
    const m2 = machinePrefix(lab, 'm2');
    const again = await installWithScript({
      lab,
      host: 'm2',
      prefix: m2,
      coordAddress: addr.coord!,
      pin,
      iface: lab.agents.get('m2')!.iface,
      args: ['--release-key', releaseKey, '--auto-update'],
    });
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /meshgate 0\.1\.1 is installed and configured; nothing changed/);
    assert.equal(current('m2'), '0.1.1');
    // The mesh is whole again: m1 reaches m2.
    const ipM2 = await lab.meshIp('m2');
    await until('ssh m1 -> m2 after the rollback', async () => (await lab.ssh('m1', ipM2)) === 0, 20_000);
  });
});
