// Desired versions are semantic versions the coordinator can serve; the
// coordinator serves releases and install.sh on its HTTPS port.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import type * as grpc from '@grpc/grpc-js';
import { SyncRequestSchema, UpdateState } from '../../proto/gen/meshgate/v1/control_pb.js';
import { artifactFile, generateSigningKey, loadSigningKey, parseManifest } from '../../release/manifest.js';
import { signedRelease } from '../fixtures/release.js';
import { authKey, SimAgent, startTestCoordinator, type TestCoordinator } from './harness.js';

function get(
  t: TestCoordinator,
  path: string,
  body?: string,
): Promise<{ status: number; body: Buffer; type: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port: t.c.httpPort,
        path,
        method: body === undefined ? 'GET' : 'POST',
        ca: readFileSync(join(t.dataDir, 'tls.crt')),
        servername: 'localhost',
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('end', () =>
          resolve({
            status: res.statusCode ?? 0,
            body: Buffer.concat(chunks),
            type: String(res.headers['content-type'] ?? ''),
          }),
        );
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/** A release directory as `meshgate release pack` lays it out, with a small artifact. */
function fakeRelease(releasesDir: string, version: string, body = `// meshgate ${version}\n`): void {
  const { bytes, manifest: m } = signedRelease(version, body, loadSigningKey(generateSigningKey().pem));
  mkdirSync(join(releasesDir, version), { recursive: true });
  writeFileSync(join(releasesDir, version, m.file), bytes);
  writeFileSync(join(releasesDir, version, 'manifest.json'), JSON.stringify(m));
}

const failure = async (p: Promise<unknown>): Promise<string> => {
  try {
    await p;
  } catch (err) {
    return (err as grpc.ServiceError).details;
  }
  assert.fail('expected the call to fail');
};

describe('desired versions and served releases', () => {
  let t: TestCoordinator;
  const releasesDir = mkdtempSync(join(tmpdir(), 'meshgate-releases-'));
  const agents: SimAgent[] = [];

  before(async () => {
    fakeRelease(releasesDir, '0.1.0');
    fakeRelease(releasesDir, '0.2.0');
    fakeRelease(releasesDir, '0.10.0');
    t = await startTestCoordinator({ releasesDir });
  });
  after(async () => {
    for (const a of agents) a.close();
    await t.close();
    rmSync(releasesDir, { recursive: true, force: true });
  });

  it('refuses a version that is not semver', async () => {
    await authKey(t, 'p1');
    const msg = await failure(
      t.admin.call('setDesiredVersion', { project: 'p1', tag: '', version: 'banana' }),
    );
    assert.match(msg, /"banana" is not a semantic version such as 1\.2\.3/);
  });

  it('refuses a version the coordinator cannot serve unless the artifact is elsewhere', async () => {
    const msg = await failure(
      t.admin.call('setDesiredVersion', { project: 'p1', tag: '', version: '0.3.0' }),
    );
    assert.match(
      msg,
      /release 0\.3\.0 is not served by this coordinator .*give --artifact-url URL --sha256 HEX/,
    );
    const half = await failure(
      t.admin.call('setDesiredVersion', {
        project: 'p1',
        tag: '',
        version: '0.3.0',
        artifactUrl: 'https://example.net/meshgate-0.3.0.mjs',
      }),
    );
    assert.match(half, /--artifact-url and --sha256 together/);
    const r = await t.admin.call('setDesiredVersion', {
      project: 'p1',
      tag: 'tag:fw',
      version: '0.3.0',
      artifactUrl: 'https://example.net/meshgate-0.3.0.mjs',
      sha256: 'a'.repeat(64),
    });
    assert.equal(r.desiredVersion!.artifactUrl, 'https://example.net/meshgate-0.3.0.mjs');
  });

  it('records the served artifact sha256 with the desired version', async () => {
    const r = await t.admin.call('setDesiredVersion', { project: 'p1', tag: '', version: '0.2.0' });
    const manifest = JSON.parse(readFileSync(join(releasesDir, '0.2.0', 'manifest.json'), 'utf8'));
    assert.equal(r.desiredVersion!.sha256, manifest.sha256);
    assert.equal(r.desiredVersion!.artifactUrl, '');
  });

  it('counts only older nodes as drifting, newer ones too when a downgrade is allowed', async () => {
    const key = await authKey(t, 'p2', { reusable: true });
    for (const [name, version] of [
      ['old', '0.1.0'],
      ['same', '0.2.0'],
      ['newer', '0.10.0'],
      ['legacy', 'banana'],
    ] as const) {
      const a = new SimAgent(t.url, t.fingerprint);
      agents.push(a);
      a.version = version;
      await a.register(key, name);
    }
    await t.admin.call('setDesiredVersion', { project: 'p2', tag: '', version: '0.2.0' });
    const names = async () =>
      (await t.admin.call('listDesiredVersions', { project: 'p2' })).drift.map((n) => n.name).sort();
    assert.deepEqual(await names(), ['legacy', 'old']);
    await t.admin.call('setDesiredVersion', {
      project: 'p2',
      tag: '',
      version: '0.2.0',
      allowDowngrade: true,
    });
    assert.deepEqual(await names(), ['legacy', 'newer', 'old']);
    const listed = (await t.admin.call('listNodes', { project: 'p2' })).nodes;
    assert.deepEqual(
      listed
        .filter((n) => n.drifting)
        .map((n) => n.name)
        .sort(),
      ['legacy', 'newer', 'old'],
    );
  });

  it('serves the releases, their manifests and install.sh without authentication', async () => {
    const index = await get(t, '/releases/');
    assert.equal(index.status, 200);
    assert.deepEqual(JSON.parse(index.body.toString()), {
      versions: ['0.1.0', '0.2.0', '0.10.0'],
      latest: '0.10.0',
    });
    const m = await get(t, '/releases/0.2.0/manifest.json');
    assert.equal(m.status, 200);
    assert.equal(JSON.parse(m.body.toString()).version, '0.2.0');
    const a = await get(t, '/releases/0.2.0/meshgate-0.2.0.mjs');
    assert.equal(a.status, 200);
    assert.equal(a.body.toString(), '// meshgate 0.2.0\n');
    const script = await get(t, '/install.sh');
    assert.equal(script.status, 200);
    assert.match(script.body.toString(), /^#!\/bin\/sh/);
  });

  it('tells install.sh the desired version for an auth key, also a spent one', async () => {
    const desired = async (key: string) => {
      const r = await get(t, '/releases/desired', `${key}\n`);
      return { status: r.status, body: JSON.parse(r.body.toString()) };
    };
    const plain = await authKey(t, 'p3');
    assert.deepEqual((await desired(plain)).body, { version: null, served: false, allowDowngrade: false });
    await t.admin.call('setDesiredVersion', { project: 'p3', tag: '', version: '0.1.0' });
    const fw = await authKey(t, 'p3', { tags: ['tag:fw'] });
    await t.admin.call('setDesiredVersion', {
      project: 'p3',
      tag: 'tag:fw',
      version: '0.2.0',
      allowDowngrade: true,
    });
    assert.deepEqual((await desired(plain)).body, { version: '0.1.0', served: true, allowDowngrade: false });
    assert.deepEqual((await desired(fw)).body, { version: '0.2.0', served: true, allowDowngrade: true });
    const spent = new SimAgent(t.url, t.fingerprint);
    agents.push(spent);
    await spent.register(plain, 'spent');
    assert.equal((await desired(plain)).body.version, '0.1.0');
    const unknown = await desired(`${plain.slice(0, -4)}AAAA`);
    assert.equal(unknown.status, 401);
    assert.deepEqual(unknown.body, { error: 'unknown auth key' });
    assert.ok(
      t.logs.some((l) => l.includes('refused desired version lookup')),
      'the refusal is logged',
    );
  });

  it('sends the desired release to the nodes: version, artifact path, sha256 and signed manifest', async () => {
    const key = await authKey(t, 'p4', { reusable: true });
    const early = new SimAgent(t.url, t.fingerprint);
    agents.push(early);
    await early.register(key, 'early');
    await early.connect();
    assert.equal(early.netmap!.desiredRelease, undefined);
    // Two at once, so the node that joins while the first one updates is told too.
    await t.admin.call('setDesiredVersion', { project: 'p4', tag: '', version: '0.2.0', maxUnavailable: 2 });
    await early.waitFor(
      () => early.netmap?.desiredRelease?.version === '0.2.0',
      5000,
      'desired release delta',
    );
    const r = early.netmap!.desiredRelease!;
    assert.equal(r.artifactUrl, '/releases/0.2.0/meshgate-0.2.0.mjs');
    const manifest = parseManifest(r.manifest);
    assert.equal(manifest.sha256, r.sha256);
    assert.equal(manifest.version, '0.2.0');
    const late = new SimAgent(t.url, t.fingerprint);
    agents.push(late);
    await late.register(key, 'late');
    await late.connect();
    await late.waitFor(
      () => late.netmap?.desiredRelease?.sha256 === r.sha256,
      5000,
      'the node that joined later is told too',
    );
    await t.admin.call('setDesiredVersion', { project: 'p4', tag: '', version: '' });
    await early.waitFor(() => early.netmap?.desiredRelease === undefined, 5000, 'desired release removed');
  });

  it('rolls a version out one node at a time; a reported failure halts it until the version is set again', async () => {
    const key = await authKey(t, 'p5', { reusable: true });
    const [a, b, c] = ['a', 'b', 'c'].map(() => new SimAgent(t.url, t.fingerprint));
    agents.push(a!, b!, c!);
    for (const [agent, name] of [
      [a!, 'a'],
      [b!, 'b'],
      [c!, 'c'],
    ] as const) {
      await agent.register(key, name);
      await agent.connect();
    }
    const states = async () =>
      Object.fromEntries(
        (await t.admin.call('listDesiredVersions', { project: 'p5' })).nodes.map((n) => [
          n.name,
          `${n.running} ${n.desired} ${n.state}${n.reason ? `: ${n.reason}` : ''}`,
        ]),
      );
    await t.admin.call('setDesiredVersion', { project: 'p5', tag: '', version: '0.2.0' });
    await a!.waitFor(() => a!.netmap?.desiredRelease?.version === '0.2.0', 5000, 'a told first');
    assert.deepEqual(await states(), {
      a: '0.1.0 0.2.0 updating',
      b: '0.1.0 0.2.0 waiting: 1 node(s) updating, at most 1 at once',
      c: '0.1.0 0.2.0 waiting: 1 node(s) updating, at most 1 at once',
    });
    assert.equal(b!.netmap!.desiredRelease, undefined, 'b is not told yet');

    const report = (agent: SimAgent, state: UpdateState, reason: string, version = '0.2.0') =>
      agent.stream!.write(
        create(SyncRequestSchema, { message: { case: 'update', value: { version, state, reason } } }),
      );
    // Refused: no reason, not semver, no state. Nothing changes.
    report(a!, UpdateState.FAILED, '');
    report(a!, UpdateState.FAILED, 'x', 'banana');
    report(a!, UpdateState.UNSPECIFIED, '');
    report(a!, UpdateState.FAILED, 'release 0.2.0: the manifest signature does not match the release key');
    await a!.waitFor(() => a!.netmap?.desiredRelease === undefined, 5000, 'a no longer told');
    for (const refused of [
      'a failed update needs a reason',
      'update.version must be a semantic version',
      'update.state must be UPDATING or FAILED',
    ])
      assert.ok(
        t.logs.some((l) => l.includes(refused)),
        `refused: ${refused}`,
      );
    assert.deepEqual(await states(), {
      a: '0.1.0 0.2.0 failed: release 0.2.0: the manifest signature does not match the release key',
      b: '0.1.0 0.2.0 waiting: rollout halted: the update of a failed',
      c: '0.1.0 0.2.0 waiting: rollout halted: the update of a failed',
    });

    // Set again: a tries again; once it is back on 0.2.0, b goes.
    await t.admin.call('setDesiredVersion', { project: 'p5', tag: '', version: '0.2.0' });
    await a!.waitFor(() => a!.netmap?.desiredRelease?.version === '0.2.0', 5000, 'a told again');
    a!.stream!.cancel();
    await a!.waitFor(() => a!.ended !== null, 5000, 'the old stream to end');
    a!.version = '0.2.0';
    a!.netmap = null;
    a!.seq = 0n;
    await a!.connect();
    await b!.waitFor(() => b!.netmap?.desiredRelease?.version === '0.2.0', 5000, 'b told next');
    assert.deepEqual(await states(), {
      a: '0.2.0 0.2.0 current',
      b: '0.1.0 0.2.0 updating',
      c: '0.1.0 0.2.0 waiting: 1 node(s) updating, at most 1 at once',
    });
  });

  it("serves nothing but a release's own two files", async () => {
    writeFileSync(join(releasesDir, 'secret.txt'), 'no');
    writeFileSync(join(releasesDir, '0.2.0', 'notes.txt'), 'no');
    for (const path of [
      '/releases/0.2.0/notes.txt',
      '/releases/0.2.0/..%2Fsecret.txt',
      '/releases/..%2F0.2.0/manifest.json',
      '/releases/%2E%2E/secret.txt',
      '/releases/0.2.0/%2E%2E%2F%2E%2E%2F..%2Fetc%2Fpasswd',
      '/releases/0.3.0/manifest.json',
      '/releases/0.2.0/meshgate-0.1.0.mjs',
    ]) {
      const r = await get(t, path);
      assert.equal(r.status, 404, path);
      assert.doesNotMatch(r.body.toString(), /^no$/);
    }
  });

  it('stops serving a release whose artifact no longer matches its manifest', async () => {
    writeFileSync(join(releasesDir, '0.1.0', artifactFile('0.1.0')), '// tampered 0.1.0\n');
    assert.equal((await get(t, '/releases/0.1.0/meshgate-0.1.0.mjs')).status, 404);
    const msg = await failure(
      t.admin.call('setDesiredVersion', { project: 'p1', tag: '', version: '0.1.0' }),
    );
    assert.match(msg, /release 0\.1\.0 is not served by this coordinator/);
  });
});
