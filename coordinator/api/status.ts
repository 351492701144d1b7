// Maps the coordinator's expected failures to gRPC statuses and HTTP codes;
// anything else is an internal error whose details stay in the log.
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { REASON_TRAILER } from '../../proto/grpc.js';
import { CoordinatorError, type ErrorKind } from '../state/errors.js';
import { StoreUnavailableError } from '../store/unavailable.js';

const GRPC: Record<ErrorKind, grpc.status> = {
  invalid: grpc.status.INVALID_ARGUMENT,
  'not-found': grpc.status.NOT_FOUND,
  exists: grpc.status.ALREADY_EXISTS,
  unauthenticated: grpc.status.UNAUTHENTICATED,
  denied: grpc.status.PERMISSION_DENIED,
  precondition: grpc.status.FAILED_PRECONDITION,
  exhausted: grpc.status.RESOURCE_EXHAUSTED,
  unavailable: grpc.status.UNAVAILABLE,
};

const HTTP: Record<ErrorKind, number> = {
  invalid: 400,
  'not-found': 404,
  exists: 409,
  unauthenticated: 401,
  denied: 403,
  precondition: 412,
  exhausted: 429,
  unavailable: 503,
};

export interface StatusLike {
  code: grpc.status;
  http: number;
  details: string;
  reason?: string;
}

/**
 * Status details travel in an HTTP/2 header: a long one can exceed what the
 * client accepts and stall the connection. Messages quote short prefixes of
 * what callers sent; this is the last bound.
 */
const MAX_DETAILS = 1024;

export function toStatus(err: unknown, log: Logger, context: object): StatusLike {
  if (err instanceof CoordinatorError) {
    const details = err.message.length > MAX_DETAILS ? `${err.message.slice(0, MAX_DETAILS)}…` : err.message;
    return { code: GRPC[err.kind], http: HTTP[err.kind], details, reason: err.reason };
  }
  if (err instanceof StoreUnavailableError) {
    log.warn({ ...context, reason: err.message }, 'database unavailable');
    return { code: grpc.status.UNAVAILABLE, http: 503, details: err.message };
  }
  log.error({ err, ...context }, 'internal error');
  return { code: grpc.status.INTERNAL, http: 500, details: 'internal error; see the coordinator log' };
}

export function grpcError(s: StatusLike): Partial<grpc.StatusObject> {
  if (!s.reason) return { code: s.code, details: s.details };
  const metadata = new grpc.Metadata();
  metadata.set(REASON_TRAILER, s.reason);
  return { code: s.code, details: s.details, metadata };
}
