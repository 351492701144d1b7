// `meshgate release`: signing keys, packing and checking release artifacts,
// and `meshgate version`.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import { versionLine } from '../../release/version.js';
import { CliError } from '../errors.js';

const out = (s: string) => process.stdout.write(`${s}\n`);
// Loaded by the commands that need it: its schema library would slow every start of the CLI.
const manifest = () => import('../../release/manifest.js');

export function registerReleaseCommands(program: Command): void {
  program
    .command('version')
    .description('print the version, git commit and Node version')
    .action(() => {
      out(versionLine());
    });

  const release = program.command('release').description('signed release artifacts of the agent and CLI');

  release
    .command('keygen')
    .description('make an Ed25519 signing key (file 0600) and print its public key')
    .requiredOption('--out <file>', 'where to write the private key; an existing file is kept')
    .action(async (o: { out: string }) => {
      const key = (await manifest()).generateSigningKey();
      try {
        writeFileSync(o.out, key.pem, { mode: 0o600, flag: 'wx' });
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        throw new CliError(
          code === 'EEXIST'
            ? `${o.out} exists; keep it or remove it first`
            : `cannot write ${o.out}: ${code}`,
        );
      }
      out(key.publicKey);
    });

  release
    .command('pack')
    .description('bundle agent and CLI into one file for Node >= 20, signed, into OUT/VERSION/')
    .requiredOption('--version <semver>', 'version of the release, e.g. 1.4.0')
    .requiredOption('--signing-key <file>', 'private key from "meshgate release keygen" (0600)')
    .requiredOption('--out <dir>', "releases directory, e.g. the coordinator's --releases-dir")
    .action(async (o: { version: string; signingKey: string; out: string }) => {
      const { pack } = await import('../../release/pack.js');
      const r = await pack({ version: o.version, signingKeyFile: o.signingKey, outDir: o.out });
      out(`${r.artifact} (${r.manifest.size} bytes, sha256 ${r.manifest.sha256})`);
      out(join(r.dir, (await manifest()).MANIFEST_FILE));
    });

  release
    .command('verify <dir>')
    .description('check a release directory (manifest.json and artifact) against the release key')
    .requiredOption('--release-key <ed25519:base64>', 'public key printed by "meshgate release keygen"')
    .action(async (dir: string, o: { releaseKey: string }) => {
      const { MANIFEST_FILE, parseManifest, verifyArtifact, verifyManifest } = await manifest();
      let text: string;
      try {
        text = readFileSync(join(dir, MANIFEST_FILE), 'utf8');
      } catch {
        throw new CliError(`cannot read ${join(dir, MANIFEST_FILE)}`);
      }
      const m = parseManifest(text);
      verifyManifest(m, o.releaseKey);
      let bytes: Buffer;
      try {
        bytes = readFileSync(join(dir, m.file));
      } catch {
        throw new CliError(`cannot read ${join(dir, m.file)}`);
      }
      verifyArtifact(m, bytes);
      out(`release ${m.version} (commit ${m.commit.slice(0, 12)}): signature and sha256 valid`);
    });
}
