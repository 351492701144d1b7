// The self-update's steps on real files in a temp dir: verification against
// the pinned key, unpacking side by side, switching `current`, refusing and
// remembering a bad release, and the watchdog's rollback.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, symlinkSync } from 'node:fs';
import { createServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, beforeEach, describe, it } from 'node:test';
import { create } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import pino from 'pino';
import { download } from '../../agent/update/download.js';
import {
  currentVersion,
  installed,
  installRelease,
  switchCurrent,
  verifyRelease,
} from '../../agent/update/install.js';
import { readRecord, writeRecord } from '../../agent/update/record.js';
import { SelfUpdater } from '../../agent/update/updater.js';
import { watchUpdate } from '../../agent/update/watchdog.js';
import { ensureTlsIdentity } from '../../coordinator/tls.js';
import { DesiredReleaseSchema } from '../../proto/gen/meshgate/v1/types_pb.js';
import { generateSigningKey, loadSigningKey } from '../../release/manifest.js';
import { signedRelease } from '../fixtures/release.js';

const signing = generateSigningKey();
const key = loadSigningKey(signing.pem);
const otherKey = generateSigningKey().publicKey;

function release(version: string, body = `console.log(${JSON.stringify(version)});\n`) {
  const { bytes, manifest } = signedRelease(version, body, key);
  return { bytes, manifest, text: JSON.stringify(manifest) };
}

const root = mkdtempSync(join(tmpdir(), 'meshgate-update-'));
after(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
let prefix = '';
let stateDir = '';

/** A machine as install.sh leaves it: 0.1.0 installed and current. */
beforeEach(() => {
  const dir = join(root, String(n++));
  prefix = join(dir, 'opt');
  stateDir = join(dir, 'state');
  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const r = release('0.1.0');
  installRelease(prefix, r.manifest, r.text, r.bytes);
  symlinkSync('0.1.0', join(prefix, 'current'));
});

describe('self-update steps', () => {
  it('verifies the manifest signature, the sha256 and what the coordinator asked for', () => {
    const r = release('0.1.1');
    const want = { version: '0.1.1', sha256: r.manifest.sha256 };
    assert.equal(verifyRelease(r.text, r.bytes, signing.publicKey, want).version, '0.1.1');
    assert.throws(
      () => verifyRelease(r.text, r.bytes, otherKey, want),
      /the manifest signature does not match the release key \(it was signed by another key\)/,
    );
    const tampered = Buffer.from(r.bytes);
    tampered[0] = 0x20;
    assert.throws(() => verifyRelease(r.text, tampered, signing.publicKey, want), /sha256 .* does not match/);
    assert.throws(
      () => verifyRelease(r.text, r.bytes, signing.publicKey, { version: '0.1.2', sha256: '' }),
      /the signed manifest is for 0\.1\.1, the coordinator asked for 0\.1\.2/,
    );
    assert.throws(
      () => verifyRelease(r.text, r.bytes, signing.publicKey, { version: '0.1.1', sha256: 'a'.repeat(64) }),
      /the coordinator a{64}/,
    );
    const doctored = JSON.stringify({ ...r.manifest, size: r.manifest.size + 1 });
    assert.throws(
      () => verifyRelease(doctored, r.bytes, signing.publicKey, want),
      /signature does not match/,
    );
  });

  it('unpacks next to the running release and switches current with one rename', () => {
    const r = release('0.1.1');
    installRelease(prefix, r.manifest, r.text, r.bytes);
    assert.equal(currentVersion(prefix), '0.1.0', 'unpacking alone changes nothing that runs');
    assert.ok(installed(prefix, '0.1.1'));
    assert.equal(readFileSync(join(prefix, '0.1.1', 'meshgate.mjs'), 'utf8'), r.bytes.toString());
    assert.equal(switchCurrent(prefix, '0.1.1'), '0.1.0');
    assert.equal(readlinkSync(join(prefix, 'current')), '0.1.1');
    assert.equal(switchCurrent(prefix, '0.1.0'), '0.1.1', 'and back');
    assert.throws(() => switchCurrent(prefix, '9.9.9'), /meshgate 9\.9\.9 is not installed/);
    assert.equal(currentVersion(prefix), '0.1.0');
  });

  it('installs a good release, starts the watchdog and restarts; refuses a tampered one until it is set again', async () => {
    const good = release('0.1.1');
    const bad = release('0.1.2');
    const served: Record<string, Buffer> = {
      '/releases/0.1.1/meshgate-0.1.1.mjs': good.bytes,
      '/releases/0.1.2/meshgate-0.1.2.mjs': Buffer.concat([bad.bytes, Buffer.from(';')]),
    };
    const reports: string[] = [];
    const watchdogs: string[] = [];
    let restarted = 0;
    let fetched = 0;
    const updater = new SelfUpdater({
      ...baseOpts(),
      report: (v, s, reason) => reports.push(`${v} ${s} ${reason}`),
      restart: async () => {
        restarted++;
      },
      spawnWatchdog: (to) => watchdogs.push(to),
      fetch: async (url, pinned) => {
        fetched++;
        assert.ok(pinned, 'a path on the coordinator is fetched with the pin');
        const b = served[url.replace('https://coord:7480', '')];
        if (!b) throw new Error(`404 ${url}`);
        return b;
      },
    });
    const desired = (r: typeof good, setAtMs = 1000) =>
      create(DesiredReleaseSchema, {
        setAt: timestampFromMs(setAtMs),
        version: r.manifest.version,
        artifactUrl: `/releases/${r.manifest.version}/${r.manifest.file}`,
        sha256: r.manifest.sha256,
        manifest: r.text,
      });

    updater.consider(desired(bad));
    await waitFor(() => reports.length === 2);
    assert.match(
      reports[1]!,
      /^0\.1\.2 failed release 0\.1\.2: artifact has \d+ bytes, the manifest says \d+$/,
    );
    assert.equal(currentVersion(prefix), '0.1.0', 'the running release stays');
    assert.equal(installed(prefix, '0.1.2'), false);
    assert.deepEqual(updater.failure(), {
      version: '0.1.2',
      reason: reports[1]!.slice('0.1.2 failed '.length),
    });
    const before = fetched;
    updater.consider(desired(bad));
    assert.equal(fetched, before, 'not tried again while the coordinator names it');
    updater.consider(undefined);
    assert.equal(updater.failure()?.version, '0.1.2', 'kept (and reported) while the rollout is halted');
    updater.consider(desired(bad, 2000));
    await waitFor(() => reports.length === 4);
    assert.ok(fetched > before, 'set again (a newer setAt): tried again');
    assert.match(reports[3]!, /^0\.1\.2 failed /);

    updater.consider(desired(good));
    await waitFor(() => restarted === 1);
    assert.equal(updater.failure(), null, 'the coordinator moved on: the failure is forgotten');
    assert.equal(currentVersion(prefix), '0.1.1');
    assert.deepEqual(watchdogs, ['0.1.1']);
    const rec = readRecord(stateDir)!;
    assert.equal(rec.phase, 'restarting');
    assert.deepEqual([rec.from, rec.to], ['0.1.0', '0.1.1']);
    assert.ok(rec.deadline > Date.now() + 25_000);

    // The new release starts and reaches the coordinator.
    const next = new SelfUpdater({ ...baseOpts(), version: '0.1.1' });
    next.started();
    assert.equal(readRecord(stateDir)!.pid, process.pid);
    next.connected();
    assert.equal(readRecord(stateDir)!.phase, 'confirmed');
    assert.equal(await watchUpdate({ stateDir, prefix, to: '0.1.1', pollMs: 10 }), 'confirmed');
  });

  it('refuses to update an agent that install.sh did not install under the prefix', async () => {
    rmSync(join(prefix, 'current'));
    const reports: string[] = [];
    const updater = new SelfUpdater({
      ...baseOpts(),
      report: (v, s, reason) => reports.push(`${v} ${s} ${reason}`),
    });
    updater.consider(create(DesiredReleaseSchema, { version: '0.2.0', artifactUrl: '/releases/0.2.0/x' }));
    await waitFor(() => reports.length === 2);
    assert.match(
      reports[1]!,
      /current does not point at the running release 0\.1\.0; install meshgate with install\.sh/,
    );
  });
});

describe('update watchdog', () => {
  it('rolls back a release that never started as the agent', async () => {
    const r = release('0.1.2');
    installRelease(prefix, r.manifest, r.text, r.bytes);
    switchCurrent(prefix, '0.1.2');
    writeRecord(stateDir, {
      from: '0.1.0',
      to: '0.1.2',
      phase: 'restarting',
      reason: '',
      setAt: 0,
      deadline: Date.now() + 200,
      timeoutMs: 1000,
    });
    assert.equal(await watchUpdate({ stateDir, prefix, to: '0.1.2', pollMs: 20 }), 'rolled-back');
    assert.equal(currentVersion(prefix), '0.1.0');
    const rec = readRecord(stateDir)!;
    assert.equal(rec.phase, 'failed');
    assert.equal(rec.reason, 'meshgate 0.1.2 did not start as the agent within 1s; rolled back to 0.1.0');
  });

  it('rolls back a release that runs but does not connect, and makes it exit', async () => {
    const r = release('0.1.2');
    installRelease(prefix, r.manifest, r.text, r.bytes);
    switchCurrent(prefix, '0.1.2');
    // Stands in for the new agent: SIGUSR2 ends it.
    const child = spawn('sleep', ['60'], { stdio: 'ignore' });
    const exited = new Promise<string | null>((res) => child.on('exit', (_c, sig) => res(sig)));
    writeRecord(stateDir, {
      from: '0.1.0',
      to: '0.1.2',
      phase: 'restarting',
      reason: '',
      setAt: 0,
      deadline: Date.now(),
      timeoutMs: 120_000,
      pid: child.pid!,
    });
    assert.equal(await watchUpdate({ stateDir, prefix, to: '0.1.2', pollMs: 20 }), 'rolled-back');
    assert.equal(await exited, 'SIGUSR2');
    assert.equal(currentVersion(prefix), '0.1.0');
    assert.match(
      readRecord(stateDir)!.reason,
      /did not reach the coordinator within 120s; rolled back to 0\.1\.0/,
    );
  });

  it('steps aside when another update took over', async () => {
    writeRecord(stateDir, {
      from: '0.1.0',
      to: '0.1.3',
      phase: 'restarting',
      reason: '',
      setAt: 0,
      deadline: Date.now(),
      timeoutMs: 1000,
    });
    assert.equal(await watchUpdate({ stateDir, prefix, to: '0.1.2', pollMs: 20 }), 'superseded');
    assert.equal(currentVersion(prefix), '0.1.0');
  });
});

describe('release download', () => {
  it('takes the coordinator by its pinned key, refuses another key, an error status and an oversized body', async () => {
    mkdirSync(join(root, 'tls'), { mode: 0o700 });
    const tls = await ensureTlsIdentity(join(root, 'tls'));
    const body = Buffer.alloc(4096, 7);
    const server = createServer({ key: tls.key, cert: tls.cert }, (req, res) => {
      if (req.url === '/releases/0.1.1/meshgate-0.1.1.mjs') res.end(body);
      else res.writeHead(404).end('no such release\n');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const base = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
    const url = `${base}/releases/0.1.1/meshgate-0.1.1.mjs`;
    try {
      assert.deepEqual(await download(url, { fingerprint: tls.fingerprint, maxBytes: 1 << 20 }), body);
      await assert.rejects(
        download(url, { fingerprint: `sha256:${'0'.repeat(64)}`, maxBytes: 1 << 20 }),
        /127\.0\.0\.1:\d+ does not hold the pinned key sha256:0{64}/,
      );
      await assert.rejects(download(url, { maxBytes: 1 << 20 }), /self-signed certificate/);
      await assert.rejects(
        download(`${base}/releases/9.9.9/x`, { fingerprint: tls.fingerprint, maxBytes: 1 << 20 }),
        /HTTP 404/,
      );
      await assert.rejects(
        download(url, { fingerprint: tls.fingerprint, maxBytes: 1000 }),
        /larger than 1000 bytes/,
      );
      await assert.rejects(download(url.replace('https', 'http'), { maxBytes: 1000 }), /is not https/);
    } finally {
      server.close();
    }
  });
});

function baseOpts() {
  return {
    version: '0.1.0',
    prefix,
    releaseKey: signing.publicKey,
    releasesUrl: 'https://coord:7480',
    stateDir,
    timeoutMs: 30_000,
    log: pino({ level: 'silent' }),
    report: () => {},
    restart: async () => {},
    spawnWatchdog: () => {},
  };
}

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((r) => setImmediate(r));
  }
}
