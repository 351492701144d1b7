// The Internet checksum (RFC 1071): the ones' complement of the ones'
// complement sum of 16-bit words, over any number of byte ranges.
export function sum(data: Uint8Array, initial = 0): number {
  let s = initial;
  const even = data.length & ~1;
  for (let i = 0; i < even; i += 2) s += (data[i]! << 8) | data[i + 1]!;
  if (data.length & 1) s += data[data.length - 1]! << 8;
  return s;
}

export function finish(s: number): number {
  let folded = s;
  while (folded > 0xffff) folded = (folded & 0xffff) + Math.floor(folded / 0x10000);
  return ~folded & 0xffff;
}

export function checksum(...parts: Uint8Array[]): number {
  let s = 0;
  for (const p of parts) s = sum(p, s);
  return finish(s);
}
