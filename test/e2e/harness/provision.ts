// Machines provisioned the way an operator does it: install.sh fetched from
// the coordinator (pinned) and piped into sh, with the filesystem moved
// under the lab dir through install.sh's path overrides.
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import type { MeshLab } from './mesh.js';

export interface Prefix {
  root: string;
  opt: string;
  bin: string;
  etc: string;
  unit: string;
  state: string;
}

export interface ScriptResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** A machine's filesystem locations, under the lab dir instead of /. */
export function machinePrefix(lab: MeshLab, name: string): Prefix {
  const root = join(lab.dir, name);
  return {
    root,
    opt: join(root, 'opt', 'meshgate'),
    bin: join(root, 'usr', 'local', 'bin'),
    etc: join(root, 'etc', 'meshgate'),
    unit: join(root, 'etc', 'systemd', 'system'),
    state: join(root, 'var', 'lib', 'meshgate-agent'),
  };
}

export interface InstallOptions {
  lab: MeshLab;
  host: string;
  prefix: Prefix;
  /** The coordinator's host address (its HTTPS port serves install.sh). */
  coordAddress: string;
  /** curl's --pinnedpubkey form of the coordinator's key. */
  pin: string;
  iface: string;
  args: string[];
  authKey?: string;
  coordinatorFlag?: boolean;
}

/**
 * Runs the operator's one line in `host`: curl fetches install.sh and pipes
 * it into sh. The auth key is in sh's environment only. A curl wrapper first
 * on PATH records what every curl started by install.sh saw.
 */
export function installWithScript(o: InstallOptions): Promise<ScriptResult> {
  const { lab, prefix: p } = o;
  const fake = join(lab.dir, `fakebin-${basename(p.root)}`);
  const keyFile = join(lab.dir, `operator-key-${basename(p.root)}`);
  if (o.authKey) writeFileSync(keyFile, o.authKey, { mode: 0o600 });
  mkdirSync(fake, { recursive: true });
  writeFileSync(
    join(fake, 'curl'),
    `#!/bin/sh\n{ printf 'argv: %s\\n' "$*"; env; } >>${join(fake, 'curl.log')}\nexec /usr/bin/curl "$@"\n`,
    { mode: 0o755 },
  );
  const line = [
    `/usr/bin/curl -fsSL -k --pinnedpubkey '${o.pin}' https://${o.coordAddress}:7480/install.sh |`,
    o.authKey ? `MESHGATE_AUTH_KEY="$(cat ${keyFile})"` : '',
    `sh -s -- ${o.coordinatorFlag === false ? '' : `--coordinator ${lab.coordinator!.url}`}`,
    `--fingerprint ${lab.coordinator!.fingerprint}`,
    `--interface ${o.iface} --state-dir ${p.state} --no-start ${o.args.join(' ')}`,
  ].join(' ');
  return new Promise((resolve) => {
    const child = spawn('ip', ['netns', 'exec', lab.topo.ns(o.host), 'sh', '-c', line], {
      env: {
        PATH: `${fake}:/usr/sbin:/usr/bin:/sbin:/bin`,
        MESHGATE_OPT_DIR: p.opt,
        MESHGATE_BIN_DIR: p.bin,
        MESHGATE_ETC_DIR: p.etc,
        MESHGATE_UNIT_DIR: p.unit,
        MESHGATE_METAL_INSTALL: join(p.root, 'etc', 'metal', 'install.yaml'),
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? 1, stdout, stderr });
    });
  });
}
