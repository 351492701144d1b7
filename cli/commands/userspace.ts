// Commands that join the mesh inside this process, as an ordinary user:
// `connect` (stdin/stdout to a TCP port over the mesh), `proxy` (SOCKS5 into
// the mesh) and the userspace paths of `ssh` and `ping`. Without --state-dir
// the node has fresh keys and logs out at the end; with it, it keeps its
// identity there and stays registered.
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, isIP } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { Command } from 'commander';
import { joinMesh, type Mesh } from '../../userspace/node.js';
import { createSocks5Server } from '../../userspace/socks5.js';
import { CliError } from '../errors.js';

export interface UserspaceOptions {
  coordinator?: string;
  fingerprint?: string;
  authKeyFile?: string;
  hostname?: string;
  stateDir?: string;
}

export function userspaceOptions(cmd: Command): Command {
  return cmd
    .option('--coordinator <url>', 'coordinator address, grpcs://HOST:PORT (env MESHGATE_COORDINATOR)')
    .option('--fingerprint <sha256:hex>', 'pin the coordinator TLS key (env MESHGATE_FINGERPRINT)')
    .option(
      '--auth-key-file <file>',
      'file with the auth key, - for stdin (env MESHGATE_AUTH_KEY holds the key itself)',
    )
    .option('--hostname <name>', 'node name to ask for (default: this host name)')
    .option(
      '--state-dir <dir>',
      "keep this node's identity in DIR (0700) and stay registered at exit; without it the node is ephemeral",
    );
}

function readAuthKey(file: string | undefined): string {
  if (file === '-') return readFileSync(0, 'utf8').trim();
  if (file) {
    try {
      return readFileSync(file, 'utf8').trim();
    } catch (e) {
      throw new CliError(`cannot read the auth key from ${file}: ${(e as NodeJS.ErrnoException).code ?? e}`);
    }
  }
  const fromEnv = process.env.MESHGATE_AUTH_KEY?.trim();
  if (fromEnv) return fromEnv;
  throw new CliError('no auth key: give --auth-key-file FILE (or - for stdin), or set MESHGATE_AUTH_KEY');
}

export async function joinFromOptions(o: UserspaceOptions): Promise<Mesh> {
  const coordinator = o.coordinator ?? process.env.MESHGATE_COORDINATOR;
  if (!coordinator)
    throw new CliError('no coordinator: give --coordinator grpcs://HOST:PORT or set MESHGATE_COORDINATOR');
  const fingerprint = o.fingerprint ?? process.env.MESHGATE_FINGERPRINT;
  // A registered identity needs no key; one is read only if the coordinator asks again.
  const registered = o.stateDir !== undefined && existsSync(join(o.stateDir, 'node.json'));
  return joinMesh({
    coordinator,
    ...(fingerprint ? { fingerprint } : {}),
    authKey: registered ? () => readAuthKey(o.authKeyFile) : readAuthKey(o.authKeyFile),
    ...(o.hostname ? { hostname: o.hostname } : {}),
    ...(o.stateDir ? { stateDir: o.stateDir } : {}),
  });
}

function parsePort(text: string): number {
  const port = Number(text);
  if (!Number.isInteger(port) || port < 1 || port > 65535)
    throw new CliError(`"${text}" is not a TCP port (1-65535)`);
  return port;
}

/**
 * Runs the system ssh with a ProxyCommand that hands its stdin and stdout to
 * this process through a private unix socket, which dials port 22 over the mesh.
 */
export async function sshOverMesh(
  mesh: Mesh,
  target: string,
  user: string,
  options: string[],
  command: string[],
): Promise<number> {
  const peer = mesh.resolve(target);
  // The first connection is dialed at once, so the WireGuard and TCP
  // handshakes overlap with starting ssh and its ProxyCommand.
  let early: Promise<Duplex> | null = mesh.dial(peer.name, 22);
  early.catch(() => {});
  const dir = await mkdtemp(join(tmpdir(), 'meshgate-ssh-'));
  const path = join(dir, 'proxy.sock');
  const server = createServer((local) => {
    const dialed = early ?? mesh.dial(peer.name, 22);
    early = null;
    dialed.then(
      (remote) => {
        pipeline(local, remote).catch(() => {});
        pipeline(remote, local).catch(() => {});
      },
      (e: Error) => {
        process.stderr.write(`meshgate: ${e.message}\n`);
        local.destroy();
      },
    );
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  // No quotes or % in the script: ssh expands % and hands the line to a shell.
  const proxy = `const s=require("net").connect(process.argv[1]);process.stdin.pipe(s);s.pipe(process.stdout);s.on("error",()=>process.exit(1));s.on("end",()=>process.exit(0))`;
  try {
    return await new Promise<number>((resolve, reject) => {
      const child = spawn(
        'ssh',
        [
          '-o',
          `ProxyCommand=${JSON.stringify(process.execPath)} -e '${proxy}' ${JSON.stringify(path)}`,
          '-o',
          `HostKeyAlias=${peer.name}`,
          ...options,
          '--',
          `${user}${peer.name}`,
          ...command,
        ],
        { stdio: 'inherit' },
      );
      child.on('error', (err: NodeJS.ErrnoException) =>
        reject(new CliError(err.code === 'ENOENT' ? 'ssh not found: install openssh-client' : err.message)),
      );
      child.on('exit', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
    });
  } finally {
    early?.then((s) => s.destroy()).catch(() => {});
    server.close();
    await rm(dir, { recursive: true, force: true });
  }
}

/** `meshgate ping` in this process: ICMP echo over the mesh, one line per reply as ping prints them. */
export async function pingOverMesh(mesh: Mesh, target: string, count: number): Promise<number> {
  const peer = mesh.resolve(target);
  const address = peer.ipAddresses[0] ?? '';
  process.stdout.write(`PING ${peer.name} (${address}) over the mesh\n`);
  const times: number[] = [];
  for (let seq = 1; seq <= count; seq++) {
    const started = Date.now();
    try {
      const ms = await mesh.ping(peer.name, 2_000, seq);
      times.push(ms);
      process.stdout.write(
        `reply from ${peer.name} (${address}): icmp_seq=${seq} time=${ms.toFixed(2)} ms\n`,
      );
    } catch (e) {
      process.stdout.write(`no reply from ${peer.name}: icmp_seq=${seq} (${(e as Error).message})\n`);
    }
    if (seq < count) await new Promise((r) => setTimeout(r, Math.max(0, 1000 - (Date.now() - started))));
  }
  const loss = Math.round((100 * (count - times.length)) / count);
  process.stdout.write(
    `--- ${peer.name} ping statistics ---\n${count} packets transmitted, ${times.length} received, ${loss}% packet loss\n`,
  );
  if (times.length) {
    const avg = times.reduce((a, b) => a + b, 0) / times.length;
    process.stdout.write(
      `rtt min/avg/max = ${Math.min(...times).toFixed(2)}/${avg.toFixed(2)}/${Math.max(...times).toFixed(2)} ms\n`,
    );
  }
  return times.length ? 0 : 1;
}

/** "HOST:PORT", "[V6]:PORT" or "PORT" (on 127.0.0.1). */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text) ?? /^()()(\d+)$/.exec(text);
  const host = m?.[1] || m?.[2] || '127.0.0.1';
  if (!m || !isIP(host))
    throw new CliError(`"${text}" is not a listen address: give IP:PORT, e.g. 127.0.0.1:1080`);
  return { host, port: parsePort(m[3]!) };
}

const isLoopback = (host: string) => host === '::1' || host.startsWith('127.');

/** Serves SOCKS5 into the mesh until SIGINT or SIGTERM. */
async function runProxy(listen: string, o: UserspaceOptions): Promise<void> {
  const { host, port } = parseListen(listen);
  const log = (line: string) => process.stderr.write(`${new Date().toISOString()} ${line}\n`);
  let mesh: Mesh | null = null;
  const server = createSocks5Server({
    dial: (target, p) => {
      if (!mesh) return Promise.reject(new Error('not in the mesh yet'));
      return mesh.dial(target, p);
    },
    log,
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) =>
      reject(
        new CliError(
          `cannot listen on ${listen}: ${
            e.code === 'EADDRINUSE'
              ? 'the port is in use'
              : e.code === 'EADDRNOTAVAIL'
                ? 'no such address on this host'
                : e.code === 'EACCES'
                  ? 'permission denied (ports below 1024 need root)'
                  : (e.code ?? e.message)
          }`,
        ),
      ),
    );
    server.listen(port, host, resolve);
  });
  if (!isLoopback(host))
    log(`warning: ${host} is not a loopback address: whoever reaches it enters the mesh as this node`);
  const stop = new Promise<NodeJS.Signals>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  try {
    mesh = await joinFromOptions(o);
    const self = mesh.node;
    log(
      `SOCKS5 on ${listen} into the mesh as ${self?.name} (${self?.ipAddresses.join(' ')})${
        mesh.persistent ? '' : '; leaves the mesh on Ctrl-C'
      }`,
    );
    log(`stopping on ${await stop}`);
  } finally {
    server.close();
    await mesh?.close();
  }
}

export function registerUserspaceCommands(program: Command): void {
  userspaceOptions(
    program
      .command('connect <node> <port>')
      .description(
        'join the mesh in this process and connect stdin/stdout to a TCP port of a node (no root, no agent)',
      ),
  )
    .addHelpText(
      'after',
      `
Useful as an ssh ProxyCommand, and for scp, rsync and git over ssh:
  ssh -o ProxyCommand='meshgate connect --auth-key-file ~/.meshgate-key %h %p' fw1

The node joins with the auth key, lives as long as the connection, and logs out
at the end (with an ephemeral key the coordinator forgets it at once).`,
    )
    .action(async (node: string, portText: string, o: UserspaceOptions) => {
      const port = parsePort(portText);
      if (o.authKeyFile === '-')
        throw new CliError('connect uses stdin for the connection: give the auth key in a file');
      const mesh = await joinFromOptions(o);
      try {
        const socket = await mesh.dial(node, port);
        // Our half-close (stdin at EOF) is passed on; theirs ends the command.
        pipeline(process.stdin, socket).catch(() => {});
        await pipeline(socket, process.stdout);
        process.stdin.destroy();
      } finally {
        await mesh.close();
      }
    });

  userspaceOptions(
    program
      .command('proxy')
      .description('join the mesh in this process and serve SOCKS5 into it (no root, no agent)'),
  )
    .requiredOption('--socks5 <address>', 'where to listen, IP:PORT', '127.0.0.1:1080')
    .addHelpText(
      'after',
      `
Only CONNECT and the "no authentication" method; the target is a node name
(exact, unique prefix, or NAME.<mesh domain>) or a mesh IP. Let the client
send names, not resolve them itself:
  curl --socks5-hostname 127.0.0.1:1080 http://fw1:8080/
  ssh -o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p' fw1

Anyone who can reach the listen address uses the mesh as this node: keep it on
loopback. Each connection is logged on stderr. Ctrl-C (or SIGTERM) stops it.`,
    )
    .action(async (o: UserspaceOptions & { socks5: string }) => {
      await runProxy(o.socks5, o);
    });
}
