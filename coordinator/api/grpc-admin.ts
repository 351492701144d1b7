// Serves API-key authenticated services over gRPC: the admin API and the
// Headscale compatibility API. Over TCP every call needs an API key, and
// failed ones are throttled per source address.
import type { DescService } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import type { State } from '../state/state.js';
import type { AdminContext, AdminHandlers } from './admin.js';
import { adminActor, header, peerAddress } from './auth.js';
import { grpcError, type StatusLike, toStatus } from './status.js';
import type { AuthThrottle } from './throttle.js';

export type ActorHandler = (req: unknown, ctx: AdminContext) => Promise<unknown>;

export interface AuthenticatedOptions {
  state: State;
  log: Logger;
  /** Null on the local admin socket, which needs no API key. */
  throttle: AuthThrottle | null;
  /** A status of the service's own for an error, before the shared mapping. */
  status?: (err: unknown) => StatusLike | undefined;
}

/** One handler per method of `methods` (a service's, or method names alone), by local name. */
export function authenticatedImplementation(
  methods: DescService['methods'] | readonly { name: string; localName: string }[],
  handlers: Record<string, ActorHandler>,
  { state, log, throttle, status }: AuthenticatedOptions,
): grpc.UntypedServiceImplementation {
  const impl: grpc.UntypedServiceImplementation = {};
  const statusOf = (err: unknown, method: string) => status?.(err) ?? toStatus(err, log, { method });
  for (const m of methods) {
    const handler = handlers[m.localName];
    if (!handler) throw new Error(`no handler for ${m.name}`);
    impl[m.localName] = async (
      call: grpc.ServerUnaryCall<unknown, unknown>,
      cb: grpc.sendUnaryData<unknown>,
    ) => {
      const peer = peerAddress(call.getPeer());
      let ctx: AdminContext;
      try {
        throttle?.check('admin', peer, m.name);
        ctx = await adminActor(state, header(call.metadata, 'authorization'), throttle === null);
      } catch (err) {
        const s = statusOf(err, m.name);
        if (s.code === grpc.status.UNAUTHENTICATED) throttle?.failed('admin', peer, m.name, s.details);
        cb(grpcError(s) as grpc.ServiceError, null);
        return;
      }
      try {
        cb(null, await handler(call.request, ctx));
      } catch (err) {
        cb(grpcError(statusOf(err, m.name)) as grpc.ServiceError, null);
      }
    };
  }
  return impl;
}

export function adminImplementation(
  handlers: AdminHandlers,
  state: State,
  log: Logger,
  throttle: AuthThrottle | null,
): grpc.UntypedServiceImplementation {
  return authenticatedImplementation(
    AdminService.methods,
    handlers as unknown as Record<string, ActorHandler>,
    { state, log, throttle },
  );
}
