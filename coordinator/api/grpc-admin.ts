// Serves the admin handlers over gRPC; over TCP every call needs an API key.
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import type { State } from '../state/state.js';
import type { AdminContext, AdminHandlers } from './admin.js';
import { adminActor, header } from './auth.js';
import { grpcError, toStatus } from './status.js';

export function adminImplementation(
  handlers: AdminHandlers,
  state: State,
  log: Logger,
  local: boolean,
): grpc.UntypedServiceImplementation {
  const impl: grpc.UntypedServiceImplementation = {};
  for (const m of AdminService.methods) {
    const handler = handlers[m.localName as keyof AdminHandlers] as (
      req: unknown,
      ctx: AdminContext,
    ) => Promise<unknown>;
    impl[m.localName] = async (
      call: grpc.ServerUnaryCall<unknown, unknown>,
      cb: grpc.sendUnaryData<unknown>,
    ) => {
      try {
        const ctx = await adminActor(state, header(call.metadata, 'authorization'), local);
        cb(null, await handler(call.request, ctx));
      } catch (err) {
        const s = toStatus(err, log, { method: m.name });
        if (s.code === grpc.status.UNAUTHENTICATED)
          log.warn({ peer: call.getPeer(), method: m.name, reason: s.details }, 'refused admin call');
        cb(grpcError(s) as grpc.ServiceError, null);
      }
    };
  }
  return impl;
}
