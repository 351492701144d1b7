// Self-update (meshgate agent --auto-update): when the coordinator names
// another release for this node, download it, check it against the pinned
// release key, unpack it next to the running one, switch `current`, start
// the watchdog that rolls back, and restart into it.
//
// The restart is an exit with RESTART_EXIT_CODE: systemd (Restart=always)
// starts /usr/local/bin/meshgate again, which is now the new release. Node 20
// cannot exec() itself, and a replacement spawned by the agent would not be
// the process systemd supervises. The WireGuard interface and the nftables
// table stay while no agent runs (see Agent.restartForUpdate).
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { timestampMs } from '@bufbuild/protobuf/wkt';
import type { Logger } from 'pino';
import type { DesiredRelease } from '../../proto/gen/meshgate/v1/types_pb.js';
import { MANIFEST_FILE, ReleaseError } from '../../release/manifest.js';
import { drifts } from '../../release/semver.js';
import { download } from './download.js';
import { currentVersion, ENTRY, installRelease, switchCurrent, verifyRelease } from './install.js';
import { clearRecord, readRecord, writeRecord } from './record.js';

/** EX_TEMPFAIL: the agent exits to be started again, into another release. */
export const RESTART_EXIT_CODE = 75;
export const DEFAULT_UPDATE_TIMEOUT_MS = 120_000;
const MAX_ARTIFACT_BYTES = 64 * 1024 * 1024;

export interface UpdaterOptions {
  /** The running release. */
  version: string;
  prefix: string;
  releaseKey: string;
  /** https://HOST:PORT of the coordinator's releases; paths from the coordinator are relative to it. */
  releasesUrl: string;
  /** Pins the coordinator's HTTPS port (the control API's fingerprint). */
  fingerprint?: string;
  stateDir: string;
  /** How long the new release has to reach the coordinator before it is rolled back. */
  timeoutMs: number;
  log: Logger;
  report(version: string, state: 'updating' | 'failed', reason: string): void;
  /** Stops the agent keeping the mesh, and exits with RESTART_EXIT_CODE. */
  restart(): Promise<void>;
  /** Starts the watchdog process (tests replace it). */
  spawnWatchdog?: (to: string) => void;
  fetch?: (url: string, pinned: boolean) => Promise<Buffer>;
}

const setAtOf = (r: DesiredRelease) => (r.setAt ? timestampMs(r.setAt) : 0);

export class SelfUpdater {
  private busy = false;

  constructor(private readonly o: UpdaterOptions) {}

  /** The agent started: if it is the release of an update in flight, the watchdog learns its pid. */
  started(): void {
    const r = readRecord(this.o.stateDir);
    if (r?.phase === 'restarting' && r.to === this.o.version)
      writeRecord(this.o.stateDir, { ...r, pid: process.pid });
  }

  /** The agent reached the coordinator: an update into this release is done. */
  connected(): void {
    const r = readRecord(this.o.stateDir);
    if (r?.phase !== 'restarting' || r.to !== this.o.version) return;
    writeRecord(this.o.stateDir, { ...r, phase: 'confirmed' });
    this.o.log.info({ from: r.from, to: r.to }, `updated from meshgate ${r.from} to ${r.to}`);
  }

  /** A failed update, told to the coordinator after every (re)connect until it names another release. */
  failure(): { version: string; reason: string } | null {
    const r = readRecord(this.o.stateDir);
    return r?.phase === 'failed' ? { version: r.to, reason: r.reason } : null;
  }

  /**
   * The desired release from the netmap. A failed one is remembered (and reported) until the
   * coordinator names another release, or sets the same one again (a newer setAt).
   */
  consider(release: DesiredRelease | undefined): void {
    let r = readRecord(this.o.stateDir);
    if (r?.phase === 'failed' && release && (release.version !== r.to || setAtOf(release) > r.setAt)) {
      clearRecord(this.o.stateDir);
      r = null;
    }
    if (!release || this.busy) return;
    if (!drifts(this.o.version, release.version, release.allowDowngrade)) return;
    if (r?.phase === 'failed') return;
    this.busy = true;
    void this.update(release)
      .catch((err: Error) => this.o.log.error({ err: err.message }, 'self-update'))
      .finally(() => {
        this.busy = false;
      });
  }

  private async update(release: DesiredRelease): Promise<void> {
    const { o } = this;
    const to = release.version;
    o.log.info({ from: o.version, to }, `updating to meshgate ${to}`);
    o.report(to, 'updating', '');
    try {
      if (currentVersion(o.prefix) !== o.version)
        throw new ReleaseError(
          `${join(o.prefix, 'current')} does not point at the running release ${o.version}; install meshgate with install.sh (or set --install-prefix)`,
        );
      const { manifestText, bytes } = await this.fetchRelease(release);
      const m = verifyRelease(manifestText, bytes, o.releaseKey, { version: to, sha256: release.sha256 });
      installRelease(o.prefix, m, manifestText, bytes);
    } catch (err) {
      const reason = (err as Error).message.slice(0, 512);
      writeRecord(o.stateDir, {
        from: o.version,
        to,
        phase: 'failed',
        reason,
        deadline: 0,
        timeoutMs: o.timeoutMs,
        setAt: setAtOf(release),
      });
      o.log.warn({ to, reason }, `refused meshgate ${to}; keeping ${o.version}`);
      o.report(to, 'failed', reason);
      return;
    }
    writeRecord(o.stateDir, {
      from: o.version,
      to,
      phase: 'restarting',
      reason: '',
      deadline: Date.now() + o.timeoutMs,
      timeoutMs: o.timeoutMs,
      setAt: setAtOf(release),
    });
    switchCurrent(o.prefix, to);
    (o.spawnWatchdog ?? ((v) => this.spawnWatchdog(v)))(to);
    o.log.info({ from: o.version, to }, `installed meshgate ${to}; restarting into it`);
    await o.restart();
  }

  private async fetchRelease(release: DesiredRelease): Promise<{ manifestText: string; bytes: Buffer }> {
    const fetch =
      this.o.fetch ??
      ((url: string, pinned: boolean) =>
        download(url, {
          fingerprint: pinned ? this.o.fingerprint : undefined,
          maxBytes: MAX_ARTIFACT_BYTES,
        }));
    const external = /^https:\/\//.test(release.artifactUrl);
    if (!external && !release.artifactUrl.startsWith('/releases/'))
      throw new ReleaseError(
        `the coordinator names an unusable artifact URL ${release.artifactUrl.slice(0, 200)}`,
      );
    const url = external ? release.artifactUrl : `${this.o.releasesUrl}${release.artifactUrl}`;
    const manifestText =
      release.manifest ||
      (await fetch(`${url.slice(0, url.lastIndexOf('/'))}/${MANIFEST_FILE}`, !external)).toString('utf8');
    const bytes = await fetch(url, !external);
    return { manifestText, bytes };
  }

  /** The watchdog runs the release being left (known to work), detached so it outlives this agent. */
  private spawnWatchdog(to: string): void {
    const log = openSync(join(this.o.stateDir, 'update-watchdog.log'), 'a', 0o600);
    spawn(
      process.execPath,
      [
        join(this.o.prefix, this.o.version, ENTRY),
        'update-watchdog',
        '--state-dir',
        this.o.stateDir,
        '--install-prefix',
        this.o.prefix,
        '--to',
        to,
      ],
      { detached: true, stdio: ['ignore', log, log] },
    ).unref();
    closeSync(log);
  }
}
