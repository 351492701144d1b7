// A throwaway qemu VM that boots Debian's own kernel (linux-image-amd64) for the tests of the
// kernel WireGuard backend, which the machines running the tests cannot load. The guest sees the
// host's file system read-only under a tmpfs overlay (so it runs this checkout's node, meshgate,
// wg, ip, nft and sshd as they are), its eth0 is a tap device in a namespace of the test's
// Topology, and it runs bash scripts sent over a virtio port, one at a time. See README.md.
import { type ChildProcess, execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { build } from 'esbuild';
import { run } from '../../../agent/dataplane/exec.js';
import type { Topology } from '../harness/netns.js';

/** What the harness needs on the host, as `requireTools` names them. */
export const VM_TOOLS = ['qemu-system-x86_64', 'cpio', 'modprobe', 'busybox', 'xz', 'timeout'];

const HERE = import.meta.dirname;
const CACHE = process.env.MESHGATE_VM_CACHE ?? '/var/cache/meshgate-test-vm';
const BUSYBOX = '/usr/bin/busybox';
/** Loaded by the initramfs to reach the root file system; everything else (wireguard, nf_tables)
 * the guest's kernel loads on demand from the host's /lib/modules, as on a real machine. */
const BOOT_MODULES = ['virtio_pci', 'virtio_console', '9pnet_virtio', '9p', 'overlay', 'virtio_net'];

const ROOT = join(HERE, '..', '..', '..');

/**
 * The `meshgate` command as one file, for the guest: under emulation, loading the CLI from its
 * thousand files over 9p takes a minute on a busy host, one file a third of that. It lives in the
 * checkout's node_modules so that the native modules left out of it still resolve.
 */
export async function bundleCli(): Promise<string> {
  const outfile = join(ROOT, 'node_modules', '.cache', 'meshgate-vm', 'meshgate.mjs');
  await build({
    entryPoints: [join(ROOT, 'cli', 'main.ts')],
    outfile,
    bundle: true,
    minify: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['better-sqlite3-multiple-ciphers', 'pg'],
    // Bundled CommonJS packages call require(); an ES module has none of its own.
    banner: {
      js: "import { createRequire as mgRequire } from 'node:module'; const require = mgRequire(import.meta.url);",
    },
    logLevel: 'warning',
  });
  return outfile;
}

export class VmError extends Error {
  override name = 'VmError';
}

/** Why the VM cannot boot on this host (a tool or Debian's kernel missing), or null. */
export function vmMissing(): string | null {
  if (!kernelVersion()) return 'no /boot/vmlinuz-*-amd64 with its /lib/modules (install linux-image-amd64)';
  try {
    execFileSync('ldd', [BUSYBOX], { stdio: 'ignore' });
    return `${BUSYBOX} is not static (install busybox-static)`;
  } catch {
    return existsSync(BUSYBOX) ? null : `no ${BUSYBOX} (install busybox-static)`;
  }
}

function kernelVersion(): string | null {
  const versions = readdirSync('/boot')
    .filter((f) => /^vmlinuz-.*-amd64$/.test(f))
    .map((f) => f.slice('vmlinuz-'.length))
    .filter((v) => existsSync(`/lib/modules/${v}/modules.dep`))
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  return versions.pop() ?? null;
}

/** The initramfs: static busybox, init.sh and the boot modules; rebuilt when any of them changes. */
function initramfs(kver: string): string {
  const init = readFileSync(join(HERE, 'init.sh'));
  const key = createHash('sha256')
    .update(init)
    .update(kver)
    .update(BOOT_MODULES.join(','))
    .update(readFileSync(BUSYBOX))
    .digest('hex')
    .slice(0, 16);
  const file = join(CACHE, `initramfs-${kver}-${key}.cpio.gz`);
  if (existsSync(file)) return file;
  mkdirSync(CACHE, { recursive: true, mode: 0o700 });
  const dir = mkdtempSync(join(CACHE, 'build-'));
  try {
    for (const d of ['bin', 'dev', 'proc', 'sys', 'modules']) mkdirSync(join(dir, d));
    copyFileSync(BUSYBOX, join(dir, 'bin', 'busybox'));
    chmodSync(join(dir, 'bin', 'busybox'), 0o755);
    for (const applet of ['sh', 'mount', 'insmod', 'mkdir', 'grep', 'sleep', 'switch_root', 'echo'])
      execFileSync('ln', ['-s', 'busybox', join(dir, 'bin', applet)]);
    writeFileSync(join(dir, 'init'), init, { mode: 0o755 });
    const order: string[] = [];
    for (const m of BOOT_MODULES) {
      const deps = execFileSync('modprobe', ['-S', kver, '--show-depends', m], { encoding: 'utf8' });
      for (const line of deps.split('\n')) {
        const path = /^insmod (\S+)/.exec(line)?.[1];
        if (!path) continue; // "builtin m": compiled into the kernel
        const name = basename(path).replace(/\.(xz|zst|gz)$/, '');
        if (order.includes(name)) continue;
        order.push(name);
        const dest = join(dir, 'modules', name);
        if (path.endsWith('.xz')) writeFileSync(dest, execFileSync('xz', ['-dc', path]));
        else if (path.endsWith('.zst')) writeFileSync(dest, execFileSync('zstd', ['-qdc', path]));
        else copyFileSync(path, dest);
      }
    }
    writeFileSync(join(dir, 'modules', 'order'), `${order.join('\n')}\n`);
    execFileSync(
      'sh',
      [
        '-c',
        'cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 > "$2.tmp"',
        'sh',
        dir,
        file,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    renameSync(`${file}.tmp`, file);
    return file;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The kernel's ELF, unpacked once from the xz-packed bzImage: qemu enters it through its PVH note,
 * which under emulation saves the guest seconds of decompression at every boot.
 */
function unpackedKernel(kver: string): string {
  const file = join(CACHE, `vmlinux-${kver}`);
  if (existsSync(file) && statSync(file).size > 0) return file;
  const packed = readFileSync(`/boot/vmlinuz-${kver}`);
  const at = packed.indexOf(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]));
  if (at < 0) return `/boot/vmlinuz-${kver}`;
  mkdirSync(CACHE, { recursive: true, mode: 0o700 });
  let elf: Buffer;
  try {
    elf = execFileSync('xz', ['-dc', '--single-stream'], {
      input: packed.subarray(at),
      maxBuffer: 512 * 2 ** 20,
      stdio: ['pipe', 'pipe', 'ignore'],
    });
  } catch (err) {
    // xz complains about the bytes after the stream; what it unpacked is the kernel.
    elf = (err as { stdout: Buffer }).stdout;
  }
  writeFileSync(`${file}.tmp`, elf);
  renameSync(`${file}.tmp`, file);
  return file;
}

/**
 * Whether KVM runs a guest here: /dev/kvm can exist on a host that is itself a VM and still not
 * boot one. Asked once per host boot (a probe guest gets 10 s) and remembered in the cache.
 */
function kvmUsable(kernel: string, initrd: string): boolean {
  const want = process.env.MESHGATE_VM_ACCEL;
  if (want === 'kvm') return true;
  if (want === 'tcg') return false;
  try {
    execFileSync('test', ['-w', '/dev/kvm']);
  } catch {
    return false;
  }
  const boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().slice(0, 8);
  const mark = join(CACHE, `kvm-${boot}`);
  if (existsSync(mark)) return readFileSync(mark, 'utf8') === 'yes';
  const log = join(CACHE, `kvm-probe-${process.pid}.log`);
  try {
    execFileSync(
      'timeout',
      [
        '10',
        'qemu-system-x86_64',
        '-accel',
        'kvm',
        '-M',
        'q35',
        '-m',
        '256',
        '-nodefaults',
        '-no-user-config',
      ]
        .concat(['-display', 'none', '-no-reboot', '-kernel', kernel, '-initrd', initrd])
        .concat(['-serial', `file:${log}`, '-append', 'console=ttyS0 panic=-1 meshgate.probe']),
      { stdio: 'ignore' },
    );
  } catch {
    // Timed out or refused: the log says whether the guest got as far as the probe.
  }
  const ok = existsSync(log) && readFileSync(log, 'utf8').includes('meshgate-vm: probe ok');
  rmSync(log, { force: true });
  writeFileSync(mark, ok ? 'yes' : 'no');
  return ok;
}

export interface VmOptions {
  /** Topology host whose namespace gets the tap device; qemu runs there too. */
  host: string;
  /** The host side's address on the tap, e.g. 198.51.100.1/24; also the guest's gateway. */
  hostAddress: string;
  /** The guest's eth0 address, e.g. 198.51.100.2/24. */
  guestAddress: string;
  hostname?: string;
  memory?: string;
  cpus?: number;
  /** qemu is killed after this long whatever happens to the test process. */
  maxSeconds?: number;
}

export interface ExecResult {
  code: number;
  output: string;
}

export class Vm {
  readonly runDir: string;
  readonly tap: string;
  private qemu: ChildProcess | null = null;
  private ctl: Socket | null = null;
  private buffered = '';
  private pending = new Map<string, (r: ExecResult) => void>();
  private queue: Promise<unknown> = Promise.resolve();
  private consoleOut: string[] = [];
  private readonly removeRunDir = () => rmSync(this.runDir, { recursive: true, force: true });
  /** Seconds from qemu's start until the guest's control loop answered. */
  bootSeconds = 0;

  constructor(
    private readonly topo: Topology,
    private readonly options: VmOptions,
  ) {
    this.runDir = mkdtempSync(join(tmpdir(), 'meshgate-vm-'));
    chmodSync(this.runDir, 0o700);
    // The Topology stops qemu (it runs in one of its namespaces) on Ctrl-C; the run dir goes here.
    process.once('exit', this.removeRunDir);
    this.tap = `mg${topo.id}tap`;
  }

  /** Boots the guest and resolves once it takes commands. */
  async start(): Promise<void> {
    const kver = kernelVersion();
    if (!kver) throw new VmError(vmMissing() ?? 'no kernel');
    const initrd = initramfs(kver);
    const kernel = unpackedKernel(kver);
    const kvm = kvmUsable(kernel, initrd);
    const { host, hostAddress, guestAddress } = this.options;
    const ns = this.topo.ns(host);
    await run('ip', ['-n', ns, 'tuntap', 'add', 'dev', this.tap, 'mode', 'tap']);
    await run('ip', ['-n', ns, 'addr', 'add', hostAddress, 'dev', this.tap]);
    await run('ip', ['-n', ns, 'link', 'set', this.tap, 'up']);

    copyFileSync(join(HERE, 'boot.sh'), join(this.runDir, 'boot.sh'));
    writeFileSync(
      join(this.runDir, 'config'),
      [
        `VM_HOSTNAME=${this.options.hostname ?? 'vm'}`,
        `VM_ADDRESS=${guestAddress}`,
        `VM_GATEWAY=${hostAddress.split('/')[0]}`,
        '',
      ].join('\n'),
    );
    const ctlPath = join(this.runDir, 'ctl.sock');
    const started = Date.now();
    const append = [
      'console=ttyS0 loglevel=4 panic=-1 rdinit=/init mitigations=off tsc=reliable no_timer_check',
      'i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd nowatchdog nmi_watchdog=0 random.trust_cpu=on',
    ].join(' ');
    const fs9p = (id: string, path: string, extra: string) => [
      '-fsdev',
      `local,id=${id},path=${path},security_model=passthrough${extra}`,
      '-device',
      `virtio-9p-pci,fsdev=${id},mount_tag=${id}`,
    ];
    this.qemu = this.topo.spawn(host, 'timeout', [
      '-k',
      '5',
      String(this.options.maxSeconds ?? 600),
      'qemu-system-x86_64',
      ...(kvm ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg,thread=multi', '-cpu', 'max']),
      ...['-M', 'q35', '-smp', String(this.options.cpus ?? 2), '-m', this.options.memory ?? '1G'],
      ...['-nodefaults', '-no-user-config', '-display', 'none', '-vga', 'none', '-no-reboot'],
      ...['-kernel', kernel, '-initrd', initrd, '-append', append],
      ...['-serial', `file:${join(this.runDir, 'console.log')}`],
      ...['-device', 'virtio-serial-pci'],
      ...['-chardev', 'stdio,id=out,signal=off', '-device', 'virtconsole,chardev=out'],
      ...['-chardev', `socket,id=ctl,path=${ctlPath},server=on,wait=off`],
      ...['-device', 'virtserialport,chardev=ctl,name=ctl'],
      ...fs9p('host', '/', ',readonly=on,multidevs=remap'),
      ...fs9p('run', this.runDir, ''),
      ...['-netdev', `tap,id=n0,ifname=${this.tap},script=no,downscript=no`],
      ...['-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56'],
    ]);
    const ready = new Promise<void>((resolve, reject) => {
      let seen = '';
      this.qemu!.stdout!.on('data', (d: Buffer) => {
        this.consoleOut.push(String(d));
        seen += d;
        if (seen.includes('meshgate-vm: ready')) resolve();
      });
      this.qemu!.stderr!.on('data', (d: Buffer) => this.consoleOut.push(String(d)));
      this.qemu!.once('exit', (code) =>
        reject(new VmError(`qemu exited (${code}) before the guest was ready\n${this.diagnostics()}`)),
      );
    });
    await ready;
    this.ctl = await new Promise<Socket>((resolve, reject) => {
      const s = connect(ctlPath, () => resolve(s));
      s.once('error', reject);
    });
    this.ctl.on('data', (d: Buffer) => this.onAnswer(String(d)));
    this.ctl.on('close', () => {
      for (const done of this.pending.values()) done({ code: -1, output: 'the VM went away' });
      this.pending.clear();
    });
    await this.exec('true', 120_000);
    this.bootSeconds = (Date.now() - started) / 1000;
  }

  private onAnswer(chunk: string): void {
    this.buffered += chunk;
    for (;;) {
      const nl = this.buffered.indexOf('\n');
      if (nl < 0) return;
      const [id, code, output] = this.buffered.slice(0, nl).split('\t');
      this.buffered = this.buffered.slice(nl + 1);
      const done = this.pending.get(id!);
      this.pending.delete(id!);
      done?.({ code: Number(code), output: Buffer.from(output ?? '', 'base64').toString() });
    }
  }

  /** Runs a bash script in the guest (as root, cwd /) and resolves to its status and output. */
  exec(script: string, timeoutMs = 60_000): Promise<ExecResult> {
    const next = this.queue.then(() => this.execNow(script, timeoutMs));
    this.queue = next.catch(() => {});
    return next;
  }

  private execNow(script: string, timeoutMs: number): Promise<ExecResult> {
    const ctl = this.ctl;
    if (!ctl) return Promise.reject(new VmError('the VM is not running'));
    const id = randomBytes(4).toString('hex');
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new VmError(`no answer from the VM within ${timeoutMs} ms to: ${script.slice(0, 200)}`));
      }, timeoutMs);
      this.pending.set(id, (r) => {
        clearTimeout(timer);
        resolve(r);
      });
      ctl.write(`${id}\t${Buffer.from(script).toString('base64')}\n`);
    });
  }

  /** Like exec(), but a non-zero status is an error that carries the output. */
  async sh(script: string, timeoutMs = 60_000): Promise<string> {
    const r = await this.exec(script, timeoutMs);
    if (r.code !== 0) throw new VmError(`in the VM, exit ${r.code}: ${script.slice(0, 200)}\n${r.output}`);
    return r.output;
  }

  /** Resolves when `script` exits 0 in the guest; re-runs it every `everyMs` until `timeoutMs`. */
  async until(what: string, script: string, timeoutMs = 30_000, everyMs = 500): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    let last: ExecResult = { code: -1, output: '' };
    while (Date.now() < deadline) {
      try {
        last = await this.exec(script, Math.max(1000, deadline - Date.now()));
      } catch (err) {
        last = { code: -1, output: (err as Error).message };
        break;
      }
      if (last.code === 0) return last.output;
      await sleep(everyMs);
    }
    throw new VmError(`timed out after ${timeoutMs} ms waiting for ${what} in the VM: ${last.output}`);
  }

  /** The guest's console and kernel log, for a failing test's message. */
  diagnostics(): string {
    let kernel = '';
    try {
      kernel = readFileSync(join(this.runDir, 'console.log'), 'utf8').split('\n').slice(-40).join('\n');
    } catch {
      // qemu never started
    }
    return `--- VM console\n${this.consoleOut.join('')}\n--- VM kernel log\n${kernel}`;
  }

  /** What the guest wrote to /run/meshgate-vm/agent.log (the run dir, shared with the host). */
  agentLog(): string {
    try {
      return readFileSync(join(this.runDir, 'agent.log'), 'utf8').split('\n').slice(-60).join('\n');
    } catch {
      return '(none)';
    }
  }

  /** Powers the guest off (it is throwaway: nothing to flush) and removes the run dir. */
  async destroy(): Promise<void> {
    this.ctl?.destroy();
    this.ctl = null;
    const q = this.qemu;
    if (q && q.exitCode === null && q.signalCode === null) {
      // `timeout` passes SIGTERM on to qemu; a SIGKILL would leave qemu running without it.
      const gone = new Promise((r) => q.once('exit', r));
      q.kill('SIGTERM');
      const timer = setTimeout(() => q.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(timer);
    }
    this.removeRunDir();
    process.off('exit', this.removeRunDir);
  }
}
