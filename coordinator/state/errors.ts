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

export class CoordinatorError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
  ) {
    super(message);
    this.name = 'CoordinatorError';
  }
}

export const invalid = (msg: string) => new CoordinatorError('invalid', msg);
export const notFound = (msg: string) => new CoordinatorError('not-found', msg);
export const exists = (msg: string) => new CoordinatorError('exists', msg);
export const denied = (msg: string) => new CoordinatorError('denied', msg);
export const unauthenticated = (msg: string) => new CoordinatorError('unauthenticated', msg);
export const precondition = (msg: string) => new CoordinatorError('precondition', msg);
