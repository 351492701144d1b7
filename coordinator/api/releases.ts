// Release artifacts served from the coordinator's releases dir
// (--releases-dir, laid out by `meshgate release pack --out`):
//   GET /releases/                       {"versions": [...], "latest": "..."}
//   GET /releases/VERSION/manifest.json  the signed manifest
//   GET /releases/VERSION/meshgate-VERSION.mjs
//   GET /install.sh                      the provisioning script
//   POST /releases/desired               body: an auth key; the desired version
//                                        for a machine joining with it
// No authentication for the files: artifacts are public and carry their own
// signature, which install.sh and agents check against a pinned key.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import express from 'express';
import type { Logger } from 'pino';
import { MANIFEST_FILE, parseManifest, type ReleaseManifest } from '../../release/manifest.js';
import { compareVersions, isSemVer } from '../../release/semver.js';
import { packageRoot } from '../../release/version.js';
import type { State } from '../state/state.js';
import type { RateLimiter } from './ratelimit.js';
import { toStatus } from './status.js';

interface Cached {
  mtimeMs: number;
  size: number;
  manifest: ReleaseManifest | null;
}

export class ReleaseDir {
  private readonly cache = new Map<string, Cached>();

  /** dir: the releases dir, or null when the coordinator serves no releases. */
  constructor(readonly dir: string | null) {
    if (dir !== null) this.dir = resolve(dir);
  }

  /**
   * The manifest of a release this coordinator can serve: a valid manifest
   * for this version, next to an artifact of the size and sha256 it names.
   * The signature is for the nodes to check against their pinned key.
   */
  lookup(version: string): ReleaseManifest | null {
    if (!this.dir || !isSemVer(version)) return null;
    const manifestPath = join(this.dir, version, MANIFEST_FILE);
    let text: string;
    let m: ReleaseManifest;
    try {
      text = readFileSync(manifestPath, 'utf8');
      m = parseManifest(text);
    } catch {
      return null;
    }
    if (m.version !== version) return null;
    const artifact = join(this.dir, version, m.file);
    let st: { mtimeMs: number; size: number };
    try {
      st = statSync(artifact);
    } catch {
      return null;
    }
    const key = `${version}\0${text}`;
    const hit = this.cache.get(key);
    if (hit && hit.mtimeMs === st.mtimeMs && hit.size === st.size) return hit.manifest;
    const ok =
      st.size === m.size && createHash('sha256').update(readFileSync(artifact)).digest('hex') === m.sha256;
    this.cache.set(key, { mtimeMs: st.mtimeMs, size: st.size, manifest: ok ? m : null });
    return ok ? m : null;
  }

  /** Versions that can be served, oldest first. */
  versions(): string[] {
    if (!this.dir || !existsSync(this.dir)) return [];
    return readdirSync(this.dir)
      .filter((v) => this.lookup(v) !== null)
      .sort(compareVersions);
  }

  /** Where a node fetches the artifact of a served version, relative to the coordinator's HTTPS URL. */
  static artifactPath(m: ReleaseManifest): string {
    return `/releases/${m.version}/${m.file}`;
  }
}

function installScript(): string | null {
  const root = packageRoot();
  const path = root ? join(root, 'deploy', 'install.sh') : null;
  return path && existsSync(path) ? readFileSync(path, 'utf8') : null;
}

export interface ReleaseRouteDeps {
  releases: ReleaseDir;
  state: State;
  /** Shared with registration: both let a caller try auth keys. */
  limiter: RateLimiter;
  log: Logger;
}

export function releaseRoutes({ releases, state, limiter, log }: ReleaseRouteDeps): express.Router {
  const router = express.Router();
  const script = installScript();
  router.get('/install.sh', (_req, res) => {
    if (script === null) {
      res.status(404).type('text/plain').send('install.sh is not available on this coordinator\n');
      return;
    }
    res.type('text/x-shellscript').set('cache-control', 'no-cache').send(script);
  });
  router.get('/releases/', (_req, res) => {
    const versions = releases.versions();
    res.set('cache-control', 'no-cache').json({ versions, latest: versions.at(-1) ?? null });
  });
  router.post(
    '/releases/desired',
    express.text({ type: () => true, limit: 1024 }),
    async (req: express.Request, res: express.Response) => {
      const peer = req.socket.remoteAddress ?? 'unknown';
      if (!limiter.take(peer)) {
        log.warn({ peer, reason: 'rate limited' }, 'refused desired version lookup');
        res.status(429).json({ error: 'too many attempts; slow down' });
        return;
      }
      try {
        const entry = await state.desiredEntryForAuthKey(typeof req.body === 'string' ? req.body.trim() : '');
        const served = entry && !entry.artifactUrl ? releases.lookup(entry.version) : null;
        res.set('cache-control', 'no-store').json({
          version: entry?.version ?? null,
          served: served !== null,
          allowDowngrade: entry?.allowDowngrade ?? false,
        });
      } catch (err) {
        const s = toStatus(err, log, { http: 'releases/desired' });
        if (s.http === 401) log.warn({ peer, reason: s.details }, 'refused desired version lookup');
        res.status(s.http).json({ error: s.details });
      }
    },
  );
  router.get('/releases/:version/:file', (req, res) => {
    // Both parts are checked against the manifest before a path is built, so
    // nothing but a release's own two files can be named.
    const m = releases.lookup(String(req.params.version));
    const file = String(req.params.file);
    if (!m || !releases.dir || (file !== MANIFEST_FILE && file !== m.file)) {
      res.status(404).type('text/plain').send('no such release\n');
      return;
    }
    res.sendFile(`${m.version}/${file}`, {
      root: releases.dir,
      headers: {
        'content-type': file === MANIFEST_FILE ? 'application/json' : 'text/javascript',
        'cache-control': file === MANIFEST_FILE ? 'no-cache' : 'public, max-age=31536000, immutable',
      },
    });
  });
  return router;
}
