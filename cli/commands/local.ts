// Commands that talk to the agent on this host: status, ping, ssh, down.
import { spawn } from 'node:child_process';
import type { Command } from 'commander';
import { agentDown, agentStatus } from '../../agent/localapi/client.js';
import type { AgentStatus, PeerStatus } from '../../agent/localapi/types.js';
import { escapeUnsafe } from '../../proto/text.js';
import { CliError } from '../errors.js';
import { ago, type Column, FORMATS, parseFormat, render } from '../output.js';
import { DEFAULT_AGENT_SOCKET } from './agent.js';

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

function statusText(s: AgentStatus, wide: boolean): string {
  const drift = s.desiredVersion && s.desiredVersion !== s.version ? ` (desired ${s.desiredVersion})` : '';
  const lines = [
    `node         ${s.self.name || '(not registered)'} ${s.self.ipAddresses.join(' ')}`,
    `project      ${s.self.project}`,
    `coordinator  ${s.coordinator.url}: ${s.coordinator.state}${s.coordinator.error ? ` (${s.coordinator.error})` : ''}`,
    `interface    ${s.interface.name} (${s.interface.backend}, udp ${s.interface.listenPort})`,
    `version      ${s.version}${drift}`,
    `lockdown     ${s.lockdownPorts.length ? `tcp ${s.lockdownPorts.join(',')} only over the mesh` : 'off'}`,
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

  socketOption(
    program.command('ping <node>').description('ping a peer over the mesh (name, id, id prefix or mesh IP)'),
  )
    .option('-c, --count <n>', 'number of pings', '3')
    .action(async (node: string, o: { socket: string; count: string }) => {
      const peer = resolvePeer(await agentStatus(o.socket), node);
      process.exitCode = await runInherit('ping', [
        '-c',
        String(Number(o.count) || 3),
        '-W',
        '2',
        peer.ipAddresses[0]!,
      ]);
    });

  socketOption(
    program
      .command('ssh <node> [sshArgs...]')
      .description(
        'ssh to a peer over the mesh; arguments after -- go to ssh, e.g. meshgate ssh fw1 -- -l root uptime',
      ),
  ).action(async (node: string, sshArgs: string[], o: { socket: string }) => {
    const at = node.lastIndexOf('@');
    const user = at >= 0 ? node.slice(0, at + 1) : '';
    const peer = resolvePeer(await agentStatus(o.socket), node.slice(at + 1));
    const [options, command] = splitSshArgs(sshArgs);
    process.exitCode = await runInherit('ssh', [
      ...options,
      '--',
      `${user}${peer.ipAddresses[0]}`,
      ...command,
    ]);
  });

  socketOption(
    program
      .command('down')
      .description('leave the mesh: log out (ephemeral nodes are deleted), remove firewall and interface'),
  ).action(async (o: { socket: string }) => {
    await agentDown(o.socket);
    process.stderr.write('meshgate is down\n');
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
