// The four WireGuard message layouts (whitepaper section 5.4). Every field is
// at a fixed offset; integers are little-endian.
export const MessageType = { Initiation: 1, Response: 2, CookieReply: 3, Data: 4 } as const;

export const INITIATION_LEN = 148;
export const RESPONSE_LEN = 92;
export const COOKIE_REPLY_LEN = 64;
export const DATA_HEADER_LEN = 16;
/** The smallest data message: a header and the tag of an empty (keepalive) payload. */
export const DATA_MIN_LEN = DATA_HEADER_LEN + 16;

export const Initiation = {
  sender: 4,
  ephemeral: 8,
  static: 40,
  timestamp: 88,
  mac1: 116,
  mac2: 132,
} as const;

export const Response = {
  sender: 4,
  receiver: 8,
  ephemeral: 12,
  empty: 44,
  mac1: 60,
  mac2: 76,
} as const;

export const CookieReply = { receiver: 4, nonce: 8, cookie: 32 } as const;

export const Data = { receiver: 4, counter: 8, payload: 16 } as const;

/** The message type, or 0 for a datagram that is none of the four. */
export function messageType(d: Uint8Array): number {
  if (d.length < 4 || d[1] !== 0 || d[2] !== 0 || d[3] !== 0) return 0;
  switch (d[0]) {
    case MessageType.Initiation:
      return d.length === INITIATION_LEN ? MessageType.Initiation : 0;
    case MessageType.Response:
      return d.length === RESPONSE_LEN ? MessageType.Response : 0;
    case MessageType.CookieReply:
      return d.length === COOKIE_REPLY_LEN ? MessageType.CookieReply : 0;
    case MessageType.Data:
      return d.length >= DATA_MIN_LEN ? MessageType.Data : 0;
    default:
      return 0;
  }
}

export function view(d: Uint8Array): DataView {
  return new DataView(d.buffer, d.byteOffset, d.byteLength);
}

export function readIndex(d: Uint8Array, offset: number): number {
  return view(d).getUint32(offset, true);
}

export function writeHeader(d: Uint8Array, type: number): void {
  d[0] = type;
  d[1] = d[2] = d[3] = 0;
}

/** Counters above 2^53 are never reached before REJECT_AFTER_MESSAGES matters; they read as NaN-free numbers. */
export function readCounter(d: Uint8Array): number {
  const v = view(d);
  return v.getUint32(Data.counter + 4, true) * 2 ** 32 + v.getUint32(Data.counter, true);
}

export function writeCounter(d: Uint8Array, counter: number): void {
  const v = view(d);
  v.setUint32(Data.counter, counter % 2 ** 32, true);
  v.setUint32(Data.counter + 4, Math.floor(counter / 2 ** 32), true);
}
