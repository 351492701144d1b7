// The operator side without root: on `op` there is no agent and the commands
// run as `nobody`. `meshgate ssh` and `meshgate connect` join the mesh inside
// their own process, reach a locked-down firewall over the mesh (directly, and
// through the relay when UDP is blocked), and leave no node behind.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe } from 'node:test';
import { TOOLS } from './harness/datacenter.js';
import { BIN, buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

const NOBODY = 65534;
/** Streams this many bytes of a fixed pseudo-random sequence, then closes. */
const SOURCE = `
const n = Number(process.argv[1]);
require('node:net').createServer({ allowHalfOpen: true }, (c) => {
  let x = 1, sent = 0;
  const chunk = () => {
    while (sent < n) {
      const b = Buffer.alloc(Math.min(65536, n - sent));
      for (let i = 0; i < b.length; i++) { x = (x * 1103515245 + 12345) & 0x7fffffff; b[i] = x >> 16; }
      sent += b.length;
      if (!c.write(b)) return c.once('drain', chunk);
    }
    c.end();
  };
  chunk();
}).listen(9000, () => console.log('listening'));
`;

function expectedHash(n: number): string {
  const h = createHash('sha256');
  let x = 1;
  for (let sent = 0; sent < n; ) {
    const b = Buffer.alloc(Math.min(65536, n - sent));
    for (let i = 0; i < b.length; i++) {
      x = (x * 1103515245 + 12345) & 0x7fffffff;
      b[i] = x >> 16;
    }
    sent += b.length;
    h.update(b);
  }
  return h.digest('hex');
}

describe('userspace node', { skip: suiteSkip([...TOOLS, 'setpriv', 'sha256sum']) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;
  /** Files the unprivileged operator may read: its auth key and its SSH key. */
  let home: string;

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', 'fw', 'op']);
    await lab.startCoordinator('coord', addr.coord!);
    await lab.startSshd('fw');
    lab.startAgent('fw', 'fw1', { keyFile: lab.authKey('dc1', { reusable: true }), lockdown: true });
    await lab.meshIp('fw1');
    home = mkdtempSync(join(tmpdir(), 'meshgate-op-'));
    chmodSync(home, 0o755);
    copyFileSync(lab.clientKey(), join(home, 'id'));
    chownSync(join(home, 'id'), NOBODY, NOBODY);
    chmodSync(join(home, 'id'), 0o600);
  });
  after(async () => {
    printLogsIfFailed();
    await lab.destroy();
    rmSync(home, { recursive: true, force: true });
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  /** A fresh ephemeral key in a file only `nobody` can read. */
  const operatorKey = (): string => {
    const file = join(home, `key-${Math.random().toString(36).slice(2)}`);
    writeFileSync(file, readFileSync(lab.authKey('dc1', { ephemeral: true })), { mode: 0o600 });
    chownSync(file, NOBODY, NOBODY);
    return file;
  };
  const asOperator = (args: string[], timeoutMs = 60_000) =>
    lab.topo.exec(
      'op',
      'setpriv',
      ['--reuid=nobody', '--regid=nogroup', '--clear-groups', '--', process.execPath, BIN, ...args],
      { timeoutMs },
    );
  const joinArgs = (keyFile: string, name: string) => [
    '--coordinator',
    lab.coordinator!.url,
    '--fingerprint',
    lab.coordinator!.fingerprint,
    '--auth-key-file',
    keyFile,
    '--hostname',
    name,
  ];
  const sshOptions = () => lab.sshOptions(join(home, 'id'));
  const nodeNames = () =>
    (JSON.parse(lab.admin(['nodes', 'list', '-o', 'json'])) as { name: string }[]).map((n) => n.name);

  step('public SSH to the firewall is closed: only the mesh leads there', async () => {
    await until('the lockdown', async () => {
      const out = await lab.topo.exec('op', 'ssh', [...sshOptions(), addr.fw!, 'true']).then(
        () => 'open',
        () => 'closed',
      );
      return out === 'closed';
    });
  });

  step('meshgate ssh as nobody, without an agent, runs a command on the locked-down firewall', async () => {
    const out = await asOperator([
      'ssh',
      ...joinArgs(operatorKey(), 'op-ssh'),
      'fw',
      '--',
      ...sshOptions(),
      'ip -o -4 addr show',
    ]);
    assert.match(
      out,
      new RegExp(`inet ${addr.fw!.replaceAll('.', '\\.')}/`),
      'the command ran on fw (by prefix "fw")',
    );
  });

  step('the ephemeral node is gone after the command', async () => {
    assert.ok(!nodeNames().some((n) => n.startsWith('op-ssh')), `nodes: ${nodeNames().join(', ')}`);
  });

  step('meshgate connect carries a byte stream intact, with 5 % of the UDP datagrams dropped', async () => {
    const size = 8 * 1024 * 1024;
    const source = lab.topo.spawn('fw', process.execPath, ['-e', SOURCE, String(size)]);
    await until(
      'the source',
      async () => source.stdout?.read()?.toString().includes('listening') ?? false,
      10_000,
    );
    await lab.topo.exec('net', 'nft', ['-f', '-'], {
      input:
        'table inet lossy { chain forward { type filter hook forward priority 0; meta l4proto udp numgen random mod 100 < 5 drop; }; }\n',
    });
    try {
      const started = performance.now();
      const out = await lab.topo.exec(
        'op',
        'bash',
        [
          '-c',
          `set -o pipefail; setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$0" "$1" connect "\${@:2}" </dev/null | sha256sum`,
          process.execPath,
          BIN,
          ...joinArgs(operatorKey(), 'op-connect'),
          'fw1',
          '9000',
        ],
        { timeoutMs: 120_000 },
      );
      const seconds = (performance.now() - started) / 1000;
      assert.equal(
        out.split(' ')[0],
        expectedHash(size),
        `sha256 of ${size} bytes in ${seconds.toFixed(1)} s`,
      );
    } finally {
      await lab.topo.exec('net', 'nft', ['delete', 'table', 'inet', 'lossy']);
    }
  });

  step('with UDP blocked on the operator side, meshgate ssh goes through the relay', async () => {
    await lab.topo.exec('op', 'nft', ['-f', '-'], {
      input:
        'table inet noudp { chain output { type filter hook output priority 0; meta l4proto udp drop; }; }\n',
    });
    try {
      const out = await asOperator([
        'ssh',
        ...joinArgs(operatorKey(), 'op-relay'),
        'fw1',
        '--',
        ...sshOptions(),
        'echo relayed',
      ]);
      assert.equal(out.trim(), 'relayed');
    } finally {
      await lab.topo.exec('op', 'nft', ['delete', 'table', 'inet', 'noudp']);
    }
  });

  step('an ambiguous prefix is refused with the candidates named', async () => {
    lab.startAgent('fw', 'fw2', { keyFile: lab.authKey('dc1', { reusable: true }) });
    await lab.meshIp('fw2');
    const err = await asOperator([
      'ssh',
      ...joinArgs(operatorKey(), 'op-ambiguous'),
      'fw',
      '--',
      'true',
    ]).then(
      () => '',
      (e: Error) => e.message,
    );
    assert.match(err, /"fw" matches 2 nodes: fw1, fw2/);
  });
});
