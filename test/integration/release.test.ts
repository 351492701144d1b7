// The release artifact: packed from this checkout, then run by a plain
// `node` from a directory where no node_modules can be found.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseManifest } from '../../release/manifest.js';
import { meshgate, type Run } from './process.js';

function node(args: string[], cwd: string): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      args,
      { cwd, env: { PATH: process.env.PATH ?? '' }, timeout: 60_000 },
      (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

describe('release artifact', () => {
  const dir = mkdtempSync(join(tmpdir(), 'meshgate-release-'));
  const outside = mkdtempSync(join(tmpdir(), 'meshgate-outside-'));
  const key = join(dir, 'signing.key');
  let publicKey = '';
  let artifact = '';

  before(async () => {
    const k = await meshgate(['release', 'keygen', '--out', key]);
    assert.equal(k.code, 0, k.stderr);
    publicKey = k.stdout.trim();
    const p = await meshgate([
      'release',
      'pack',
      '--version',
      '0.1.0',
      '--signing-key',
      key,
      '--out',
      join(dir, 'releases'),
    ]);
    assert.equal(p.code, 0, p.stderr);
    artifact = join(outside, 'meshgate.mjs');
    copyFileSync(join(dir, 'releases', '0.1.0', 'meshgate-0.1.0.mjs'), artifact);
  });
  after(() => {
    rmSync(dir, { recursive: true, force: true });
    rmSync(outside, { recursive: true, force: true });
  });

  it('keygen writes the private key 0600 and prints the public key', () => {
    assert.match(publicKey, /^ed25519:[A-Za-z0-9+/]{43}=$/);
    assert.equal(statSync(key).mode & 0o777, 0o600);
    assert.match(readFileSync(key, 'utf8'), /BEGIN PRIVATE KEY/);
  });

  it('keygen keeps an existing key file', async () => {
    const r = await meshgate(['release', 'keygen', '--out', key]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /exists; keep it or remove it first/);
  });

  it('writes a manifest with version, size, sha256, Node engine and platform', () => {
    const m = parseManifest(readFileSync(join(dir, 'releases', '0.1.0', 'manifest.json'), 'utf8'));
    assert.equal(m.version, '0.1.0');
    assert.equal(m.size, statSync(artifact).size);
    assert.equal(m.node, '>=20');
    assert.equal(m.platform, 'linux');
    assert.match(m.commit, /^[0-9a-f]{40}$/);
  });

  it('runs with plain node outside the checkout: --version, version, agent --help', async () => {
    const v = await node([artifact, '--version'], outside);
    assert.equal(v.code, 0, v.stderr);
    assert.match(v.stdout, /^meshgate 0\.1\.0 \(commit [0-9a-f]{12}, node v\d+\.\d+\.\d+\)\n$/);
    assert.equal((await node([artifact, 'version'], outside)).stdout, v.stdout);
    const h = await node([artifact, 'agent', '--help'], outside);
    assert.equal(h.code, 0, h.stderr);
    assert.match(h.stdout, /--auth-key-file/);
  });

  it('verifies itself with the release key and refuses another key', async () => {
    const ok = await node(
      [artifact, 'release', 'verify', '--release-key', publicKey, join(dir, 'releases', '0.1.0')],
      outside,
    );
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /release 0\.1\.0 .*signature and sha256 valid/);
    const other = join(dir, 'other.key');
    const k = await meshgate(['release', 'keygen', '--out', other]);
    const bad = await node(
      [artifact, 'release', 'verify', '--release-key', k.stdout.trim(), join(dir, 'releases', '0.1.0')],
      outside,
    );
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /signature does not match the release key \(it was signed by another key\)/);
  });

  it('leaves the coordinator out and says so in one line', async () => {
    const r = await node([artifact, 'coordinator'], outside);
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      'meshgate: meshgate coordinator is not part of the release artifact: run it from the npm package\n',
    );
    assert.doesNotMatch(readFileSync(artifact, 'utf8'), /better_sqlite3\.node|node_modules\/express\//);
  });

  it('refuses a version that is not semver, and a signing key readable by others', async () => {
    const r = await meshgate([
      'release',
      'pack',
      '--version',
      'banana',
      '--signing-key',
      key,
      '--out',
      join(dir, 'x'),
    ]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /"banana" is not a semantic version/);
    const loose = join(dir, 'loose.key');
    writeFileSync(loose, readFileSync(key), { mode: 0o644 });
    const l = await meshgate([
      'release',
      'pack',
      '--version',
      '0.2.0',
      '--signing-key',
      loose,
      '--out',
      join(dir, 'x'),
    ]);
    assert.equal(l.code, 1);
    assert.match(l.stderr, /readable by group or others; run: chmod 600/);
  });
});
