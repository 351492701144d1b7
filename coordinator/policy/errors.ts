/** A path into the policy document, as zod reports it: object keys and array indexes. */
export type JsonPath = readonly (string | number)[];

/** A policy that cannot be used; the message is one line that starts with `policy:LINE:COLUMN:`. */
export class PolicyError extends Error {
  override readonly name = 'PolicyError';

  constructor(
    message: string,
    readonly line: number,
    readonly column: number,
    /** Where in the document, e.g. `acls[1].dst[0]`; empty for syntax errors. */
    readonly path: string,
  ) {
    super(message);
  }
}

/**
 * A validation failure that knows its place in the document but not yet in the text; parsing turns it
 * into a PolicyError. `at: 'key'` points at an object key instead of its value (unknown or bad names).
 */
export class PolicyProblem extends Error {
  constructor(
    readonly path: JsonPath,
    message: string,
    readonly at: 'key' | 'value' = 'value',
  ) {
    super(message);
  }
}

/** A syntax error at a character offset of the source. */
export class SyntaxProblem extends Error {
  constructor(
    readonly offset: number,
    message: string,
  ) {
    super(message);
  }
}
