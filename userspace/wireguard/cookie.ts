// MAC1, MAC2 and cookie replies (whitepaper section 5.4.4 and 5.4.7): MAC1
// proves the sender knows our public key; under load, MAC2 proves it can
// receive at its source address, before we spend a Diffie-Hellman on it.
import { equalBytes, hash, mac, xopen, xseal } from './crypto.js';
import { COOKIE_REPLY_LEN, CookieReply, MessageType, view, writeHeader } from './messages.js';

const LABEL_MAC1 = new TextEncoder().encode('mac1----');
const LABEL_COOKIE = new TextEncoder().encode('cookie--');
/** How long a cookie secret, and a cookie received, stays good (COOKIE_REFRESH_TIME). */
export const COOKIE_LIFETIME_MS = 120_000;

/** Keys derived once from a public key: ours for checking, a peer's for sending. */
export interface MacKeys {
  mac1: Uint8Array;
  cookie: Uint8Array;
}

export function macKeys(publicKey: Uint8Array): MacKeys {
  return { mac1: hash(LABEL_MAC1, publicKey), cookie: hash(LABEL_COOKIE, publicKey) };
}

/** Fills MAC1 at `offset` and MAC2 after it (zero without a cookie). */
export function stampMacs(msg: Uint8Array, offset: number, keys: MacKeys, cookie: Uint8Array | null): void {
  msg.set(mac(keys.mac1, msg.subarray(0, offset)), offset);
  msg.set(cookie ? mac(cookie, msg.subarray(0, offset + 16)) : new Uint8Array(16), offset + 16);
}

export function mac1Valid(msg: Uint8Array, offset: number, keys: MacKeys): boolean {
  return equalBytes(mac(keys.mac1, msg.subarray(0, offset)), msg.subarray(offset, offset + 16));
}

/** The responder's side: a secret that changes every two minutes, and cookies bound to a source. */
export class CookieChecker {
  private secret: Uint8Array = new Uint8Array(32);
  private secretAt = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly keys: MacKeys,
    private readonly random: (n: number) => Uint8Array,
  ) {}

  private cookieFor(source: string, nowMs: number): Uint8Array {
    if (nowMs - this.secretAt >= COOKIE_LIFETIME_MS) {
      this.secret = this.random(32);
      this.secretAt = nowMs;
    }
    return mac(this.secret, new TextEncoder().encode(source));
  }

  mac2Valid(msg: Uint8Array, offset: number, source: string, nowMs: number): boolean {
    const expected = mac(this.cookieFor(source, nowMs), msg.subarray(0, offset + 16));
    return equalBytes(expected, msg.subarray(offset + 16, offset + 32));
  }

  /** A cookie reply to `msg` (whose MAC1 is at `offset`), sent back to its source. */
  reply(msg: Uint8Array, offset: number, source: string, nowMs: number): Uint8Array {
    const out = new Uint8Array(COOKIE_REPLY_LEN);
    writeHeader(out, MessageType.CookieReply);
    out.set(msg.subarray(4, 8), CookieReply.receiver);
    const nonce = this.random(24);
    out.set(nonce, CookieReply.nonce);
    const sealed = xseal(
      this.keys.cookie,
      nonce,
      this.cookieFor(source, nowMs),
      msg.subarray(offset, offset + 16),
    );
    out.set(sealed, CookieReply.cookie);
    return out;
  }
}

/** The initiator's side: the cookie from a reply to the message whose MAC1 was `sentMac1`. */
export function openCookieReply(
  reply: Uint8Array,
  peerKeys: MacKeys,
  sentMac1: Uint8Array,
): Uint8Array | null {
  return xopen(
    peerKeys.cookie,
    reply.subarray(CookieReply.nonce, CookieReply.cookie),
    reply.subarray(CookieReply.cookie),
    sentMac1,
  );
}

export function receiverOf(reply: Uint8Array): number {
  return view(reply).getUint32(CookieReply.receiver, true);
}
