// Commands that talk to the agent on this host: status, ping, ssh, down.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import type { Command } from 'commander';
import { agentDown, agentLogout, agentStatus, agentUp } from '../../agent/localapi/client.js';
import type { AgentStatus, PeerStatus } from '../../agent/localapi/types.js';
import { escapeUnsafe } from '../../proto/text.js';
import { drifts } from '../../release/semver.js';
import { CliError } from '../errors.js';
import { ago, type Column, FORMATS, parseFormat, render } from '../output.js';
import { DEFAULT_AGENT_SOCKET } from './agent.js';
import {
  joinFromOptions,
  pingOverMesh,
  sshOverMesh,
  type UserspaceOptions,
  userspaceOptions,
} from './userspace.js';

const socketOption = (cmd: Command) =>
  cmd.option('--socket <path>', "the agent's local API socket", DEFAULT_AGENT_SOCKET);

const PEER_COLUMNS: Column<PeerStatus>[] = [
  { header: 'NAME', value: (p) => p.name },
  { header: 'IP', value: (p) => p.ipAddresses[0] ?? '' },
  { header: 'ONLINE', value: (p) => (p.online ? 'yes' : 'no') },
  { header: 'PATH', value: (p) => p.path },
  { header: 'ENDPOINT', value: (p) => (p.path === 'relay' ? 'relay' : p.endpoint) },
  { header: 'HANDSHAKE', value: (p) => ago(p.lastHandshake) },
  { header: 'TAGS', value: (p) => p.tags.join(','), wide: true },
  { header: 'VERSION', value: (p) => p.version, wide: true },
  { header: 'RX', value: (p) => String(p.rxBytes), wide: true },
  { header: 'TX', value: (p) => String(p.txBytes), wide: true },
  { header: 'ID', value: (p) => p.id, wide: true },
];

/** A peer by name, mesh IP, id, or unique id prefix. */
export function resolvePeer(status: AgentStatus, ref: string): PeerStatus {
  const exact = status.peers.find((p) => p.name === ref || p.id === ref || p.ipAddresses.includes(ref));
  if (exact) return exact;
  const byPrefix = status.peers.filter((p) => p.id.startsWith(ref));
  if (byPrefix.length === 1) return byPrefix[0]!;
  if (byPrefix.length > 1)
    throw new CliError(`"${ref}" matches ${byPrefix.length} peers; give more of the id`);
  const names = status.peers.map((p) => p.name).join(', ') || 'none';
  throw new CliError(`no peer "${ref}" in this node's netmap (peers: ${names})`);
}

function lockdownText(s: AgentStatus): string {
  const f = s.firewall;
  const restored = f.restores
    ? `; restored ${f.restores} time${f.restores === 1 ? '' : 's'}, last at ${f.lastRestore}`
    : '';
  if (s.lockdownPorts.length) return `tcp ${s.lockdownPorts.join(',')} only over the mesh${restored}`;
  if (f.configuredPorts.length && (f.kernel === 'missing' || f.kernel === 'changed'))
    return `tcp ${f.configuredPorts.join(',')} configured, but the table is ${f.kernel} in the kernel${restored}`;
  return `off${f.configuredPorts.length ? ` (tcp ${f.configuredPorts.join(',')} configured)` : ''}${restored}`;
}

function interfaceText(s: AgentStatus): string {
  const i = s.interface;
  if (!i.backend) return `${i.name} (none: the mesh is stopped)`;
  const restored = i.restores
    ? `; recreated ${i.restores} time${i.restores === 1 ? '' : 's'}, last at ${i.lastRestore}`
    : '';
  return `${i.name} (${i.backend}, udp ${i.listenPort})${i.present ? '' : ' missing in the kernel'}${restored}`;
}

function statusText(s: AgentStatus, wide: boolean): string {
  const drift = drifts(s.version, s.desiredVersion, s.desiredRelease?.allowDowngrade ?? false)
    ? ` (desired ${s.desiredVersion})`
    : '';
  const failed = s.selfUpdate?.failed;
  const update = failed ? `; update to ${failed.version} failed: ${failed.reason}` : '';
  const lines = [
    `state        ${s.state.message}`,
    `node         ${s.self.name || '(not registered)'} ${s.self.ipAddresses.join(' ')}`,
    `project      ${s.self.project}`,
    `coordinator  ${s.coordinator.url}: ${s.coordinator.state}${s.coordinator.error ? ` (${s.coordinator.error})` : ''}`,
    `interface    ${interfaceText(s)}`,
    `version      ${s.version}${drift}${update}`,
    `lockdown     ${lockdownText(s)}`,
    `dns          ${s.dns.address ? `${s.dns.domain} on ${s.dns.address}:53${s.dns.resolved ? ' (systemd-resolved)' : ''}` : 'off'}`,
    '',
    s.peers.length ? render(wide ? 'wide' : 'table', null, s.peers, PEER_COLUMNS) : 'no peers',
  ];
  // Names, versions and errors come from the coordinator: shown, never interpreted.
  return escapeUnsafe(lines.join('\n'), '\n');
}

function runInherit(cmd: string, args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: 'inherit' });
    child.on('error', (err: NodeJS.ErrnoException) =>
      reject(
        new CliError(
          err.code === 'ENOENT'
            ? `${cmd} not found: install ${cmd === 'ssh' ? 'openssh-client' : 'iputils-ping'}`
            : err.message,
        ),
      ),
    );
    child.on('exit', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
  });
}

export function registerLocalCommands(program: Command): void {
  socketOption(
    program.command('status').description("this node's view of the mesh: itself, its peers, the coordinator"),
  )
    .option('-o, --output <format>', `output format: ${FORMATS.join('|')}`, 'table')
    .action(async (o: { socket: string; output: string }) => {
      const format = parseFormat(o.output);
      const s = await agentStatus(o.socket);
      process.stdout.write(
        `${format === 'json' || format === 'yaml' ? render(format, s, [], []) : statusText(s, format === 'wide')}\n`,
      );
    });

  userspaceOptions(
    socketOption(
      program
        .command('ping <node>')
        .description('ping a peer over the mesh (name, id, id prefix or mesh IP)'),
    ),
  )
    .option('-c, --count <n>', 'number of pings', '3')
    .option('--userspace', 'join the mesh in this process even if an agent runs here (no root needed)')
    .addHelpText(
      'after',
      `
Without an agent on this host (or with --userspace) meshgate joins the mesh in
this process, as meshgate ssh does, and sends the ICMP echoes itself.`,
    )
    .action(
      async (node: string, o: { socket: string; count: string; userspace?: boolean } & UserspaceOptions) => {
        const count = Number(o.count);
        if (!Number.isInteger(count) || count < 1)
          throw new CliError(`--count: "${o.count}" is not a positive number`);
        const status = o.userspace ? null : await agentStatus(o.socket).catch((e: Error) => e);
        if (status === null || (status instanceof Error && !existsSync(o.socket))) {
          const mesh = await joinFromOptions(o);
          try {
            process.exitCode = await pingOverMesh(mesh, node, count);
          } finally {
            await mesh.close();
          }
          return;
        }
        if (status instanceof Error) throw status;
        const peer = resolvePeer(status, node);
        process.exitCode = await runInherit('ping', ['-c', String(count), '-W', '2', peer.ipAddresses[0]!]);
      },
    );

  userspaceOptions(
    socketOption(
      program
        .command('ssh <node> [sshArgs...]')
        .description(
          'ssh to a peer over the mesh; arguments after -- go to ssh, e.g. meshgate ssh fw1 -- -l root uptime',
        ),
    ),
  )
    .option('--userspace', 'join the mesh in this process even if an agent runs here (no root needed)')
    .addHelpText(
      'after',
      `
With an agent on this host, ssh goes through its interface. Without one (or with
--userspace) meshgate joins the mesh in this process as an ordinary user, with
--coordinator, --fingerprint and --auth-key-file (- reads the key from stdin),
finds the node by exact name, unique name prefix or mesh IP, runs the system ssh
through the mesh with host key checking under the node's name, and logs out at
the end:
  metalctl vpn key ... | meshgate ssh --auth-key-file - fw1 -- -l metal hostname`,
    )
    .action(
      async (
        node: string,
        sshArgs: string[],
        o: { socket: string; userspace?: boolean } & UserspaceOptions,
      ) => {
        const at = node.lastIndexOf('@');
        const user = at >= 0 ? node.slice(0, at + 1) : '';
        const [options, command] = splitSshArgs(sshArgs);
        const status = o.userspace ? null : await agentStatus(o.socket).catch((e: Error) => e);
        if (status === null || (status instanceof Error && !existsSync(o.socket))) {
          const mesh = await joinFromOptions(o);
          try {
            process.exitCode = await sshOverMesh(mesh, node.slice(at + 1), user, options, command);
          } finally {
            await mesh.close();
          }
          return;
        }
        if (status instanceof Error) throw status;
        const peer = resolvePeer(status, node.slice(at + 1));
        process.exitCode = await runInherit('ssh', [
          ...options,
          '--',
          `${user}${peer.ipAddresses[0]}`,
          ...command,
        ]);
      },
    );

  socketOption(
    program
      .command('down')
      .description(
        'stop the mesh and leave the agent idle, also across restarts and reboots, until meshgate up',
      ),
  ).action(async (o: { socket: string }) => {
    await agentDown(o.socket);
    process.stderr.write(`meshgate is down: ${(await agentStatus(o.socket)).state.message}\n`);
  });

  socketOption(
    program.command('up').description('start the mesh again after meshgate down (or join anew after logout)'),
  ).action(async (o: { socket: string }) => {
    await agentUp(o.socket);
    process.stderr.write(`meshgate is up: ${(await agentStatus(o.socket)).state.message}\n`);
  });

  socketOption(
    program
      .command('logout')
      .description(
        'leave the mesh for good: the coordinator deletes this node, the agent forgets its identity and stays down',
      ),
  ).action(async (o: { socket: string }) => {
    await agentLogout(o.socket);
    process.stderr.write(
      'logged out: this node is deleted; "meshgate up" joins anew with the auth key file\n',
    );
  });
}

/** ssh options (with their values) come before the destination, the remote command after it. */
export function splitSshArgs(args: string[]): [string[], string[]] {
  const withValue = new Set([
    '-b',
    '-c',
    '-D',
    '-E',
    '-e',
    '-F',
    '-I',
    '-i',
    '-J',
    '-L',
    '-l',
    '-m',
    '-O',
    '-o',
    '-p',
    '-Q',
    '-R',
    '-S',
    '-W',
    '-w',
  ]);
  const options: string[] = [];
  let i = 0;
  while (i < args.length && args[i]!.startsWith('-')) {
    const a = args[i]!;
    options.push(a);
    if (withValue.has(a) && i + 1 < args.length) options.push(args[++i]!);
    i++;
  }
  return [options, args.slice(i)];
}
