// Expected failures end the CLI with one line on stderr and exit code 1;
// only unexpected ones show a stack, and only with MESHGATE_DEBUG=1.
import * as grpc from '@grpc/grpc-js';

export class CliError extends Error {
  override name = 'CliError';
}

const EXPECTED = new Set([
  'CliError',
  'DialError',
  'ConfigError',
  'CommandError',
  'MissingToolError',
  'AgentError',
  'StateDirError',
  'TlsError',
  'MeshError',
  'ListenError',
  'DataDirError',
  'LocalApiError',
  'OperatorError',
  'ReleaseError',
  'SemVerError',
  'DatabaseError',
]);

export function describeError(err: unknown, coordinator?: string): string {
  const e = err as Partial<grpc.ServiceError> & Error;
  if (typeof e?.code === 'number' && 'details' in e) {
    if (e.code === grpc.status.UNAVAILABLE) {
      return `cannot reach coordinator${coordinator ? ` at ${coordinator}` : ''}: ${e.details || 'unavailable'}`;
    }
    if (e.code === grpc.status.DEADLINE_EXCEEDED)
      return `coordinator${coordinator ? ` at ${coordinator}` : ''} did not answer in time`;
    return e.details || grpc.status[e.code] || 'request failed';
  }
  if (e instanceof Error && (EXPECTED.has(e.name) || (e as NodeJS.ErrnoException).code === 'ENOENT'))
    return e.message;
  if (e instanceof Error)
    return process.env.MESHGATE_DEBUG
      ? (e.stack ?? e.message)
      : `${e.message} (MESHGATE_DEBUG=1 shows details)`;
  return String(err);
}
