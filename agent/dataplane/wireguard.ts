// The agent's handle on its WireGuard interface: creates it, keeps it configured (also across
// wireguard-go restarts) and reports what WireGuard sees. Every change goes through one queue, so a
// restart's re-apply and a new netmap never interleave their `wg set` calls.
import { chmod, mkdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { decodeWgKey, encodeWgKey, nodePublicKey } from '../../proto/keys.js';
import { type Backend, type BackendEvent, createInterface, type WgInterface } from './backend.js';
import { type ActualInterface, parseDump } from './dump.js';
import { run } from './exec.js';
import { configureLink, type LinkConfig } from './link.js';
import {
  type DesiredInterface,
  type EndpointPolicy,
  type PeerOp,
  planInterfaceArgs,
  planPeers,
  wgSetCommands,
} from './reconcile.js';

export interface WireGuardDeviceOptions {
  name: string;
  backend?: Backend;
  netns?: string;
  /** Where writePrivateKey keeps the key file. */
  stateDir?: string;
  endpointPolicy?: EndpointPolicy;
  maxArgBytes?: number;
  /** Called after wireguard-go came back and the device re-applied its last configuration. */
  onRestart?: () => Promise<void> | void;
  onEvent?: (event: BackendEvent) => void;
}

export interface ApplyResult {
  interfaceArgs: string[];
  ops: PeerOp[];
  /** Number of `wg set` calls that were run. */
  commands: number;
}

export class PrivateKeyFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PrivateKeyFileError';
  }
}

export class WireGuardDevice {
  private queue: Promise<unknown> = Promise.resolve();
  private lastDesired: DesiredInterface | null = null;
  private lastLink: LinkConfig | null = null;
  private iface: WgInterface | null = null;

  private constructor(private readonly options: WireGuardDeviceOptions) {}

  static async create(options: WireGuardDeviceOptions): Promise<WireGuardDevice> {
    const device = new WireGuardDevice(options);
    device.iface = await createInterface({
      name: options.name,
      backend: options.backend ?? 'auto',
      netns: options.netns,
      onEvent: options.onEvent,
      onRestart: () => device.reapply(),
    });
    return device;
  }

  get name(): string {
    return this.options.name;
  }

  get backend(): 'kernel' | 'wireguard-go' {
    return this.iface!.backend;
  }

  /** Stores the key as a 0600 file in the state dir and returns its path, for DesiredInterface. */
  async writePrivateKey(privateKey: string): Promise<string> {
    const dir = this.options.stateDir;
    if (!dir) throw new PrivateKeyFileError('no state directory given to keep the WireGuard private key in');
    decodePrivateKey(privateKey, 'not a WireGuard private key (44 characters of base64)');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const file = join(dir, `wireguard-${this.name}.key`);
    const tmp = `${file}.tmp`;
    await writeFile(tmp, `${privateKey}\n`, { mode: 0o600 });
    // The mode given to writeFile is ignored when the file already existed.
    await chmod(tmp, 0o600);
    await rename(tmp, file);
    return file;
  }

  /** Changes the interface to match `desired`, touching only peers and settings that differ. */
  apply(desired: DesiredInterface, options: { endpointPolicy?: EndpointPolicy } = {}): Promise<ApplyResult> {
    return this.serial(async () => {
      const result = await this.applyNow(desired, options.endpointPolicy);
      this.lastDesired = desired;
      return result;
    });
  }

  /** Sets addresses, MTU and routes; returns the `ip` commands it needed. */
  configureLink(config: LinkConfig): Promise<string[][]> {
    return this.serial(async () => {
      const cmds = await configureLink(this.name, config, this.options.netns);
      this.lastLink = config;
      return cmds;
    });
  }

  async show(): Promise<ActualInterface> {
    return parseDump(await run('wg', ['show', this.name, 'dump'], { netns: this.options.netns }));
  }

  /** Recreates and reconfigures an interface someone deleted; true when it had to. */
  async ensure(): Promise<boolean> {
    if (!(await this.iface!.ensure())) return false;
    await this.reapply();
    return true;
  }

  async destroy(): Promise<void> {
    await this.queue.catch(() => {});
    await this.iface?.destroy();
  }

  /** For an agent that restarts into another version: see WgInterface.detach. */
  async detach(): Promise<void> {
    await this.queue.catch(() => {});
    this.iface?.detach();
  }

  /** For an agent that stops without leaving the mesh: see WgInterface.release. */
  async release(): Promise<void> {
    await this.queue.catch(() => {});
    await this.iface?.release();
  }

  private async applyNow(desired: DesiredInterface, endpointPolicy?: EndpointPolicy): Promise<ApplyResult> {
    const publicKey = await publicKeyOf(desired.privateKeyFile);
    const actual = await this.show();
    const interfaceArgs = planInterfaceArgs(desired, publicKey, actual);
    const ops = planPeers(desired.peers, actual.peers, {
      endpointPolicy: endpointPolicy ?? this.options.endpointPolicy,
    });
    const commands = wgSetCommands(this.name, interfaceArgs, ops, this.options.maxArgBytes);
    for (const args of commands) await run('wg', args, { netns: this.options.netns });
    return { interfaceArgs, ops, commands: commands.length };
  }

  private async reapply(): Promise<void> {
    await this.serial(async () => {
      if (this.lastLink) await configureLink(this.name, this.lastLink, this.options.netns);
      if (this.lastDesired) await this.applyNow(this.lastDesired);
    });
    await this.options.onRestart?.();
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.catch(() => {}).then(fn);
    this.queue = next;
    return next;
  }
}

/** The key file must be private (security rule: refuse secrets readable by others). */
async function publicKeyOf(file: string): Promise<string> {
  const info = await stat(file).catch(() => {
    throw new PrivateKeyFileError(`private key file ${file} cannot be read`);
  });
  if (info.mode & 0o077) {
    throw new PrivateKeyFileError(`private key file ${file} is accessible by others: chmod 600 ${file}`);
  }
  const text = (await readFile(file, 'utf8')).trim();
  return encodeWgKey(
    nodePublicKey(decodePrivateKey(text, `private key file ${file} does not hold a WireGuard key`)),
  );
}

/** Wraps the decoder so that a malformed key never shows up in an error message. */
function decodePrivateKey(text: string, message: string): Uint8Array {
  try {
    return decodeWgKey(text);
  } catch {
    throw new PrivateKeyFileError(message);
  }
}
