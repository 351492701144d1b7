// Signed control calls made with node:crypto instead of tweetnacl. Ed25519
// signatures are deterministic, so a call carries exactly the bytes the
// agent's ControlClient would send (checkSameSignatures proves it at start).
// The agent spends ~4 ms per signature with tweetnacl on its own machine; the
// load generator would spend it once per call for all N agents on one core,
// and then limit the registration and reconnect figures itself.
import { createPrivateKey, type KeyObject, randomBytes, sign } from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import nacl from 'tweetnacl';
import type { MachineKeyPair } from '../../proto/keys.js';
import { sha256 } from '../../proto/keys.js';
import {
  SIG_MACHINE_KEY,
  SIG_NODE_ID,
  SIG_NONCE,
  SIG_SIGNATURE,
  SIG_TIMESTAMP,
  signingPayload,
} from '../../proto/signing.js';

/** DER header of an Ed25519 PKCS#8 private key; the 32-byte seed follows it. */
const PKCS8_ED25519 = Buffer.from('302e020100300506032b657004220420', 'hex');

export class NodeSigner {
  private readonly key: KeyObject;
  private readonly publicHex: string;

  constructor(machine: MachineKeyPair) {
    this.key = createPrivateKey({
      key: Buffer.concat([PKCS8_ED25519, machine.secretKey.subarray(0, 32)]),
      format: 'der',
      type: 'pkcs8',
    });
    this.publicHex = Buffer.from(machine.publicKey).toString('hex');
  }

  signature(payload: Uint8Array): Buffer {
    return sign(null, payload, this.key);
  }

  /** The headers of proto/signing.ts signCall for one call; `body` is the serialized request. */
  metadata(method: string, nodeId: string, body: Uint8Array): grpc.Metadata {
    const call = {
      method,
      nodeId,
      timestamp: Date.now(),
      nonce: randomBytes(16).toString('hex'),
      bodyHash: sha256(body),
    };
    const md = new grpc.Metadata();
    md.set(SIG_NODE_ID, nodeId);
    md.set(SIG_MACHINE_KEY, this.publicHex);
    md.set(SIG_TIMESTAMP, String(call.timestamp));
    md.set(SIG_NONCE, call.nonce);
    md.set(SIG_SIGNATURE, this.signature(signingPayload(call)).toString('base64'));
    return md;
  }
}

/** Throws unless node:crypto and tweetnacl make the same signature for the same key and message. */
export function checkSameSignatures(machine: MachineKeyPair): void {
  const payload = signingPayload({
    method: '/check',
    nodeId: 'n',
    timestamp: 1,
    nonce: '00',
    bodyHash: new Uint8Array(32),
  });
  const ours = new NodeSigner(machine).signature(payload);
  const theirs = Buffer.from(nacl.sign.detached(payload, machine.secretKey));
  if (!ours.equals(theirs)) throw new Error('node:crypto and tweetnacl signatures differ');
}
