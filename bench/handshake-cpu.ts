// What a new connection costs a bare Node server in CPU, without gRPC or
// meshgate: the floor under the coordinator's CPU per cold registration,
// where every agent opens a TLS connection of its own. The server has the
// coordinator's kind of identity (a P-256 key, coordinator/tls.ts); a client
// process opens N connections, 50 at a time, each ending after one answer
// (plain TLS 1.3, then an HTTP/2 session with one request over it). JSON on stdout.
//
//   node --import tsx bench/handshake-cpu.ts [--connections 2000]
import { fork } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createSecureServer, connect as h2connect } from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, connect as tlsConnect } from 'node:tls';
import { parseArgs } from 'node:util';
import { ensureTlsIdentity } from '../coordinator/tls.js';

const IN_FLIGHT = 50;

const { values } = parseArgs({
  options: {
    role: { type: 'string' },
    mode: { type: 'string' },
    port: { type: 'string' },
    dir: { type: 'string' },
    connections: { type: 'string', default: '2000' },
  },
});
const n = Number(values.connections);
if (!Number.isInteger(n) || n < 1)
  throw new Error('--connections: a whole number of connections, at least 1');

function server(mode: string, dir: string): void {
  void ensureTlsIdentity(dir).then(({ key, cert }) => {
    const opts = { key, cert, minVersion: 'TLSv1.3' as const };
    let answered = 0;
    let cpu0 = process.cpuUsage();
    const s =
      mode === 'tls'
        ? createServer(opts, (sock) => {
            answered++;
            sock.end('x');
          })
        : createSecureServer(opts).on('stream', (st) => {
            answered++;
            st.respond({ ':status': 200 });
            st.end('x');
          });
    s.listen(0, '127.0.0.1', () => process.send!((s.address() as { port: number }).port));
    process.on('message', (m) => {
      if (m === 'start') {
        cpu0 = process.cpuUsage();
        process.send!('started');
        return;
      }
      const u = process.cpuUsage(cpu0);
      process.send!({
        answered,
        cpuMsEach: Math.round(((u.user + u.system) / 1000 / answered) * 1000) / 1000,
      });
    });
  });
}

async function client(mode: string, port: number): Promise<void> {
  const one = () =>
    new Promise<void>((resolve, reject) => {
      if (mode === 'tls') {
        const s = tlsConnect({ port, host: '127.0.0.1', rejectUnauthorized: false });
        s.on('data', () => {});
        s.once('end', () => {
          s.destroy();
          resolve();
        });
        s.once('error', reject);
      } else {
        const c = h2connect(`https://127.0.0.1:${port}`, { rejectUnauthorized: false });
        c.once('error', reject);
        const r = c.request({ ':path': '/' });
        r.on('data', () => {});
        r.once('end', () => {
          c.close();
          resolve();
        });
      }
    });
  for (let i = 0; i < n; i += IN_FLIGHT)
    await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, n - i) }, one));
}

const reply = <T>(child: ReturnType<typeof fork>) =>
  new Promise<T>((resolve) => child.once('message', resolve as never));

if (values.role === 'server') server(values.mode!, values.dir!);
else if (values.role === 'client') await client(values.mode!, Number(values.port));
else {
  const dir = mkdtempSync(join(tmpdir(), 'handshake-cpu-'));
  const results: Record<string, unknown>[] = [];
  try {
    for (const mode of ['tls', 'h2']) {
      const args = (role: string, extra: string[] = []) => ['--role', role, '--mode', mode, ...extra];
      const srv = fork(import.meta.filename, args('server', ['--dir', dir]), {
        execArgv: ['--import', 'tsx'],
      });
      // A server left running would keep this process, and its IPC channel, alive.
      const r = await (async () => {
        try {
          const port = await reply<number>(srv);
          srv.send('start');
          await reply(srv);
          const cli = fork(
            import.meta.filename,
            args('client', ['--port', String(port), '--connections', String(n)]),
            { execArgv: ['--import', 'tsx'] },
          );
          const code = await new Promise<number | null>((resolve) => cli.once('exit', resolve));
          if (code !== 0) throw new Error(`the client exited with ${code}`);
          srv.send('stop');
          return await reply<{ answered: number; cpuMsEach: number }>(srv);
        } finally {
          srv.kill();
        }
      })();
      results.push({
        mode:
          mode === 'tls' ? 'TLS 1.3 handshake, one write' : 'TLS 1.3 with an HTTP/2 session and one request',
        connections: r.answered,
        serverCpuMsPerConnection: r.cpuMsEach,
      });
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  process.stdout.write(`${JSON.stringify({ benchmark: 'handshake-cpu', inFlight: IN_FLIGHT, results })}\n`);
}
