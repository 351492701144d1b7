import { firstUnsafe, quote } from '../../proto/text.js';
import { type JsonPath, PolicyError, PolicyProblem, SyntaxProblem } from './errors.js';
import { standardize } from './hujson.js';
import { formatPath, indexSource, lineColumn, pathKey, type SourceIndex } from './locate.js';
import { resolvePolicy, TEST_BUDGET } from './resolve.js';
import { policyDocument } from './schema.js';
import type { Policy } from './types.js';

export interface ParseOptions {
  /**
   * A policy the store already holds: accepted by an older version, it must still load. Characters
   * that steer terminals and the budget of its tests are checked for a policy that comes in (set, or
   * checked from a file), not for one read back from the store.
   */
  stored?: boolean;
}

/** Parses and validates a policy; throws PolicyError with the line and column of the first problem. */
export function parsePolicy(text: string, { stored = false }: ParseOptions = {}): Policy {
  let json: string;
  let value: unknown;
  // A policy is read by people in terminals and editors: what it says must be what they see.
  const unsafe = stored ? undefined : firstUnsafe(text, '\t\n\r');
  if (unsafe) {
    throw syntaxError(
      text,
      new SyntaxProblem(
        unsafe.offset,
        `control or bidirectional character ${unsafe.character} is not allowed`,
      ),
    );
  }
  try {
    json = standardize(text);
    value = JSON.parse(json);
  } catch (error) {
    throw syntaxError(text, error);
  }
  const index = indexSource(json);
  if (index.duplicate) {
    const name = index.duplicate.at(-1);
    throw located(
      text,
      index,
      new PolicyProblem(index.duplicate, `duplicate key ${quote(String(name))}`, 'key'),
    );
  }
  const parsed = policyDocument.safeParse(value);
  if (!parsed.success) {
    // An unknown key is more often the cause of other issues (a misspelt required key) than their result.
    const issues = parsed.error.issues;
    const issue = issues.find((i) => i.code === 'unrecognized_keys') ?? issues[0]!;
    const path = issue.path.filter((part) => typeof part !== 'symbol');
    const problem =
      issue.code === 'unrecognized_keys'
        ? new PolicyProblem([...path, issue.keys[0]!], issue.message, 'key')
        : index.positions.has(pathKey(path))
          ? new PolicyProblem(path, issue.message)
          : new PolicyProblem(path, `missing key ${quote(String(path.at(-1)))}`);
    throw located(text, index, problem);
  }
  try {
    return {
      source: text,
      document: parsed.data,
      ...resolvePolicy(parsed.data, { testBudget: stored ? Number.POSITIVE_INFINITY : TEST_BUDGET }),
    };
  } catch (error) {
    if (error instanceof PolicyProblem) throw located(text, index, error);
    throw error;
  }
}

function syntaxError(text: string, error: unknown): PolicyError {
  if (error instanceof SyntaxError) {
    const position = /at position (\d+)/.exec(error.message)?.[1];
    // Node 20 names no position for an unexpected token; the source index then finds the place and says why.
    const reason = error.message.replace(/ in JSON at position .*$/s, '');
    return syntaxError(
      text,
      position === undefined ? scanForError(text, error) : new SyntaxProblem(Number(position), reason),
    );
  }
  if (error instanceof SyntaxProblem)
    return atOffset(text, error.offset, '', `syntax error: ${error.message}`);
  throw error;
}

function scanForError(text: string, error: SyntaxError): SyntaxProblem {
  try {
    indexSource(standardize(text));
  } catch (problem) {
    if (problem instanceof SyntaxProblem) return problem;
  }
  return new SyntaxProblem(text.length, error.message);
}

function located(text: string, index: SourceIndex, problem: PolicyProblem): PolicyError {
  // A path the index lacks (it always has the root) falls back to its nearest ancestor.
  let path: JsonPath = problem.path;
  let place = index.positions.get(pathKey(path));
  while (!place) {
    path = path.slice(0, -1);
    place = index.positions.get(pathKey(path));
  }
  const offset = problem.at === 'key' && place.key !== undefined ? place.key : place.value;
  return atOffset(text, offset, formatPath(problem.path), problem.message);
}

function atOffset(text: string, offset: number, path: string, message: string): PolicyError {
  const { line, column } = lineColumn(text, offset);
  return new PolicyError(
    `policy:${line}:${column}: ${path ? `${path}: ` : ''}${message}`,
    line,
    column,
    path,
  );
}
