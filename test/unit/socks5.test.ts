// The SOCKS5 server against a real client socket: the byte-level exchange of
// RFC 1928, the refusals and their reply codes, and data in both directions.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { type AddressInfo, connect, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseListen } from '../../cli/commands/userspace.js';
import { createSocks5Server, Reply, replyFor } from '../../userspace/socks5.js';

/** Reads from `s` until `n` bytes (or the end) have arrived. */
async function read(s: Socket, n: number): Promise<Buffer> {
  let buf = Buffer.alloc(0);
  while (buf.length < n) {
    const chunk = s.read() as Buffer | null;
    if (chunk) {
      buf = Buffer.concat([buf, chunk]);
      continue;
    }
    if (s.readableEnded || s.destroyed) break;
    await Promise.race([once(s, 'readable'), once(s, 'end'), once(s, 'close')]);
  }
  return buf;
}

async function untilClosed(s: Socket): Promise<Buffer> {
  return read(s, Number.POSITIVE_INFINITY);
}

describe('SOCKS5 server', () => {
  let echo: Server;
  let socks: Server;
  let port: number;
  const dials: string[] = [];
  const logs: string[] = [];

  before(async () => {
    echo = createServer((c) => c.pipe(c));
    await new Promise<void>((r) => echo.listen(0, '127.0.0.1', r));
    const echoPort = (echo.address() as AddressInfo).port;
    socks = createSocks5Server({
      dial: async (host, p) => {
        dials.push(`${host}:${p}`);
        if (host === 'fw1' || host === '100.64.0.1' || host === 'fd7a::1') {
          const s = connect(echoPort, '127.0.0.1');
          await once(s, 'connect');
          return s;
        }
        if (host === 'closed') throw Object.assign(new Error('connection refused'), { code: 'ECONNREFUSED' });
        if (host === 'broken') throw new Error('something else');
        throw Object.assign(new Error(`no node "${host}" in this mesh`), { code: 'ENOTFOUND' });
      },
      log: (line) => logs.push(line),
    });
    await new Promise<void>((r) => socks.listen(0, '127.0.0.1', r));
    port = (socks.address() as AddressInfo).port;
  });
  after(() => {
    socks.close();
    echo.close();
  });

  const client = async () => {
    const s = connect(port, '127.0.0.1');
    await once(s, 'connect');
    return s;
  };
  const domain = (name: string, p: number, command = 1) =>
    Buffer.concat([
      Buffer.from([5, command, 0, 3, name.length]),
      Buffer.from(name),
      Buffer.from([p >> 8, p & 255]),
    ]);

  it('connects by name, in pieces, and carries data both ways', async () => {
    const s = await client();
    s.write(Buffer.from([5]));
    s.write(Buffer.from([2, 2, 0]));
    assert.deepEqual([...(await read(s, 2))], [5, 0]);
    const req = domain('fw1', 22);
    s.write(req.subarray(0, 3));
    s.write(req.subarray(3));
    const rep = await read(s, 10);
    assert.deepEqual([...rep.subarray(0, 2)], [5, Reply.Succeeded]);
    s.write('hello');
    assert.equal((await read(s, 5)).toString(), 'hello');
    s.end();
    await untilClosed(s);
    assert.ok(dials.includes('fw1:22'));
  });

  it('passes on data the client sends before the reply', async () => {
    const s = await client();
    s.write(Buffer.concat([Buffer.from([5, 1, 0]), domain('fw1', 80), Buffer.from('early')]));
    const got = await read(s, 2 + 10 + 5);
    assert.equal(got.subarray(12).toString(), 'early');
    s.destroy();
  });

  it('connects by IPv4 and IPv6 address', async () => {
    for (const [atyp, addr, want] of [
      [1, [100, 64, 0, 1], '100.64.0.1'],
      [4, [0xfd, 0x7a, ...Array(13).fill(0), 1], 'fd7a::1'],
    ] as const) {
      const s = await client();
      s.write(Buffer.from([5, 1, 0, 5, 1, 0, atyp, ...addr, 0, 22]));
      const rep = await read(s, 12);
      assert.equal(rep[3], Reply.Succeeded, `reply for ${want}`);
      assert.ok(dials.includes(`${want}:22`), `dialed ${want}: ${dials.join(' ')}`);
      s.destroy();
    }
    assert.ok(logs.some((l) => l.includes('-> [fd7a::1]:22: connected')));
  });

  it('refuses clients that want authentication with 0xFF', async () => {
    const s = await client();
    s.write(Buffer.from([5, 1, 2]));
    assert.deepEqual([...(await untilClosed(s))], [5, 0xff]);
    assert.ok(logs.some((l) => /no "no authentication" method, refused/.test(l)));
  });

  it('refuses BIND and UDP ASSOCIATE with "command not supported"', async () => {
    for (const [cmd, name] of [
      [2, 'BIND'],
      [3, 'UDP ASSOCIATE'],
    ] as const) {
      const s = await client();
      s.write(Buffer.concat([Buffer.from([5, 1, 0]), domain('fw1', 22, cmd)]));
      const got = await untilClosed(s);
      assert.equal(got[3], Reply.CommandNotSupported);
      assert.ok(logs.some((l) => l.includes(`${name} not supported (only CONNECT)`)));
    }
  });

  it('refuses an unknown address type with "address type not supported"', async () => {
    const s = await client();
    s.write(Buffer.from([5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 22]));
    const got = await untilClosed(s);
    assert.equal(got[3], Reply.AddressTypeNotSupported);
  });

  it('answers failed dials with the code that fits', async () => {
    for (const [host, code] of [
      ['nosuch', Reply.HostUnreachable],
      ['closed', Reply.ConnectionRefused],
      ['broken', Reply.GeneralFailure],
    ] as const) {
      const s = await client();
      s.write(Buffer.concat([Buffer.from([5, 1, 0]), domain(host, 22)]));
      const got = await untilClosed(s);
      assert.equal(got[3], code, host);
    }
    assert.ok(logs.some((l) => l.includes('-> nosuch:22: no node "nosuch" in this mesh')));
  });

  it('closes on a client that is not SOCKS5', async () => {
    const s = await client();
    s.write(Buffer.from([4, 1, 0, 22, 100, 64, 0, 1, 0]));
    assert.equal((await untilClosed(s)).length, 0);
  });

  it('maps error codes to replies', () => {
    assert.equal(replyFor({ code: 'ETIMEDOUT' }), Reply.HostUnreachable);
    assert.equal(replyFor({ code: 'ENETUNREACH' }), Reply.NetworkUnreachable);
    assert.equal(replyFor(new Error('x')), Reply.GeneralFailure);
  });
});

describe('meshgate proxy --socks5', () => {
  it('takes IP:PORT, [IPv6]:PORT or a port, and nothing else', () => {
    assert.deepEqual(parseListen('127.0.0.1:1080'), { host: '127.0.0.1', port: 1080 });
    assert.deepEqual(parseListen('[::1]:1081'), { host: '::1', port: 1081 });
    assert.deepEqual(parseListen('1082'), { host: '127.0.0.1', port: 1082 });
    assert.throws(
      () => parseListen('localhost:1080'),
      /"localhost:1080" is not a listen address: give IP:PORT/,
    );
    assert.throws(() => parseListen('127.0.0.1:70000'), /"70000" is not a TCP port/);
  });

  it('says in one line that the port is taken, before joining the mesh', async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    const port = (taken.address() as AddressInfo).port;
    try {
      const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const child = spawn(
          process.execPath,
          [
            '--import',
            'tsx',
            join(import.meta.dirname, '..', '..', 'cli', 'main.ts'),
            'proxy',
            '--socks5',
            `127.0.0.1:${port}`,
            '--coordinator',
            'grpcs://127.0.0.1:1',
          ],
          { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, MESHGATE_AUTH_KEY: 'unused' } },
        );
        let stderr = '';
        child.stderr.on('data', (d) => {
          stderr += d;
        });
        child.on('exit', (code) => resolve({ code, stderr }));
      });
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `meshgate: cannot listen on 127.0.0.1:${port}: the port is in use\n`);
    } finally {
      taken.close();
    }
  });
});
