// Serves API-key authenticated services over gRPC: the admin API and the
// Headscale compatibility API. Over TCP every call needs an API key.
import type { DescService } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import type { State } from '../state/state.js';
import type { AdminContext, AdminHandlers } from './admin.js';
import { adminActor, header } from './auth.js';
import { grpcError, type StatusLike, toStatus } from './status.js';

export type ActorHandler = (req: unknown, ctx: AdminContext) => Promise<unknown>;

export interface AuthenticatedOptions {
  state: State;
  log: Logger;
  /** The local admin socket: no API key needed. */
  local: boolean;
  /** A status of the service's own for an error, before the shared mapping. */
  status?: (err: unknown) => StatusLike | undefined;
}

/** One handler per method of `methods` (a service's, or method names alone), by local name. */
export function authenticatedImplementation(
  methods: DescService['methods'] | readonly { name: string; localName: string }[],
  handlers: Record<string, ActorHandler>,
  { state, log, local, status }: AuthenticatedOptions,
): grpc.UntypedServiceImplementation {
  const impl: grpc.UntypedServiceImplementation = {};
  for (const m of methods) {
    const handler = handlers[m.localName];
    if (!handler) throw new Error(`no handler for ${m.name}`);
    impl[m.localName] = async (
      call: grpc.ServerUnaryCall<unknown, unknown>,
      cb: grpc.sendUnaryData<unknown>,
    ) => {
      try {
        const ctx = await adminActor(state, header(call.metadata, 'authorization'), local);
        cb(null, await handler(call.request, ctx));
      } catch (err) {
        const s = status?.(err) ?? toStatus(err, log, { method: m.name });
        if (s.code === grpc.status.UNAUTHENTICATED)
          log.warn({ peer: call.getPeer(), method: m.name, reason: s.details }, 'refused admin call');
        cb(grpcError(s) as grpc.ServiceError, null);
      }
    };
  }
  return impl;
}

export function adminImplementation(
  handlers: AdminHandlers,
  state: State,
  log: Logger,
  local: boolean,
): grpc.UntypedServiceImplementation {
  return authenticatedImplementation(
    AdminService.methods,
    handlers as unknown as Record<string, ActorHandler>,
    {
      state,
      log,
      local,
    },
  );
}
