// Runs the networking tools (wg, ip, nft, wireguard-go) as child processes without a shell, so no
// argument is ever interpreted; secrets travel through stdin or files, never through argv.
import { spawn } from 'node:child_process';

export interface RunOptions {
  /** Written to the child's stdin, which is then closed. Never shown in errors. */
  input?: string;
  /** Runs the command inside this network namespace through `ip netns exec`. */
  netns?: string;
  /** Kills the child after this long; tools that hang must not hang the agent. */
  timeoutMs?: number;
}

const PACKAGE_OF: Record<string, string> = {
  wg: 'wireguard-tools',
  'wireguard-go': 'wireguard-go',
  ip: 'iproute2',
  nft: 'nftables',
};

/** The command's binary is not installed (or not on PATH). */
export class MissingToolError extends Error {
  constructor(readonly tool: string) {
    super(`${tool} not found: install ${PACKAGE_OF[tool] ?? tool}`);
    this.name = 'MissingToolError';
  }
}

/** The command ran and failed; the message carries what it printed first, so a person can act on it. */
export class CommandError extends Error {
  constructor(
    readonly command: string,
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    const reason = firstLine(stderr) || (exitCode === null ? 'killed' : 'no error output');
    super(`${command} failed (exit ${exitCode ?? 'signal'}): ${reason}`);
    this.name = 'CommandError';
  }
}

const DEFAULT_TIMEOUT_MS = 30_000;
// Long peer lists make argv huge; an error message only needs to say which command it was.
const MAX_SHOWN_COMMAND = 160;

function describeCommand(cmd: string, args: readonly string[]): string {
  const text = [cmd, ...args].join(' ');
  return text.length > MAX_SHOWN_COMMAND ? `${text.slice(0, MAX_SHOWN_COMMAND)}...` : text;
}

/** Builds the argv that runs `cmd` in `netns` (or in the current namespace). */
export function inNetns(cmd: string, args: readonly string[], netns?: string): [string, string[]] {
  return netns ? ['ip', ['netns', 'exec', netns, cmd, ...args]] : [cmd, [...args]];
}

export function run(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<string> {
  const [file, argv] = inNetns(cmd, args, options.netns);
  const shown = describeCommand(cmd, args);
  return new Promise((resolve, reject) => {
    const child = spawn(file, argv, { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    // A child that exits before reading its stdin makes the write fail with EPIPE; the exit code
    // and stderr already tell what went wrong.
    child.stdin.on('error', () => {});
    child.stdin.end(options.input ?? '');
    child.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(e.code === 'ENOENT' ? new MissingToolError(file) : e);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      const stderr = Buffer.concat(err).toString();
      if (code === 0) return resolve(Buffer.concat(out).toString());
      // `ip netns exec` reports a missing inner binary on stderr rather than with ENOENT.
      if (options.netns && /^exec of ".*" failed: No such file or directory/m.test(stderr)) {
        return reject(new MissingToolError(cmd));
      }
      reject(new CommandError(shown, code, timedOut ? 'timed out' : stderr));
    });
  });
}

function firstLine(text: string): string {
  return (
    text
      .split('\n')
      .map((l) => l.trim())
      .find((l) => l.length > 0) ?? ''
  );
}
