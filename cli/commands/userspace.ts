// Commands that join the mesh inside this process, as an ordinary user:
// `connect` (stdin/stdout to a TCP port over the mesh) and the userspace path
// of `ssh`. The node is ephemeral when its auth key is, and logs out at the end.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Command } from 'commander';
import { joinMesh, type Mesh } from '../../userspace/node.js';
import { CliError } from '../errors.js';

export interface UserspaceOptions {
  coordinator?: string;
  fingerprint?: string;
  authKeyFile?: string;
  hostname?: string;
}

export function userspaceOptions(cmd: Command): Command {
  return cmd
    .option('--coordinator <url>', 'coordinator address, grpcs://HOST:PORT (env MESHGATE_COORDINATOR)')
    .option('--fingerprint <sha256:hex>', 'pin the coordinator TLS key (env MESHGATE_FINGERPRINT)')
    .option(
      '--auth-key-file <file>',
      'file with the auth key, - for stdin (env MESHGATE_AUTH_KEY holds the key itself)',
    )
    .option('--hostname <name>', 'node name to ask for (default: this host name)');
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
  return joinMesh({
    coordinator,
    ...(fingerprint ? { fingerprint } : {}),
    authKey: readAuthKey(o.authKeyFile),
    ...(o.hostname ? { hostname: o.hostname } : {}),
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
  const dir = await mkdtemp(join(tmpdir(), 'meshgate-ssh-'));
  const path = join(dir, 'proxy.sock');
  const server = createServer((local) => {
    mesh.dial(peer.name, 22).then(
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
    server.close();
    await rm(dir, { recursive: true, force: true });
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
}
