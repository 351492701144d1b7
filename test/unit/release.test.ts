import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import {
  artifactFile,
  generateSigningKey,
  loadSigningKey,
  MANIFEST_FORMAT,
  parseManifest,
  type ReleaseManifest,
  signManifest,
  verifyArtifact,
  verifyManifest,
} from '../../release/manifest.js';
import { compareVersions, drifts, isSemVer, requireSemVer } from '../../release/semver.js';

describe('semantic versions', () => {
  it('accepts MAJOR.MINOR.PATCH with pre-release and build metadata', () => {
    for (const v of ['0.1.0', '1.2.3', '10.20.30', '1.0.0-rc.1', '1.0.0-alpha.beta', '1.0.0+build.7'])
      assert.equal(isSemVer(v), true, v);
  });

  it('refuses anything else, with a message that shows the form', () => {
    for (const v of [
      'banana',
      '',
      '1.2',
      'v1.2.3',
      '01.2.3',
      '1.2.3-',
      '1.2.3-01',
      '1.2.3 ',
      `1.2.${'9'.repeat(70)}`,
    ])
      assert.equal(isSemVer(v), false, v);
    assert.throws(() => requireSemVer('banana'), /"banana" is not a semantic version such as 1\.2\.3/);
  });

  it('orders by precedence: numbers numerically, pre-releases before the release', () => {
    const ordered = [
      '1.0.0-alpha',
      '1.0.0-alpha.1',
      '1.0.0-alpha.beta',
      '1.0.0-beta',
      '1.0.0-beta.2',
      '1.0.0-beta.11',
      '1.0.0-rc.1',
      '1.0.0',
      '1.0.1',
      '1.2.0',
      '1.10.0',
      '2.0.0',
    ];
    for (let i = 0; i + 1 < ordered.length; i++) {
      assert.equal(compareVersions(ordered[i]!, ordered[i + 1]!), -1, `${ordered[i]} < ${ordered[i + 1]}`);
      assert.equal(compareVersions(ordered[i + 1]!, ordered[i]!), 1);
    }
    assert.equal(compareVersions('1.0.0+a', '1.0.0+b'), 0);
  });

  it('drift: older drifts, newer only with a downgrade, not-semver always', () => {
    assert.equal(drifts('0.1.0', '0.2.0', false), true);
    assert.equal(drifts('0.2.0', '0.2.0', false), false);
    assert.equal(drifts('0.10.0', '0.2.0', false), false);
    assert.equal(drifts('0.10.0', '0.2.0', true), true);
    assert.equal(drifts('banana', '0.2.0', false), true);
    assert.equal(drifts('0.1.0', '', false), false);
  });
});

describe('release manifest', () => {
  const key = generateSigningKey();
  const signing = loadSigningKey(key.pem);
  const artifact = Buffer.from('console.log("meshgate")\n');
  const make = (): ReleaseManifest =>
    signManifest(
      {
        format: MANIFEST_FORMAT,
        name: 'meshgate',
        version: '0.1.0',
        commit: 'acb49b1897d7e00c9ceea4c35e0ef73e1ae2f8f5',
        file: artifactFile('0.1.0'),
        sha256: '4a5d2ff3c0fdfa0b4f5b86b6a8b5e3e4a7d2b1e1f2a3b4c5d6e7f8091a2b3c4d',
        size: artifact.length,
        node: '>=20',
        platform: 'linux',
        created: '2026-01-01T00:00:00.000Z',
      },
      signing,
    );

  it('signs with the key that keygen printed', () => {
    assert.match(key.publicKey, /^ed25519:[A-Za-z0-9+/]{43}=$/);
    assert.equal(signing.publicKey, key.publicKey);
    const m = parseManifest(JSON.stringify(make(), null, 2));
    verifyManifest(m, key.publicKey);
  });

  it('is refused when any field was changed after signing', () => {
    const changes: Partial<ReleaseManifest>[] = [
      { version: '0.1.1', file: artifactFile('0.1.1') },
      { sha256: 'f'.repeat(64) },
      { size: 1 },
      { node: '>=18' },
      { created: '2027-01-01T00:00:00.000Z' },
    ];
    for (const change of changes) {
      const m = parseManifest(JSON.stringify({ ...make(), ...change }));
      assert.throws(() => verifyManifest(m, key.publicKey), /signature does not match the release key$/);
    }
  });

  it('is refused under another key, and says it was signed by another key', () => {
    const other = generateSigningKey();
    assert.throws(
      () => verifyManifest(make(), other.publicKey),
      /signature does not match the release key \(it was signed by another key\)/,
    );
  });

  it('does not depend on the order of the fields in the file', () => {
    const m = make();
    const reversed = Object.fromEntries(Object.entries(m).reverse());
    verifyManifest(parseManifest(JSON.stringify(reversed)), key.publicKey);
  });

  it('refuses malformed manifests from the network with the field that is wrong', () => {
    assert.throws(() => parseManifest('{'), /not JSON/);
    assert.throws(
      () => parseManifest(JSON.stringify({ ...make(), version: 'banana' })),
      /version: expected a semantic version/,
    );
    assert.throws(() => parseManifest(JSON.stringify({ ...make(), file: '../../etc/passwd' })), /file/);
    assert.throws(() => parseManifest(JSON.stringify({ ...make(), extra: 1 })), /invalid release manifest/);
    assert.throws(
      () => parseManifest(JSON.stringify({ ...make(), file: artifactFile('0.2.0') })),
      /file must be meshgate-0\.1\.0\.mjs/,
    );
  });

  it('checks the artifact bytes against size and sha256', () => {
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    const m = { ...make(), sha256: sha(artifact) };
    verifyArtifact(m, artifact);
    assert.throws(
      () => verifyArtifact(m, Buffer.concat([artifact, Buffer.from('x')])),
      /bytes, the manifest says/,
    );
    const tampered = Buffer.from(artifact);
    tampered[0] = 0x43;
    assert.throws(() => verifyArtifact(m, tampered), /sha256 [0-9a-f]{64} does not match the manifest/);
  });

  it('refuses a public key that is not 32 bytes of base64', () => {
    assert.throws(() => verifyManifest(make(), 'ed25519:AAAA'), /invalid release key/);
    assert.throws(() => verifyManifest(make(), key.publicKey.replace('ed25519:', '')), /invalid release key/);
  });
});
