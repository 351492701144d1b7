// Serves the admin handlers over gRPC; over TCP every call needs an API key.
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import type { State } from '../state/state.js';
import type { AdminHandlers } from './admin.js';
import { adminActor, header, peerAddress } from './auth.js';
import { grpcError, toStatus } from './status.js';
import type { AuthThrottle } from './throttle.js';

/** `throttle` is null on the local socket, which needs no key. */
export function adminImplementation(
  handlers: AdminHandlers,
  state: State,
  log: Logger,
  throttle: AuthThrottle | null,
): grpc.UntypedServiceImplementation {
  const impl: grpc.UntypedServiceImplementation = {};
  for (const m of AdminService.methods) {
    const handler = handlers[m.localName as keyof AdminHandlers] as (
      req: unknown,
      ctx: { actor: string },
    ) => Promise<unknown>;
    impl[m.localName] = async (
      call: grpc.ServerUnaryCall<unknown, unknown>,
      cb: grpc.sendUnaryData<unknown>,
    ) => {
      const peer = peerAddress(call.getPeer());
      let actor: string;
      try {
        throttle?.check('admin', peer, m.name);
        actor = await adminActor(state, header(call.metadata, 'authorization'), throttle === null);
      } catch (err) {
        const s = toStatus(err, log, { method: m.name });
        if (s.code === grpc.status.UNAUTHENTICATED) throttle?.failed('admin', peer, m.name, s.details);
        cb(grpcError(s) as grpc.ServiceError, null);
        return;
      }
      try {
        cb(null, await handler(call.request, { actor }));
      } catch (err) {
        cb(grpcError(toStatus(err, log, { method: m.name })) as grpc.ServiceError, null);
      }
    };
  }
  return impl;
}
