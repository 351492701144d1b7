// Noise_IKpsk2 as WireGuard uses it (whitepaper section 5.4.2-5.4.5): the
// initiation and response messages and the transport keys they yield. MACs
// are left to cookie.ts; indices and timers to the device.
import { dh, hash, type KeyPair, kdf, open, seal } from './crypto.js';
import {
  INITIATION_LEN,
  Initiation,
  MessageType,
  RESPONSE_LEN,
  Response,
  readIndex,
  view,
  writeHeader,
} from './messages.js';

const CONSTRUCTION = new TextEncoder().encode('Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s');
const IDENTIFIER = new TextEncoder().encode('WireGuard v1 zx2c4 Jason@zx2c4.com');
const INITIAL_CHAIN = hash(CONSTRUCTION);
const INITIAL_HASH = hash(INITIAL_CHAIN, IDENTIFIER);
const EMPTY = new Uint8Array(0);
export const ZERO_PSK = new Uint8Array(32);

/** The hash every handshake with a responder whose static key is `responderPublic` starts from. */
export function initialHash(responderPublic: Uint8Array): Uint8Array {
  return hash(INITIAL_HASH, responderPublic);
}

export interface TransportKeys {
  send: Uint8Array;
  receive: Uint8Array;
}

/** What the initiator keeps between sending an initiation and reading the response. */
export interface InitiatorState {
  localIndex: number;
  ephemeral: KeyPair;
  chain: Uint8Array;
  hash: Uint8Array;
}

/** TAI64N: seconds since 1970 plus 2^62 + 10, and nanoseconds, big-endian. */
export function tai64n(nowMs: number): Uint8Array {
  const out = new Uint8Array(12);
  const v = view(out);
  const seconds = Math.floor(nowMs / 1000);
  v.setBigUint64(0, 0x400000000000000an + BigInt(seconds), false);
  v.setUint32(8, Math.floor((nowMs - seconds * 1000) * 1e6), false);
  return out;
}

/**
 * Writes an initiation (MAC fields left zero) into a new 148-byte message.
 * Null when the responder's static key is unusable (low order).
 */
export function createInitiation(
  local: KeyPair,
  remotePublic: Uint8Array,
  localIndex: number,
  ephemeral: KeyPair,
  nowMs: number,
): { message: Uint8Array; state: InitiatorState } | null {
  const msg = new Uint8Array(INITIATION_LEN);
  writeHeader(msg, MessageType.Initiation);
  view(msg).setUint32(Initiation.sender, localIndex, true);
  let h = initialHash(remotePublic);
  let [c] = kdf(1, INITIAL_CHAIN, ephemeral.publicKey);
  msg.set(ephemeral.publicKey, Initiation.ephemeral);
  h = hash(h, ephemeral.publicKey);
  const es = dh(ephemeral.privateKey, remotePublic);
  if (!es) return null;
  let k: Uint8Array;
  [c, k] = kdf(2, c, es);
  const encryptedStatic = seal(k, 0n, local.publicKey, h);
  msg.set(encryptedStatic, Initiation.static);
  h = hash(h, encryptedStatic);
  const ss = dh(local.privateKey, remotePublic);
  if (!ss) return null;
  [c, k] = kdf(2, c, ss);
  const timestamp = seal(k, 0n, tai64n(nowMs), h);
  msg.set(timestamp, Initiation.timestamp);
  h = hash(h, timestamp);
  return { message: msg, state: { localIndex, ephemeral, chain: c, hash: h } };
}

/** What the responder learns from a valid initiation. */
export interface ConsumedInitiation {
  remoteIndex: number;
  remoteStatic: Uint8Array;
  remoteEphemeral: Uint8Array;
  timestamp: Uint8Array;
  chain: Uint8Array;
  hash: Uint8Array;
}

/** Null when the initiation does not decrypt with our static key. */
export function consumeInitiation(local: KeyPair, msg: Uint8Array): ConsumedInitiation | null {
  const remoteEphemeral = msg.slice(Initiation.ephemeral, Initiation.ephemeral + 32);
  let h = initialHash(local.publicKey);
  let [c] = kdf(1, INITIAL_CHAIN, remoteEphemeral);
  h = hash(h, remoteEphemeral);
  const es = dh(local.privateKey, remoteEphemeral);
  if (!es) return null;
  let k: Uint8Array;
  [c, k] = kdf(2, c, es);
  const encryptedStatic = msg.subarray(Initiation.static, Initiation.timestamp);
  const remoteStatic = open(k, 0n, encryptedStatic, h);
  if (!remoteStatic) return null;
  h = hash(h, encryptedStatic);
  const ss = dh(local.privateKey, remoteStatic);
  if (!ss) return null;
  [c, k] = kdf(2, c, ss);
  const encryptedTimestamp = msg.subarray(Initiation.timestamp, Initiation.mac1);
  const timestamp = open(k, 0n, encryptedTimestamp, h);
  if (!timestamp) return null;
  h = hash(h, encryptedTimestamp);
  return {
    remoteIndex: readIndex(msg, Initiation.sender),
    remoteStatic: new Uint8Array(remoteStatic),
    remoteEphemeral,
    timestamp: new Uint8Array(timestamp),
    chain: c,
    hash: h,
  };
}

/** The response to a consumed initiation (MAC fields left zero), and the responder's keys. */
export function createResponse(
  consumed: ConsumedInitiation,
  localIndex: number,
  ephemeral: KeyPair,
  psk: Uint8Array,
): { message: Uint8Array; keys: TransportKeys } | null {
  const msg = new Uint8Array(RESPONSE_LEN);
  writeHeader(msg, MessageType.Response);
  const v = view(msg);
  v.setUint32(Response.sender, localIndex, true);
  v.setUint32(Response.receiver, consumed.remoteIndex, true);
  let [c] = kdf(1, consumed.chain, ephemeral.publicKey);
  msg.set(ephemeral.publicKey, Response.ephemeral);
  let h = hash(consumed.hash, ephemeral.publicKey);
  const ee = dh(ephemeral.privateKey, consumed.remoteEphemeral);
  const se = dh(ephemeral.privateKey, consumed.remoteStatic);
  if (!ee || !se) return null;
  [c] = kdf(1, c, ee);
  [c] = kdf(1, c, se);
  const [c2, tau, k] = kdf(3, c, psk);
  h = hash(h, tau);
  const empty = seal(k, 0n, EMPTY, h);
  msg.set(empty, Response.empty);
  const [receive, send] = kdf(2, c2, EMPTY);
  return { message: msg, keys: { send, receive } };
}

/** The initiator's keys from a response to `state`; null when it does not authenticate. */
export function consumeResponse(
  local: KeyPair,
  state: InitiatorState,
  msg: Uint8Array,
  psk: Uint8Array,
): { remoteIndex: number; keys: TransportKeys } | null {
  const remoteEphemeral = msg.subarray(Response.ephemeral, Response.ephemeral + 32);
  let [c] = kdf(1, state.chain, remoteEphemeral);
  let h = hash(state.hash, remoteEphemeral);
  const ee = dh(state.ephemeral.privateKey, remoteEphemeral);
  const se = dh(local.privateKey, remoteEphemeral);
  if (!ee || !se) return null;
  [c] = kdf(1, c, ee);
  [c] = kdf(1, c, se);
  const [c2, tau, k] = kdf(3, c, psk);
  h = hash(h, tau);
  if (!open(k, 0n, msg.subarray(Response.empty, Response.mac1), h)) return null;
  const [send, receive] = kdf(2, c2, EMPTY);
  return { remoteIndex: readIndex(msg, Response.sender), keys: { send, receive } };
}
