// Runs the real `meshgate` command as child processes.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { join } from 'node:path';

export const BIN = join(import.meta.dirname, '..', '..', 'bin', 'meshgate');

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

export function meshgate(args: string[], env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [BIN, ...args],
      { env: { ...process.env, ...env }, timeout: 60_000 },
      (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

export interface Started {
  proc: ChildProcess;
  grpcPort: number;
  httpPort: number;
  fingerprint: string;
  /** What it printed on stdout when it was ready. */
  banner: string;
}

export function startCoordinator(dataDir: string): Promise<Started> {
  return new Promise((resolve, reject) => {
    const proc = spawn(
      process.execPath,
      [
        BIN,
        'coordinator',
        '--data-dir',
        dataDir,
        '--grpc-listen',
        '127.0.0.1:0',
        '--http-listen',
        '127.0.0.1:0',
        '--log-level',
        'warn',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    proc.stderr!.on('data', (d) => {
      err += d;
    });
    proc.stdout!.on('data', (d) => {
      out += d;
      const grpc = /gRPC\s+\S+:(\d+)/.exec(out);
      const http = /HTTPS?\s+\S+:(\d+)/.exec(out);
      const fp = /fingerprint\s+(sha256:[0-9a-f]{64})/.exec(out);
      if (grpc && http && fp)
        resolve({
          proc,
          grpcPort: Number(grpc[1]),
          httpPort: Number(http[1]),
          fingerprint: fp[1]!,
          banner: out,
        });
    });
    proc.once('exit', (code) => reject(new Error(`coordinator exited with ${code}: ${err}`)));
  });
}

export function stop(proc: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
  return new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) return resolve(proc.exitCode);
    proc.once('exit', (code) => resolve(code));
    proc.kill(signal);
  });
}
