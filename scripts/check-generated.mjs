#!/usr/bin/env node
// Fails when proto/gen differs from what buf generates from proto/.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';

const out = mkdtempSync(join(tmpdir(), 'meshgate-gen-'));
try {
  const template = readFileSync('buf.gen.yaml', 'utf8').replace(/out: proto\/gen/, `out: ${out}`);
  execFileSync('npx', ['--no-install', 'buf', 'generate', '--template', template], { stdio: 'inherit' });
  const list = (dir) =>
    readdirSync(dir).flatMap((f) =>
      statSync(join(dir, f)).isDirectory() ? list(join(dir, f)) : [join(dir, f)],
    );
  const fresh = list(out)
    .map((f) => relative(out, f))
    .sort();
  const committed = list('proto/gen')
    .map((f) => relative('proto/gen', f))
    .sort();
  const stale = [...new Set([...fresh, ...committed])].filter(
    (f) =>
      !fresh.includes(f) ||
      !committed.includes(f) ||
      readFileSync(join(out, f), 'utf8') !== readFileSync(join('proto/gen', f), 'utf8'),
  );
  if (stale.length) {
    console.error(
      `proto/gen is out of date (${stale.join(', ')}): run npm run generate and commit the result`,
    );
    process.exit(1);
  }
  console.log('proto/gen is current');
} finally {
  rmSync(out, { recursive: true, force: true });
}
