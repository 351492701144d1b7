// `meshgate release pack`: bundles the CLI and the agent into one ES module
// that runs on a plain Node (no node_modules, no compiler, no native addon),
// and writes it with its signed manifest to OUT/<version>/.

import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { build, type Plugin } from 'esbuild';
import {
  artifactFile,
  loadSigningKey,
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  ReleaseError,
  type ReleaseManifest,
  signManifest,
} from './manifest.js';
import { requireSemVer } from './semver.js';
import { buildCommit, packageRoot } from './version.js';

export const NODE_ENGINE = '>=20';

export interface PackOptions {
  version: string;
  signingKeyFile: string;
  outDir: string;
  now?: Date;
}

export interface PackResult {
  dir: string;
  artifact: string;
  manifest: ReleaseManifest;
  /** Source files from node_modules that went into the bundle, per package. */
  packages: string[];
}

/**
 * Modules that stay out of the artifact: the coordinator (its SQLite driver
 * is a native addon, and it runs where the npm package is installed) and
 * this packer (it needs esbuild). The CLI loads them with import(), so the
 * artifact only fails when one of those commands is run.
 */
const CHECKOUT_ONLY: Record<string, string> = {
  'coordinator/server.ts':
    'meshgate coordinator is not part of the release artifact: run it from the npm package',
  'coordinator/tls.ts':
    'meshgate coordinator is not part of the release artifact: run it from the npm package',
  'coordinator/store/sqlite.ts':
    'meshgate coordinator db is not part of the release artifact: run it from the npm package',
  'release/pack.ts': 'meshgate release pack runs from a checkout of meshgate (it needs its dev dependencies)',
};

function checkoutOnly(root: string): Plugin {
  return {
    name: 'checkout-only',
    setup(b) {
      b.onLoad({ filter: /\.ts$/ }, (args) => {
        const message = CHECKOUT_ONLY[relative(root, args.path)];
        if (!message) return undefined;
        return {
          contents: `const e = new Error(${JSON.stringify(message)}); e.name = 'CliError'; throw e;`,
          loader: 'js',
        };
      });
    },
  };
}

function readSigningKey(file: string) {
  let mode: number;
  try {
    mode = statSync(file).mode;
  } catch {
    throw new ReleaseError(`cannot read signing key ${file}`);
  }
  if (mode & 0o077) throw new ReleaseError(`${file} is readable by group or others; run: chmod 600 ${file}`);
  return loadSigningKey(readFileSync(file, 'utf8'));
}

export async function pack(opts: PackOptions): Promise<PackResult> {
  requireSemVer(opts.version);
  const key = readSigningKey(opts.signingKeyFile);
  const root = packageRoot();
  if (!root || !existsSync(join(root, 'cli', 'main.ts')))
    throw new ReleaseError('meshgate release pack runs from a checkout of meshgate (cli/main.ts not found)');
  const dir = join(opts.outDir, opts.version);
  if (existsSync(join(dir, MANIFEST_FILE)))
    throw new ReleaseError(`release ${opts.version} already exists in ${dir}; remove it to pack again`);

  const result = await build({
    absWorkingDir: root,
    entryPoints: [join(root, 'cli', 'main.ts')],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    write: false,
    metafile: true,
    logLevel: 'silent',
    legalComments: 'eof',
    define: {
      MESHGATE_BUILD_VERSION: JSON.stringify(opts.version),
      MESHGATE_BUILD_COMMIT: JSON.stringify(buildCommit()),
    },
    // Bundled CommonJS dependencies call require() for Node's own modules.
    banner: {
      js: "#!/usr/bin/env node\nimport { createRequire as __meshgateRequire } from 'node:module';\nconst require = __meshgateRequire(import.meta.url);",
    },
    plugins: [checkoutOnly(root)],
  });
  const inputs = Object.keys(result.metafile.inputs);
  const native = inputs.find((p) => p.endsWith('.node') || p.includes('node_modules/better-sqlite3'));
  if (native)
    throw new ReleaseError(
      `the bundle would need a native module (${native}); keep it out of the CLI's imports`,
    );
  const bytes = Buffer.from(result.outputFiles[0]!.contents);

  const manifest = signManifest(
    {
      format: MANIFEST_FORMAT,
      name: 'meshgate',
      version: opts.version,
      commit: buildCommit(),
      file: artifactFile(opts.version),
      sha256: createHash('sha256').update(bytes).digest('hex'),
      size: bytes.length,
      node: NODE_ENGINE,
      platform: 'linux',
      created: (opts.now ?? new Date()).toISOString(),
    },
    key,
  );
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const artifact = join(dir, manifest.file);
  writeFileSync(artifact, bytes, { mode: 0o755 });
  chmodSync(artifact, 0o755);
  writeFileSync(join(dir, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`, { mode: 0o644 });
  const packages = [
    ...new Set(
      inputs.flatMap((p) => {
        const m = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(p);
        return m ? [m[1]!] : [];
      }),
    ),
  ].sort();
  return { dir, artifact, manifest, packages };
}
