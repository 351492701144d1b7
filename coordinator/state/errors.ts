// Failures the coordinator expects and reports to callers. Each kind maps
// to one gRPC status (api/status.ts); the message is shown to a person as is
// and never contains a secret.
export type ErrorKind =
  | 'invalid'
  | 'not-found'
  | 'exists'
  | 'unauthenticated'
  | 'denied'
  | 'precondition'
  | 'exhausted'
  | 'unavailable';

/** Why a registration without an auth key was refused: the agent tells a person which it was. */
export type RefusalReason = 'node-expired' | 'node-unknown';

export class CoordinatorError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
    /** Machine-readable cause for agents (gRPC trailer `meshgate-reason`), e.g. node-expired. */
    readonly reason?: RefusalReason,
  ) {
    super(message);
    this.name = 'CoordinatorError';
  }
}

export const invalid = (msg: string) => new CoordinatorError('invalid', msg);
export const notFound = (msg: string) => new CoordinatorError('not-found', msg);
export const exists = (msg: string) => new CoordinatorError('exists', msg);
export const denied = (msg: string) => new CoordinatorError('denied', msg);
export const unauthenticated = (msg: string, reason?: RefusalReason) =>
  new CoordinatorError('unauthenticated', msg, reason);
export const precondition = (msg: string) => new CoordinatorError('precondition', msg);
