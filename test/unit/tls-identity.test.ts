import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { connect, createServer } from 'node:tls';
import { ensureTlsIdentity, tlsPaths } from '../../coordinator/tls.js';
import { spkiOf } from '../../proto/fingerprint.js';

const dirs: string[] = [];
const dataDir = () => {
  const d = mkdtempSync(join(tmpdir(), 'meshgate-tls-'));
  dirs.push(d);
  return d;
};
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

describe('coordinator TLS identity', () => {
  it('a new data dir gets a P-256 key and a self-signed certificate for its names that OpenSSL accepts', async () => {
    const dir = dataDir();
    const id = await ensureTlsIdentity(dir, ['10.1.2.3', 'coord.example']);
    assert.equal(id.created, true);
    const cert = new X509Certificate(id.cert);
    assert.equal(cert.publicKey.asymmetricKeyType, 'ec');
    assert.equal(cert.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1');
    assert.equal(cert.verify(cert.publicKey), true, 'the self-signature verifies');
    assert.equal(cert.checkHost('coord.example'), 'coord.example');
    assert.equal(cert.checkIP('10.1.2.3'), '10.1.2.3');
    assert.equal(cert.checkIP('127.0.0.1'), '127.0.0.1');
    assert.equal(id.fingerprint, spkiOf(id.cert));
    assert.equal(statSync(tlsPaths(dir).key).mode & 0o777, 0o600);

    // A real TLS 1.3 handshake with it, trusting exactly this certificate.
    const server = createServer({ key: id.key, cert: id.cert, minVersion: 'TLSv1.3' }, (s) => s.end('hi'));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const { port } = server.address() as { port: number };
      const got = await new Promise<string>((resolve, reject) => {
        const s = connect({ host: '127.0.0.1', port, ca: id.cert, servername: 'coord.example' }, () => {
          s.setEncoding('utf8').once('data', resolve);
        });
        s.once('error', reject);
      });
      assert.equal(got, 'hi');
    } finally {
      server.close();
    }
  });

  it('keeps the identity a data dir already has, so pins stay valid', async () => {
    const dir = dataDir();
    const first = await ensureTlsIdentity(dir);
    const again = await ensureTlsIdentity(dir);
    assert.equal(again.created, false);
    assert.equal(again.fingerprint, first.fingerprint);
    assert.deepEqual(again.cert, first.cert);
  });
});
