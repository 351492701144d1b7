// Signed control calls: every agent call carries, in its gRPC metadata, an
// Ed25519 signature over the method, the node id, a timestamp, a nonce and
// the SHA-256 of the request bytes. The coordinator checks the signature
// against the node's machine key, the timestamp against a clock window and
// the nonce against a replay cache.
import { createPublicKey, type KeyObject, randomBytes, verify } from 'node:crypto';
import nacl from 'tweetnacl';
import { sha256 } from './keys.js';

export const SIG_NODE_ID = 'mg-node-id';
export const SIG_MACHINE_KEY = 'mg-machine-key';
export const SIG_TIMESTAMP = 'mg-timestamp';
export const SIG_NONCE = 'mg-nonce';
export const SIG_SIGNATURE = 'mg-signature';

export interface SignedCall {
  method: string;
  /** Empty for Register, where the machine key itself identifies the caller. */
  nodeId: string;
  /** Milliseconds since the epoch. */
  timestamp: number;
  /** 16 random bytes, hex. */
  nonce: string;
  /** SHA-256 of the serialized request; of zero bytes for a stream. */
  bodyHash: Uint8Array;
}

export function signingPayload(call: SignedCall): Uint8Array {
  const text = [
    'meshgate-call-v1',
    call.method,
    call.nodeId,
    String(call.timestamp),
    call.nonce,
    Buffer.from(call.bodyHash).toString('hex'),
  ].join('\n');
  return new TextEncoder().encode(text);
}

export interface CallSignature {
  [SIG_NODE_ID]: string;
  [SIG_MACHINE_KEY]: string;
  [SIG_TIMESTAMP]: string;
  [SIG_NONCE]: string;
  [SIG_SIGNATURE]: string;
}

/** Headers for one call; `body` is the serialized request (empty for a stream). */
export function signCall(
  machineSecretKey: Uint8Array,
  method: string,
  nodeId: string,
  body: Uint8Array,
  now = Date.now(),
): CallSignature {
  const call: SignedCall = {
    method,
    nodeId,
    timestamp: now,
    nonce: randomBytes(16).toString('hex'),
    bodyHash: sha256(body),
  };
  const signature = nacl.sign.detached(signingPayload(call), machineSecretKey);
  const publicKey = machineSecretKey.subarray(32);
  return {
    [SIG_NODE_ID]: nodeId,
    [SIG_MACHINE_KEY]: Buffer.from(publicKey).toString('hex'),
    [SIG_TIMESTAMP]: String(call.timestamp),
    [SIG_NONCE]: call.nonce,
    [SIG_SIGNATURE]: Buffer.from(signature).toString('base64'),
  };
}

/**
 * Parsed Ed25519 public keys by their raw bytes. Parsing a key costs nearly
 * as much as checking a signature, and a node signs all its calls with the
 * same key. Bounded so that callers inventing keys cannot grow it; the oldest
 * entry goes first.
 */
export class PublicKeyCache {
  private readonly keys = new Map<string, KeyObject>();

  constructor(readonly limit: number) {}

  get size(): number {
    return this.keys.size;
  }

  get(raw: Uint8Array): KeyObject {
    const hex = Buffer.from(raw).toString('hex');
    let key = this.keys.get(hex);
    if (!key) {
      // As a JWK: OpenSSL 3 decodes a DER key about ten times slower (250
      // against 27 µs here), which every new machine's first call paid.
      key = createPublicKey({
        key: { kty: 'OKP', crv: 'Ed25519', x: Buffer.from(raw).toString('base64url') },
        format: 'jwk',
      });
      if (this.keys.size >= this.limit) this.keys.delete(this.keys.keys().next().value!);
      this.keys.set(hex, key);
    }
    return key;
  }
}

const publicKeys = new PublicKeyCache(100_000);

/**
 * Checks with Node's Ed25519 (OpenSSL): it verifies the signatures tweetnacl
 * makes in about a sixtieth of tweetnacl's time, and the coordinator pays
 * for one on every agent call.
 */
export function verifyCallSignature(
  call: SignedCall,
  signatureB64: string,
  machinePublicKey: Uint8Array,
): boolean {
  const sig = Buffer.from(signatureB64, 'base64');
  if (sig.length !== nacl.sign.signatureLength || machinePublicKey.length !== nacl.sign.publicKeyLength)
    return false;
  return verify(null, signingPayload(call), publicKeys.get(machinePublicKey), sig);
}
