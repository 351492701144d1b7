// Provisioning as an operator does it: pack a signed release, let the
// coordinator serve it, and join a machine with one line,
//   curl … https://COORD:7480/install.sh | sh -s -- …
// from a namespace with no checkout on its PATH. Then: a second run changes
// nothing and keeps a local edit; tampered artifacts and a wrong release key
// are refused and leave nothing installed.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  appendFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { after, before, describe } from 'node:test';
import { parseSecret } from '../../coordinator/state/secrets.js';
import { TOOLS } from './harness/datacenter.js';
import { BIN, buildOnce, labSteps, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { installWithScript, machinePrefix, type Prefix, type ScriptResult } from './harness/provision.js';
import { star } from './harness/star.js';
import { suiteSkip } from './harness/tools.js';

/** A snapshot of every file below dir: type, mode, mtime and content or link target. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const e of readdirSync(d)) {
      const p = join(d, e);
      const st = lstatSync(p);
      if (st.isSymbolicLink()) out[p] = `link ${readlinkSync(p)} ${st.mtimeMs}`;
      else if (st.isDirectory()) walk(p);
      else if (st.isFile())
        out[p] =
          `file ${(st.mode & 0o777).toString(8)} ${st.mtimeMs} ${createHash('sha256').update(readFileSync(p)).digest('hex')}`;
    }
  };
  walk(dir);
  return out;
}

describe('install.sh from the coordinator', { skip: suiteSkip([...TOOLS, 'curl', 'openssl']) }, () => {
  let lab: MeshLab;
  let addr: Record<string, string>;
  let releaseKey = '';
  let pin = '';
  let iface = '';
  const releases = () => join(lab.dir, 'releases');

  const prefix = (name: string): Prefix => machinePrefix(lab, name);

  /** The operator's one line in `host` (see harness/provision.ts). */
  const install = (
    host: string,
    p: Prefix,
    args: string[],
    authKey?: string,
    coordinatorFlag = true,
  ): Promise<ScriptResult> =>
    installWithScript({
      lab,
      host,
      prefix: p,
      coordAddress: addr.coord!,
      pin,
      iface,
      args,
      authKey,
      coordinatorFlag,
    });

  before(async () => {
    buildOnce();
    lab = new MeshLab(new Topology());
    addr = await star(lab.topo, ['coord', 'm1', 'b']);
    iface = lab.topo.wgName();
    const signingKey = join(lab.dir, 'signing.key');
    releaseKey = execFileSync(process.execPath, [BIN, 'release', 'keygen', '--out', signingKey], {
      encoding: 'utf8',
    }).trim();
    execFileSync(process.execPath, [
      BIN,
      'release',
      'pack',
      '--version',
      '0.1.0',
      '--signing-key',
      signingKey,
      '--out',
      releases(),
    ]);
    await lab.startCoordinator('coord', addr.coord!, ['--releases-dir', releases()]);
    pin = execFileSync(
      process.execPath,
      [BIN, 'coordinator', 'fingerprint', '--curl', '--data-dir', lab.dataDir],
      { encoding: 'utf8' },
    ).trim();
  });
  after(async () => {
    printLogsIfFailed();
    await lab.destroy();
  });
  const { step, printLogsIfFailed } = labSteps(() => lab);

  step('a fresh machine installs 0.1.0 with one line and joins the mesh', async () => {
    const key = readFileSync(lab.authKey('prov', { reusable: true }), 'utf8').trim();
    lab.admin(['versions', 'set', '--project', 'prov', '0.1.0']);
    const m1 = prefix('m1');
    const r = await install('m1', m1, ['--release-key', releaseKey, '--lockdown-ssh', 'yes'], key);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /installed meshgate 0\.1\.0/);

    assert.equal(readlinkSync(join(m1.opt, 'current')), '0.1.0');
    assert.equal(readlinkSync(join(m1.bin, 'meshgate')), join(m1.opt, 'current', 'meshgate.mjs'));
    assert.equal(readFileSync(join(m1.etc, 'authkey'), 'utf8'), `${key}\n`);
    assert.equal(statSync(join(m1.etc, 'authkey')).mode & 0o777, 0o600);
    assert.equal(statSync(m1.etc).mode & 0o777, 0o700);
    const config = readFileSync(join(m1.etc, 'agent.yaml'), 'utf8');
    assert.match(config, /^lockdownSsh: true$/m);
    assert.match(
      readFileSync(join(m1.unit, 'meshgate-agent.service'), 'utf8'),
      /^ExecStart=.*\/usr\/local\/bin\/meshgate agent --config .*agent\.yaml$/m,
    );
    const curlLog = readFileSync(join(lab.dir, 'fakebin-m1', 'curl.log'), 'utf8');
    assert.match(
      curlLog,
      /--data-binary @\S*authkey .*\/releases\/desired\n/,
      'asks for the desired version',
    );
    assert.match(curlLog, /releases\/0\.1\.0\/meshgate-0\.1\.0\.mjs/);
    assert.ok(
      !curlLog.includes(parseSecret('auth', key)!.secret),
      'the auth key reached neither argv nor environment of curl',
    );

    // The installed command, from the namespace, with no checkout on PATH.
    const installed = join(m1.bin, 'meshgate');
    const version = await lab.topo.exec('m1', installed, ['--version']);
    assert.match(version, /^meshgate 0\.1\.0 \(commit [0-9a-f]{12}, node v\d+/);

    const socket = join(m1.root, 'agent.sock');
    const proc = lab.topo.spawn('m1', installed, [
      'agent',
      '--config',
      join(m1.etc, 'agent.yaml'),
      '--backend',
      'wireguard-go',
      '--socket',
      socket,
      '--hostname',
      'm1',
      '--log-level',
      'debug',
    ]);
    const log: string[] = [];
    proc.stderr?.on('data', (d) => log.push(String(d)));
    lab.agents.set('m1', { name: 'm1', host: 'm1', proc, socket, stateDir: m1.state, iface, args: [], log });
    lab.startAgent('b', 'b', { keyFile: lab.authKey('prov') });
    await lab.waitForPeer('b', 'm1', true, 30_000);
    await lab.waitForPeer('m1', 'b', true, 30_000);
    const nodes = JSON.parse(lab.admin(['nodes', 'list', '--project', 'prov', '-o', 'json'])) as {
      name: string;
      version: string;
    }[];
    assert.equal(nodes.find((n) => n.name === 'm1')?.version, '0.1.0');
    // What an external controller reads: the desired release, from the installed CLI.
    const status = JSON.parse(
      await lab.topo.exec('m1', installed, ['status', '-o', 'json', '--socket', socket]),
    ) as {
      version: string;
      desiredRelease: { version: string; artifactUrl: string; sha256: string; manifest: string };
    };
    const manifest = JSON.parse(readFileSync(join(releases(), '0.1.0', 'manifest.json'), 'utf8'));
    assert.equal(status.version, '0.1.0');
    assert.deepEqual(
      { ...status.desiredRelease, manifest: JSON.parse(status.desiredRelease.manifest) },
      {
        version: '0.1.0',
        artifactUrl: '/releases/0.1.0/meshgate-0.1.0.mjs',
        sha256: manifest.sha256,
        manifest,
        allowDowngrade: false,
      },
    );
    const ipB = await lab.meshIp('b');
    await until('ping m1 -> b over the mesh', async () => {
      await lab.topo.exec('m1', 'ping', ['-c', '1', '-W', '1', ipB]);
      return true;
    });
  });

  step('a second run changes nothing and keeps a local edit of agent.yaml', async () => {
    const m1 = prefix('m1');
    appendFileSync(join(m1.etc, 'agent.yaml'), 'logLevel: warn # local edit\n');
    // What install.sh manages; the agent's state dir changes on its own.
    const managed = () => [m1.opt, m1.bin, m1.etc, m1.unit].map(snapshot);
    const before = managed();
    const r = await install('m1', m1, ['--release-key', releaseKey]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /nothing changed/);
    assert.deepEqual(managed(), before);
    assert.match(readFileSync(join(m1.etc, 'agent.yaml'), 'utf8'), /logLevel: warn # local edit/);
  });

  step(
    "metal-stack's install.yaml gives the coordinator, the auth key and the machine UUID as node name",
    async () => {
      const p = prefix('metal');
      const key = readFileSync(lab.authKey('prov'), 'utf8').trim();
      const uuid = '6c5f2e3a-0d8b-4a7c-9f1e-2b3c4d5e6f70';
      mkdirSync(join(p.root, 'etc', 'metal'), { recursive: true });
      writeFileSync(
        join(p.root, 'etc', 'metal', 'install.yaml'),
        [
          '---',
          'hostname: fw-1',
          `machineuuid: ${uuid}`,
          'role: firewall',
          'vpn:',
          `  address: ${lab.coordinator!.url}`,
          `  auth_key: "${key}"`,
          'devmode: false',
          '',
        ].join('\n'),
      );
      const r = await install('m1', p, ['--release-key', releaseKey], undefined, false);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(readFileSync(join(p.etc, 'authkey'), 'utf8'), `${key}\n`);
      const config = readFileSync(join(p.etc, 'agent.yaml'), 'utf8');
      assert.match(config, new RegExp(`^coordinator: ${lab.coordinator!.url}$`, 'm'));
      assert.match(config, new RegExp(`^hostname: ${uuid}$`, 'm'));
    },
  );

  step('a wrong release key is refused and installs nothing', async () => {
    const other = join(lab.dir, 'other.key');
    const otherKey = execFileSync(process.execPath, [BIN, 'release', 'keygen', '--out', other], {
      encoding: 'utf8',
    }).trim();
    const p = prefix('wrongkey');
    const r = await install('m1', p, ['--release-key', otherKey], 'mgkey_auth_unused_unused');
    assert.equal(r.code, 1);
    assert.match(r.stderr, /release 0\.1\.0: the manifest signature does not match the release key/);
    assert.equal(existsSync(join(p.opt, '0.1.0')), false);
    assert.equal(existsSync(join(p.bin, 'meshgate')), false);
  });

  step('a tampered artifact with a doctored manifest is refused by the signature', async () => {
    // 0.1.2: the 0.1.0 artifact plus a line, the manifest's fields made to
    // match, the old signature kept. The coordinator serves it (it does not
    // hold the release key); the machine must not install it.
    const src = join(releases(), '0.1.0');
    const dst = join(releases(), '0.1.2');
    mkdirSync(dst);
    const bytes = Buffer.concat([readFileSync(join(src, 'meshgate-0.1.0.mjs')), Buffer.from('\n;\n')]);
    writeFileSync(join(dst, 'meshgate-0.1.2.mjs'), bytes);
    const m = JSON.parse(readFileSync(join(src, 'manifest.json'), 'utf8'));
    Object.assign(m, {
      version: '0.1.2',
      file: 'meshgate-0.1.2.mjs',
      size: bytes.length,
      sha256: createHash('sha256').update(bytes).digest('hex'),
    });
    writeFileSync(join(dst, 'manifest.json'), JSON.stringify(m));
    const p = prefix('tampered');
    const r = await install(
      'm1',
      p,
      ['--release-key', releaseKey, '--version', '0.1.2'],
      'mgkey_auth_unused_unused',
    );
    assert.equal(r.code, 1);
    assert.match(r.stderr, /release 0\.1\.2: the manifest signature does not match the release key/);
    assert.equal(existsSync(join(p.opt, '0.1.2')), false);
  });

  step('an artifact changed on the way is refused by the sha256', async () => {
    // A mirror with the coordinator's TLS key (so the pin holds) serves the
    // signed manifest next to other bytes of the same size: what a corrupted
    // disk or a proxy in the way would deliver.
    const mirror = join(lab.dir, 'mirror');
    mkdirSync(join(mirror, 'releases', '0.1.0'), { recursive: true });
    const src = join(releases(), '0.1.0');
    const bytes = readFileSync(join(src, 'meshgate-0.1.0.mjs'));
    bytes[bytes.length - 2] = bytes[bytes.length - 2] === 0x20 ? 0x09 : 0x20;
    writeFileSync(join(mirror, 'releases', '0.1.0', 'meshgate-0.1.0.mjs'), bytes);
    writeFileSync(
      join(mirror, 'releases', '0.1.0', 'manifest.json'),
      readFileSync(join(src, 'manifest.json')),
    );
    const server = spawn(
      'ip',
      [
        'netns',
        'exec',
        lab.topo.ns('coord'),
        'openssl',
        's_server',
        '-quiet',
        '-WWW',
        '-accept',
        `${addr.coord}:7481`,
        '-cert',
        join(lab.dataDir, 'tls.crt'),
        '-key',
        join(lab.dataDir, 'tls.key'),
      ],
      { cwd: mirror, stdio: 'ignore' },
    );
    try {
      await until('the mirror to listen', async () =>
        (await lab.topo.exec('coord', 'ss', ['-ltn'])).includes(':7481 '),
      );
      const p = prefix('corrupt');
      const r = await install(
        'm1',
        p,
        ['--release-key', releaseKey, '--version', '0.1.0', '--releases-url', `https://${addr.coord}:7481`],
        'mgkey_auth_unused_unused',
      );
      assert.equal(r.code, 1, r.stderr);
      assert.match(
        r.stderr,
        /release 0\.1\.0: the artifact sha256 [0-9a-f]{64} does not match the signed manifest/,
      );
      assert.equal(existsSync(join(p.opt, '0.1.0')), false);
      assert.equal(existsSync(join(p.bin, 'meshgate')), false);
    } finally {
      server.kill('SIGKILL');
    }
  });
});
