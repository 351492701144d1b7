// The agent's state dir (0700): machine key, node key, node identity and
// the last netmap, each a 0600 file. A machine keeps its identity across
// reboots, so re-registering is idempotent and needs no fresh auth key.
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { fromBinary, toBinary } from '@bufbuild/protobuf';
import { type NetMap, NetMapSchema } from '../../proto/gen/meshgate/v1/types_pb.js';
import {
  encodeWgKey,
  generateMachineKey,
  generateNodeKey,
  type MachineKeyPair,
  nodePublicKey,
} from '../../proto/keys.js';

export class StateDirError extends Error {
  override name = 'StateDirError';
}

export interface NodeIdentity {
  id: string;
  name: string;
  project: string;
  ipAddresses: string[];
}

export interface Identity {
  machine: MachineKeyPair;
  /** WireGuard private key, 32 bytes. */
  nodeSecret: Uint8Array;
  nodePublic: Uint8Array;
  node: NodeIdentity | null;
}

function writeSecretFile(path: string, data: string | Uint8Array): void {
  const tmp = `${path}.tmp`;
  writeFileSync(tmp, data, { mode: 0o600 });
  chmodSync(tmp, 0o600);
  renameSync(tmp, path);
}

function checkPrivate(path: string): void {
  const mode = statSync(path).mode & 0o777;
  if (mode & 0o077)
    throw new StateDirError(
      `${path} is accessible by group or others (mode ${mode.toString(8)}); run: chmod go-rwx ${path}`,
    );
}

export class StateDir {
  constructor(readonly dir: string) {}

  private path(name: string): string {
    return join(this.dir, name);
  }

  /** Loads the identity, making keys on first start. */
  load(): Identity {
    if (!existsSync(this.dir)) mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    checkPrivate(this.dir);
    const machinePath = this.path('machine.key');
    const nodePath = this.path('node.key');
    if (!existsSync(machinePath))
      writeSecretFile(machinePath, Buffer.from(generateMachineKey().secretKey).toString('base64'));
    if (!existsSync(nodePath)) writeSecretFile(nodePath, encodeWgKey(generateNodeKey().secretKey));
    for (const p of [machinePath, nodePath]) checkPrivate(p);
    const machineSecret = new Uint8Array(Buffer.from(readFileSync(machinePath, 'utf8').trim(), 'base64'));
    if (machineSecret.length !== 64)
      throw new StateDirError(`${machinePath} is not a machine key; move it away to make a new identity`);
    const nodeSecret = new Uint8Array(Buffer.from(readFileSync(nodePath, 'utf8').trim(), 'base64'));
    if (nodeSecret.length !== 32) throw new StateDirError(`${nodePath} is not a WireGuard key`);
    const nodeFile = this.path('node.json');
    return {
      machine: { secretKey: machineSecret, publicKey: machineSecret.slice(32) },
      nodeSecret,
      nodePublic: nodePublicKey(nodeSecret),
      node: existsSync(nodeFile) ? readNodeIdentity(nodeFile) : null,
    };
  }

  /** The WireGuard private key as a file, for `wg set … private-key FILE`. */
  get nodeKeyFile(): string {
    return this.path('node.key');
  }

  /**
   * When node.key was made: its modification time. The key is only ever
   * written whole (write + rename), so the time cannot disagree with the key.
   */
  nodeKeyCreatedAt(): number {
    return statSync(this.nodeKeyFile).mtimeMs;
  }

  /** Replaces the WireGuard private key atomically. */
  saveNodeKey(secret: Uint8Array): void {
    writeSecretFile(this.nodeKeyFile, encodeWgKey(secret));
  }

  saveNode(node: NodeIdentity): void {
    writeSecretFile(this.path('node.json'), JSON.stringify(node, null, 2));
  }

  saveNetMap(map: NetMap): void {
    writeSecretFile(this.path('netmap.bin'), toBinary(NetMapSchema, map));
  }

  /** `meshgate down` is kept as a file, so a restarted agent (systemd, reboot) stays down. */
  get isDown(): boolean {
    return existsSync(this.path('down'));
  }

  setDown(down: boolean): void {
    if (down) writeSecretFile(this.path('down'), `${new Date().toISOString()}\n`);
    else rmSync(this.path('down'), { force: true });
  }

  /** `meshgate logout`: the next start is a new machine. */
  forget(): void {
    for (const f of ['node.json', 'netmap.bin', 'machine.key', 'node.key'])
      rmSync(this.path(f), { force: true });
  }

  /**
   * The cached netmap, if there is one that decodes. A damaged cache is
   * reported through `warn` and removed: the coordinator sends a fresh netmap,
   * and the next save would replace the file anyway.
   */
  loadNetMap(warn: (message: string) => void): NetMap | null {
    const p = this.path('netmap.bin');
    if (!existsSync(p)) return null;
    try {
      return fromBinary(NetMapSchema, readFileSync(p));
    } catch (err) {
      rmSync(p, { force: true });
      warn(
        `${p} is damaged (${firstLine(err)}); removed it, peers come back with the next netmap from the coordinator`,
      );
      return null;
    }
  }
}

function firstLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split('\n')[0]!;
}

/** node.json as saved by saveNode; anything else is a damaged file the operator has to deal with. */
function readNodeIdentity(path: string): NodeIdentity {
  let node: Partial<NodeIdentity>;
  try {
    node = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw damagedNodeFile(path, firstLine(err));
  }
  const strings = (v: unknown) => Array.isArray(v) && v.every((x) => typeof x === 'string');
  if (
    typeof node?.id !== 'string' ||
    !node.id ||
    typeof node.name !== 'string' ||
    typeof node.project !== 'string' ||
    !strings(node.ipAddresses)
  )
    throw damagedNodeFile(path, 'not a node identity');
  return { id: node.id, name: node.name, project: node.project, ipAddresses: node.ipAddresses! };
}

function damagedNodeFile(path: string, reason: string): StateDirError {
  return new StateDirError(
    `${path} is damaged (${reason}): delete it and start the agent again with --auth-key-file; ` +
      'the machine key in the same directory brings back the same node (a spent key will do)',
  );
}
