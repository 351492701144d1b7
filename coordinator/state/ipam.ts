// Mesh address allocation. Index i maps to 100.64.0.0 + i and to
// fd7a:115c:a1e0:: + i, so one unique index gives a node both addresses and
// the database's unique constraint on it guards against duplicates even if
// this process is wrong.
import { CoordinatorError } from './errors.js';

const V4_BASE = (100 << 24) | (64 << 16);
/** 100.64.0.0/10 holds 2^22 addresses; the first and last are not handed out. */
export const MAX_INDEX = 2 ** 22 - 2;

export function ipv4ForIndex(index: number): string {
  const n = (V4_BASE + index) >>> 0;
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

export function ipv6ForIndex(index: number): string {
  const hi = Math.floor(index / 65536);
  const lo = index % 65536;
  return hi === 0
    ? `fd7a:115c:a1e0::${lo.toString(16)}`
    : `fd7a:115c:a1e0::${hi.toString(16)}:${lo.toString(16)}`;
}

export class AddressPool {
  private readonly used = new Set<number>();
  private next = 1;

  constructor(inUse: Iterable<number>) {
    for (const i of inUse) this.use(i);
  }

  /** Marks an index taken elsewhere (loaded from the store, or given out by another coordinator). */
  use(index: number): void {
    this.used.add(index);
    if (index >= this.next) this.next = index + 1;
  }

  /** Reserves an index now, before any await, so concurrent callers never share one. */
  reserve(): number {
    this.requireRoom();
    // Fresh addresses first: a freed address is reused only after wrapping,
    // so a stale peer entry somewhere never points at a new node.
    while (this.used.has(this.next) || this.next > MAX_INDEX) {
      this.next = this.next > MAX_INDEX ? 1 : this.next + 1;
    }
    const index = this.next;
    this.used.add(index);
    this.next = index + 1;
    return index;
  }

  /**
   * Reserves the first free index at or after the n-th of a counter that
   * coordinators sharing a database take turns on: each starts at another
   * place, so they rarely pick the same address at once.
   */
  reserveFrom(n: number): number {
    this.requireRoom();
    let index = ((n - 1) % MAX_INDEX) + 1;
    while (this.used.has(index)) index = (index % MAX_INDEX) + 1;
    this.use(index);
    return index;
  }

  private requireRoom(): void {
    if (this.used.size >= MAX_INDEX)
      throw new CoordinatorError('exhausted', 'the mesh address range 100.64.0.0/10 is full');
  }

  release(index: number): void {
    this.used.delete(index);
  }
}
