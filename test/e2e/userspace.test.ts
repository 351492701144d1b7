// The operator side without root: on `op` there is no agent and the commands
// run as `nobody`. `meshgate ssh`, `connect`, `proxy` and `ping` join the mesh
// inside their own process, reach a locked-down firewall over the mesh
// (directly, and through the relay when UDP is blocked), and leave no node
// behind unless given a --state-dir; a program does the same through the
// `meshgate/userspace` package export.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  copyFileSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
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

const HTTP = `require('node:http').createServer((q, r) => r.end('hello from fw\\n')).listen(8080, () => console.log('listening'));`;

/** What a program using the library writes: join, list peers, dial, leave. */
const LIBRARY_USER = `
import { readFileSync } from 'node:fs';
import { joinMesh } from 'meshgate/userspace';
const [coordinator, fingerprint, keyFile] = process.argv.slice(2);
const mesh = await joinMesh({ coordinator, fingerprint, authKey: readFileSync(keyFile, 'utf8').trim(), hostname: 'op-library' });
try {
  console.log('peers: ' + mesh.peers().map((p) => p.name).sort().join(' '));
  const socket = await mesh.dial('fw1', 8080);
  socket.end('GET / HTTP/1.0\\r\\n\\r\\n');
  let reply = '';
  for await (const chunk of socket) reply += chunk;
  console.log('body: ' + reply.split('\\r\\n\\r\\n')[1].trim());
} finally {
  await mesh.close();
}
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

describe('userspace node', { skip: suiteSkip([...TOOLS, 'setpriv', 'sha256sum', 'curl']) }, () => {
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

  step('an HTTP server on fw, for the proxy and the library', async () => {
    const server = lab.topo.spawn('fw', process.execPath, ['-e', HTTP]);
    await until(
      'the HTTP server',
      async () => server.stdout?.read()?.toString().includes('listening') ?? false,
      10_000,
    );
  });

  step(
    'meshgate proxy --socks5 as nobody: curl reaches fw by name, NAME.<domain> and mesh IP; refusals are logged; it leaves at exit',
    async () => {
      const proxy = lab.topo.spawn('op', 'setpriv', [
        '--reuid=nobody',
        '--regid=nogroup',
        '--clear-groups',
        '--',
        process.execPath,
        BIN,
        'proxy',
        '--socks5',
        '127.0.0.1:1080',
        ...joinArgs(operatorKey(), 'op-proxy'),
      ]);
      let log = '';
      proxy.stderr?.on('data', (d) => {
        log += d;
      });
      const exited = new Promise<number | null>((resolve) => proxy.once('exit', (code) => resolve(code)));
      try {
        await until('the proxy', async () => log.includes('SOCKS5 on 127.0.0.1:1080'), 30_000);
        const curl = (url: string) =>
          lab.topo.exec('op', 'curl', [
            '-sS',
            '--max-time',
            '20',
            '--socks5-hostname',
            '127.0.0.1:1080',
            url,
          ]);
        assert.equal(await curl('http://fw1:8080/'), 'hello from fw\n');
        assert.equal(await curl(`http://${await lab.meshIp('fw1')}:8080/`), 'hello from fw\n');
        const domain = (await lab.status('fw1')).dns.domain;
        assert.ok(domain, 'the mesh has a DNS domain');
        assert.equal(await curl(`http://fw1.${domain}:8080/`), 'hello from fw\n', `fw1.${domain}`);
        await assert.rejects(curl('http://fw1:8081/'));
        await assert.rejects(curl('http://nosuch:80/'));
        assert.match(log, /socks5 127\.0\.0\.1:\d+ -> fw1:8080: connected/);
        assert.match(log, /-> fw1:8080: closed, \d+ bytes sent, \d+ received/);
        assert.match(log, /-> fw1:8081: .*refused/i);
        assert.match(log, /-> nosuch:80: no node "nosuch" in this mesh/);
        assert.ok(
          nodeNames().some((n) => n.startsWith('op-proxy')),
          `nodes: ${nodeNames().join(', ')}`,
        );
      } finally {
        proxy.kill('SIGTERM');
      }
      assert.equal(await exited, 0, log);
      assert.ok(!nodeNames().some((n) => n.startsWith('op-proxy')), `nodes: ${nodeNames().join(', ')}`);
    },
  );

  step(
    'meshgate ping with --state-dir: replies as ping prints them; the node stays and comes back without a key',
    async () => {
      const own = join(home, 'op');
      mkdirSync(own, { mode: 0o755 });
      chownSync(own, NOBODY, NOBODY);
      const state = join(own, 'state');
      const key = join(home, 'reusable-key');
      writeFileSync(key, readFileSync(lab.authKey('dc1', { reusable: true })), { mode: 0o600 });
      chownSync(key, NOBODY, NOBODY);
      const [coordinator, url, fingerprint, fp] = joinArgs(key, 'op-state');
      // No agent socket here: ping joins the mesh itself.
      const ping = (extra: string[]) =>
        asOperator([
          'ping',
          'fw1',
          '-c',
          '2',
          '--socket',
          join(home, 'no-agent.sock'),
          coordinator!,
          url!,
          fingerprint!,
          fp!,
          '--hostname',
          'op-state',
          '--state-dir',
          state,
          ...extra,
        ]);
      const first = await ping(['--auth-key-file', key]);
      assert.match(first, /^PING fw1 \(\S+\) over the mesh$/m);
      assert.match(first, /^reply from fw1 \(\S+\): icmp_seq=2 time=\d+\.\d\d ms$/m);
      assert.match(first, /^2 packets transmitted, 2 received, 0% packet loss$/m);
      assert.deepEqual(
        nodeNames().filter((n) => n.startsWith('op-state')),
        ['op-state'],
      );
      assert.equal(statSync(state).mode & 0o777, 0o700);
      for (const f of readdirSync(state)) assert.equal(statSync(join(state, f)).mode & 0o777, 0o600, f);
      assert.deepEqual(readdirSync(state).sort(), ['machine.key', 'node.json', 'node.key']);
      const again = await ping([]);
      assert.match(again, /2 received/);
      assert.deepEqual(
        nodeNames().filter((n) => n.startsWith('op-state')),
        ['op-state'],
      );
    },
  );

  step('a Node program imports meshgate/userspace by package name and dials fw1', async () => {
    const app = join(home, 'app');
    mkdirSync(join(app, 'node_modules'), { recursive: true });
    symlinkSync(join(import.meta.dirname, '..', '..'), join(app, 'node_modules', 'meshgate'));
    writeFileSync(join(app, 'dial.mjs'), LIBRARY_USER);
    chmodSync(app, 0o755);
    const out = await lab.topo.exec(
      'op',
      'setpriv',
      [
        '--reuid=nobody',
        '--regid=nogroup',
        '--clear-groups',
        '--',
        process.execPath,
        join(app, 'dial.mjs'),
        lab.coordinator!.url,
        lab.coordinator!.fingerprint,
        operatorKey(),
      ],
      { timeoutMs: 60_000 },
    );
    assert.match(out, /^peers: .*\bfw1\b/m);
    assert.match(out, /^body: hello from fw$/m);
    assert.ok(!nodeNames().some((n) => n.startsWith('op-library')), `nodes: ${nodeNames().join(', ')}`);
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
