// `npm run demo`: the reference topology of DESIGN.md as network namespaces on this machine (a
// coordinator, a data-center firewall with a machine behind it, an operator behind a home NAT),
// narrated on stdout: the agents join, the operator reaches both machines over the mesh, and the
// SSH ports are closed to everyone else. Everything is removed again at the end, on failure and
// on Ctrl-C. Needs root; on Debian or Ubuntu missing tools are installed with apt-get.
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  ADDR,
  buildDataCenter,
  dataCenterKeys,
  LAN,
  startDataCenterAgents,
  TOOLS,
  waitForFullMesh,
} from './harness/datacenter.js';
import { BIN, buildOnce, MeshLab, until } from './harness/mesh.js';
import { Topology } from './harness/netns.js';
import { onPath } from './harness/tools.js';

const PROJECT = 'dc';
const PACKAGES = [
  'wireguard-tools',
  'wireguard-go',
  'nftables',
  'iproute2',
  'openssh-server',
  'openssh-client',
  'iputils-ping',
];
/** Tools the demo needs that the packages above do not bring. */
const EXTRA_PACKAGE: Record<string, string> = { sysctl: 'procps', hostname: 'hostname' };
const INDENT = '      ';

const say = (line = '') => process.stdout.write(`${line}\n`);
const indent = (text: string) =>
  text
    .trimEnd()
    .split('\n')
    .map((l) => `${INDENT}${l}`)
    .join('\n');
const seconds = (since: number) => `${((Date.now() - since) / 1000).toFixed(1)} s`;

function isDebianLike(): boolean {
  try {
    const release = readFileSync('/etc/os-release', 'utf8');
    return /^(ID|ID_LIKE)=.*\b(debian|ubuntu)\b/m.test(release) && onPath('apt-get');
  } catch {
    return false;
  }
}

/** Root, and the tools on PATH; installs them on Debian and Ubuntu. Exits 1 when it cannot go on. */
function preflight(): void {
  if (process.getuid?.() !== 0) {
    console.error(
      'The demo needs root: it creates network namespaces, WireGuard interfaces and nftables rules.\n' +
        'Run it again as root, e.g.: sudo npm run demo',
    );
    process.exit(1);
  }
  const tools = [...TOOLS, 'hostname'];
  const missing = tools.filter((t) => !onPath(t));
  if (missing.length === 0) return;
  const packages = [
    ...PACKAGES,
    ...new Set(missing.flatMap((t) => (EXTRA_PACKAGE[t] ? [EXTRA_PACKAGE[t]] : []))),
  ];
  if (!isDebianLike()) {
    console.error(`Missing on PATH: ${missing.join(', ')}. Install them (Debian: ${packages.join(' ')}).`);
    process.exit(1);
  }
  say(`Missing on PATH: ${missing.join(', ')}.`);
  say(`Installing with apt-get: ${packages.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  for (const args of [['update'], ['install', '-y', '--no-install-recommends', ...packages]]) {
    const r = spawnSync('apt-get', args, { stdio: 'inherit', env });
    if (r.status !== 0) {
      console.error(
        `apt-get ${args[0]} failed (exit ${r.status ?? r.signal}); install the packages by hand.`,
      );
      process.exit(1);
    }
  }
  const still = tools.filter((t) => !onPath(t));
  if (still.length) {
    console.error(`Still missing after apt-get: ${still.join(', ')}.`);
    process.exit(1);
  }
  say();
}

/** `meshgate ssh NODE -- hostname -I` from op; the addresses it prints show where we landed. */
async function sshOverMesh(lab: MeshLab, node: string): Promise<string> {
  const out = await until(
    `meshgate ssh ${node} from op`,
    () =>
      lab.topo.exec(
        'op',
        process.execPath,
        [
          BIN,
          'ssh',
          node,
          '--socket',
          lab.agents.get('op')!.socket,
          '--',
          ...lab.sshOptions(),
          'hostname -I',
        ],
        { timeoutMs: 15_000 },
      ),
    40_000,
    500,
  );
  const addresses = out
    .trim()
    .split(/\s+/)
    .filter((a) => !a.includes(':'));
  const path = (await lab.status('op')).peers.find((p) => p.name === node)?.path;
  const how = path === 'relay' ? "through the coordinator's relay" : 'direct';
  return `logged in on ${node}, whose addresses are ${addresses.join(', ')} (${how})`;
}

/** Plain ssh from `host` to `address`, outside the mesh: how it ended. */
async function sshOutside(lab: MeshLab, host: string, address: string): Promise<string> {
  try {
    await lab.topo.exec(host, 'ssh', [...lab.sshOptions(), address, 'true'], { timeoutMs: 20_000 });
    return 'CONNECTED';
  } catch (err) {
    const reason = (err as { stderr?: string }).stderr?.trim().split('\n').pop() ?? (err as Error).message;
    return `blocked (${reason.replace(/^ssh: /, '').replace(/^connect to host \S+ port 22: /, '')})`;
  }
}

async function main(): Promise<void> {
  preflight();
  const started = Date.now();
  say('meshgate demo: a data center and an operator, as network namespaces on this machine');
  say();
  say(`  internet ─┬─ coord  ${ADDR.coord.padEnd(14)} the coordinator`);
  say(`            ├─ fw     ${ADDR.fwPublic.padEnd(14)} data-center firewall, SNAT for ${LAN}`);
  say(`            │   └─ m1 ${ADDR.m1.padEnd(14)} machine behind it (m2 ${ADDR.m2}: no agent)`);
  say(`            └─ nat    ${ADDR.natPublic.padEnd(14)} home router (NAT)`);
  say(`                └─ op ${ADDR.op.padEnd(14)} the operator's laptop`);
  say();

  let t = Date.now();
  process.stdout.write('[1/5] building bin/meshgate (first run only) ... ');
  try {
    buildOnce();
  } catch {
    say('failed');
    console.error('bin/meshgate could not be built; `npm run build` shows why.');
    process.exit(1);
  }
  say(seconds(t));

  let interrupted = false;
  let keepLog = false;
  // Registered before the Topology's own handlers, which then remove everything and exit.
  process.once('SIGINT', () => {
    interrupted = true;
    say('\ninterrupted: removing the namespaces and processes');
  });
  const lab = new MeshLab(new Topology());
  const logFile = join(lab.dir, 'demo.log');
  lab.logFile = logFile;
  lab.quiet = true;
  // The lab dir goes at exit, also on Ctrl-C; after a failure everything but the log does.
  lab.removeOnExit = false;
  process.on('exit', () => {
    if (keepLog) {
      for (const entry of readdirSync(lab.dir))
        if (entry !== 'demo.log') rmSync(join(lab.dir, entry), { recursive: true, force: true });
    } else rmSync(lab.dir, { recursive: true, force: true });
  });

  try {
    t = Date.now();
    process.stdout.write('      hosts, links and NATs; the coordinator on coord; sshd on fw and m1 ... ');
    await buildDataCenter(lab);
    say(seconds(t));
    say(
      `      before meshgate, fw's SSH port is open to the internet: ssh root@${ADDR.fwPublic} -> ` +
        `${(await sshOutside(lab, 'coord', ADDR.fwPublic)).toLowerCase()}`,
    );

    say(`[2/5] auth keys with \`meshgate keys create --project ${PROJECT}\`, one per machine:`);
    say('      fw tag:firewall, m1 tag:machine, op tag:ops (ephemeral: gone when op logs out)');
    const keys = dataCenterKeys(lab, PROJECT);

    t = Date.now();
    process.stdout.write('[3/5] agents on fw and m1 (with --lockdown-ssh) and on op ... ');
    startDataCenterAgents(lab, keys);
    await waitForFullMesh(lab, ['fw', 'm1', 'op']);
    await until('lockdown on fw and m1', async () => {
      const [fw, m1] = await Promise.all([lab.status('fw'), lab.status('m1')]);
      return fw.lockdownPorts.includes(22) && m1.lockdownPorts.includes(22);
    });
    say(`mesh up in ${seconds(t)}`);
    say();
    say(`      $ meshgate nodes list --project ${PROJECT}`);
    say(indent(lab.admin(['nodes', 'list', '--project', PROJECT])));
    say();

    say('[4/5] from the operator, over the mesh');
    for (const node of ['fw', 'm1']) {
      say(`      $ meshgate ssh ${node} -- hostname -I`);
      say(`      ${await sshOverMesh(lab, node)}`);
    }

    say('[5/5] from outside the mesh, the SSH ports are closed');
    const [fromInternet, fromLan] = await Promise.all([
      sshOutside(lab, 'coord', ADDR.fwPublic),
      sshOutside(lab, 'm2', ADDR.m1),
    ]);
    const rows = [
      [`ssh root@${ADDR.fwPublic}`, 'from the internet', fromInternet],
      [`ssh root@${ADDR.m1}`, 'from m2 on the private LAN', fromLan],
    ];
    for (const [cmd, where, result] of rows)
      say(`      $ ${cmd!.padEnd(22)} ${`${where}:`.padEnd(28)} ${result}`);
    if (fromInternet === 'CONNECTED' || fromLan === 'CONNECTED')
      throw new Error('an SSH port answered from outside the mesh');
    say();
  } catch (err) {
    // A Ctrl-C kills the children first; give its handler the chance to run before blaming them.
    await sleep(300);
    if (interrupted) return;
    say();
    console.error(`demo failed: ${(err as Error).message.split('\n')[0]}`);
    await lab.topo.destroy();
    keepLog = true;
    console.error(`the coordinator's and agents' output is in ${logFile}`);
    process.exitCode = 1;
    return;
  }

  t = Date.now();
  process.stdout.write('cleaning up ... ');
  const id = lab.topo.id;
  await lab.destroy();
  const left = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout.includes(`mg${id}-`);
  say(left ? 'some namespaces are left over; see `ip netns list`' : `done (${seconds(t)})`);
  say(`the whole demo took ${seconds(started)}`);
  if (left) process.exitCode = 1;
}

await main();
