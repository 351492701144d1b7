// The receive side's sliding window over message counters (RFC 6479's
// bitmap): a counter is accepted once, and only while it is within the window
// behind the greatest one seen.
const WORD_BITS = 32;
const WORDS = 64;
/** Counters this far behind the greatest seen are still accepted once. */
export const WINDOW = (WORDS - 1) * WORD_BITS;

export class ReplayWindow {
  private greatest = -1;
  private readonly bits = new Uint32Array(WORDS);

  /** True, and remembered, for a counter not seen before and within the window. */
  accept(counter: number): boolean {
    if (!Number.isSafeInteger(counter) || counter < 0) return false;
    if (counter > this.greatest) {
      const current = Math.floor(Math.max(this.greatest, 0) / WORD_BITS);
      const target = Math.floor(counter / WORD_BITS);
      const clear = Math.min(target - current, WORDS);
      for (let i = 1; i <= clear; i++) this.bits[(current + i) % WORDS] = 0;
      if (this.greatest < 0) this.bits[current % WORDS] = 0;
      this.greatest = counter;
    } else if (this.greatest - counter > WINDOW) {
      return false;
    }
    const word = Math.floor(counter / WORD_BITS) % WORDS;
    const bit = 1 << (counter % WORD_BITS);
    if (this.bits[word]! & bit) return false;
    this.bits[word]! |= bit;
    return true;
  }
}
