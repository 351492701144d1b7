// What one connection costs a Node server on its own, without meshgate: the
// floor under the coordinator's memory per connected agent. A server process
// (plain TLS 1.3, or HTTP/2 over it with one open stream per connection, as
// an agent's sync stream) and a client process that opens N connections; the
// server's resident memory before and after, per connection. JSON on stdout.
//
//   node --import tsx bench/connection-memory.ts [--connections 1000] [--bytes 0] [--write-size N] [--malloc]
//
// --bytes: the server sends this many bytes on each connection (stream) and
// keeps it open, as a full netmap; --write-size: plain TLS hands them to the
// socket in writes of at most this many bytes, each once the last one is
// written (HTTP/2 writes what the peer's window allows at once); --malloc:
// the server runs with the glibc settings of deploy/meshgate-coordinator.service.
import { spawn } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createSecureServer, connect as h2connect } from 'node:http2';
import { createServer, connect as tlsConnect } from 'node:tls';
import { parseArgs } from 'node:util';
import forge from 'node-forge';
import { unitEnvironment } from './lib/coordinator-process.js';
import { sleep } from './lib/stats.js';

const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);

/** A throwaway self-signed RSA certificate (the key type does not change the memory per connection). */
function identity(): { key: string; cert: string } {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', {
    modulusLength: 2048,
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'pem' },
  });
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(publicKey);
  cert.serialNumber = '01';
  cert.validity.notBefore = new Date(Date.now() - 3_600_000);
  cert.validity.notAfter = new Date(Date.now() + 86_400_000);
  cert.setSubject([{ name: 'commonName', value: 'bench' }]);
  cert.setIssuer([{ name: 'commonName', value: 'bench' }]);
  cert.sign(forge.pki.privateKeyFromPem(privateKey) as forge.pki.rsa.PrivateKey, forge.md.sha256.create());
  return { key: privateKey, cert: forge.pki.certificateToPem(cert) };
}

async function server(mode: string, bytes: number, writeSize: number): Promise<void> {
  const { key, cert } = JSON.parse(process.env.BENCH_IDENTITY!) as { key: string; cert: string };
  const payload = Buffer.alloc(bytes);
  const listening = (port: number) => process.stdout.write(`${JSON.stringify({ port, rssKiB: rssKiB() })}\n`);
  if (mode === 'tls') {
    const s = createServer({ key, cert, minVersion: 'TLSv1.3' }, (sock) => {
      sock.on('data', () => {});
      const from = (at: number) => {
        if (at < bytes) sock.write(payload.subarray(at, at + writeSize), () => from(at + writeSize));
      };
      from(0);
    });
    s.listen(0, '127.0.0.1', () => listening((s.address() as { port: number }).port));
  } else {
    const s = createSecureServer({ key, cert, minVersion: 'TLSv1.3' });
    s.on('stream', (st) => {
      st.respond({ ':status': 200 });
      st.write(bytes ? payload : 'x');
    });
    s.listen(0, '127.0.0.1', () => listening((s.address() as { port: number }).port));
  }
  process.stdin.on('data', () => process.stdout.write(`${JSON.stringify({ rssKiB: rssKiB() })}\n`));
}

async function client(mode: string, port: number, n: number, bytes: number): Promise<void> {
  let received = 0;
  const want = n * Math.max(bytes, 1);
  const one = () =>
    new Promise<void>((resolve, reject) => {
      if (mode === 'tls') {
        const s = tlsConnect({ port, host: '127.0.0.1', rejectUnauthorized: false }, () => {
          s.write('x');
          resolve();
        });
        s.on('data', (d: Buffer) => {
          received += d.length;
        });
        s.once('error', reject);
      } else {
        const c = h2connect(`https://127.0.0.1:${port}`, { rejectUnauthorized: false });
        c.once('error', reject);
        const r = c.request({ ':path': '/' });
        r.on('data', (d: Buffer) => {
          received += d.length;
        });
        r.once('response', () => resolve());
      }
    });
  for (let i = 0; i < n; i += 20) await Promise.all(Array.from({ length: Math.min(20, n - i) }, one));
  while (bytes && received < want) await sleep(100);
  process.stdout.write('ready\n');
  setInterval(() => {}, 1 << 30);
}

const { values } = parseArgs({
  options: {
    role: { type: 'string' },
    mode: { type: 'string', default: 'h2' },
    port: { type: 'string' },
    connections: { type: 'string', default: '1000' },
    bytes: { type: 'string', default: '0' },
    'write-size': { type: 'string' },
    malloc: { type: 'boolean', default: false },
  },
});
const bytes = Number(values.bytes);
const writeSize = Number(values['write-size'] ?? bytes);
if (bytes && (!Number.isInteger(writeSize) || writeSize < 1))
  throw new Error('--write-size: a whole number of bytes, at least 1');
const n = Number(values.connections);
if (values.role === 'server') await server(values.mode!, bytes, writeSize);
else if (values.role === 'client') await client(values.mode!, Number(values.port), n, bytes);
else {
  const results: Record<string, unknown>[] = [];
  const env = {
    ...process.env,
    BENCH_IDENTITY: JSON.stringify(identity()),
    ...(values.malloc ? unitEnvironment() : {}),
  };
  for (const mode of ['tls', 'h2']) {
    const args = (role: string, extra: string[] = []) => [
      '--import',
      'tsx',
      import.meta.filename,
      '--role',
      role,
      '--mode',
      mode,
      '--bytes',
      String(bytes),
      '--write-size',
      String(writeSize),
      ...extra,
    ];
    const srv = spawn(process.execPath, args('server'), { env, stdio: ['pipe', 'pipe', 'inherit'] });
    const lines: string[] = [];
    srv.stdout.setEncoding('utf8').on('data', (d: string) => lines.push(...d.trim().split('\n')));
    while (!lines.length) await sleep(50);
    const { port, rssKiB: before } = JSON.parse(lines.shift()!) as { port: number; rssKiB: number };
    const cli = spawn(
      process.execPath,
      args('client', ['--port', String(port), '--connections', String(n)]),
      {
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    await new Promise<void>((resolve) => cli.stdout.once('data', () => resolve()));
    // Let the server's timers and deferred frees settle.
    await sleep(3000);
    srv.stdin.write('\n');
    while (!lines.length) await sleep(50);
    const after = (JSON.parse(lines.shift()!) as { rssKiB: number }).rssKiB;
    results.push({
      mode: mode === 'tls' ? 'TLS 1.3' : 'HTTP/2 over TLS 1.3, one open stream',
      connections: n,
      bytesSentPerConnection: bytes,
      ...(mode === 'tls' ? { writeSize } : {}),
      serverRssBeforeKiB: before,
      serverRssAfterKiB: after,
      perConnectionKiB: Math.round(((after - before) / n) * 10) / 10,
    });
    cli.kill();
    srv.kill();
  }
  process.stdout.write(
    `${JSON.stringify({ benchmark: 'connection-memory', malloc: values.malloc, results })}\n`,
  );
}
