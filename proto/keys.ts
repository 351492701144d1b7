// Key encodings shared by the coordinator, the agent and the CLI.
import { createHash } from 'node:crypto';
import nacl from 'tweetnacl';

export const KEY_BYTES = 32;

/** WireGuard's text form of a Curve25519 key. */
export function encodeWgKey(key: Uint8Array): string {
  return Buffer.from(key).toString('base64');
}

export function decodeWgKey(text: string): Uint8Array {
  const buf = Buffer.from(text, 'base64');
  if (buf.length !== KEY_BYTES || buf.toString('base64') !== text) {
    throw new Error('not a WireGuard key (44 characters of base64)');
  }
  return new Uint8Array(buf);
}

/** How a machine (Ed25519) public key is shown to people. */
export function encodeMachineKey(key: Uint8Array): string {
  return `mkey:${Buffer.from(key).toString('hex')}`;
}

export function decodeMachineKey(text: string): Uint8Array {
  const m = /^mkey:([0-9a-f]{64})$/.exec(text);
  if (!m) throw new Error('not a machine key (mkey: followed by 64 hex digits)');
  return new Uint8Array(Buffer.from(m[1]!, 'hex'));
}

export interface MachineKeyPair {
  publicKey: Uint8Array;
  secretKey: Uint8Array;
}

export function generateMachineKey(): MachineKeyPair {
  return nacl.sign.keyPair();
}

export interface NodeKeyPair {
  publicKey: Uint8Array;
  secretKey: Uint8Array;
}

export function generateNodeKey(): NodeKeyPair {
  return nacl.box.keyPair();
}

export function nodePublicKey(secretKey: Uint8Array): Uint8Array {
  return nacl.box.keyPair.fromSecretKey(secretKey).publicKey;
}

export function sha256(data: Uint8Array | string): Buffer {
  return createHash('sha256').update(data).digest();
}
