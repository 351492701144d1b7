// The control API: agents register, hold one sync stream, log out, rotate
// their node key. Every call is checked against the machine key's signature.
import { create } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import {
  ControlService,
  type LogoutRequest,
  LogoutResponseSchema,
  type RegisterRequest,
  RegisterResponseSchema,
  type RelayRequest,
  type RelayResponse,
  type RotateNodeKeyRequest,
  RotateNodeKeyResponseSchema,
  type SyncRequest,
  type SyncResponse,
  type UpdateReport,
  UpdateState,
} from '../../proto/gen/meshgate/v1/control_pb.js';
import { methodPath, rawBytes } from '../../proto/grpc.js';
import { encodeWgKey } from '../../proto/keys.js';
import {
  hasNetmapFeature,
  IMPLIED_PEER_FIELDS,
  NETMAP_FEATURES_HEADER,
  SHARED_PEERS,
} from '../../proto/netmap.js';
import { isSemVer } from '../../release/semver.js';
import type { Mapper, Session } from '../mapper/mapper.js';
import { nodeMessage } from '../mapper/netmap.js';
import { CoordinatorError, invalid, unauthenticated } from '../state/errors.js';
import type { State } from '../state/state.js';
import { type CallVerifier, peerAddress } from './auth.js';
import type { Metrics } from './metrics.js';
import type { RateLimiter } from './ratelimit.js';
import type { RelayHub } from './relay.js';
import { grpcError, toStatus } from './status.js';
import { type AuthThrottle, refusal } from './throttle.js';
import { isCidr, isEndpoint, key32, LIMITS, list, lockdownPorts, tags, text } from './validate.js';

export interface ControlDeps {
  state: State;
  mapper: Mapper;
  relay: RelayHub;
  verifier: CallVerifier;
  limiter: RateLimiter;
  throttle: AuthThrottle;
  metrics: Metrics;
  log: Logger;
}

const path = (name: string) =>
  methodPath(ControlService, ControlService.methods.find((m) => m.name === name)!);
const REGISTER = path('Register');
const SYNC = path('Sync');
const LOGOUT = path('Logout');
const ROTATE = path('RotateNodeKey');
const RELAY = path('Relay');

export function controlImplementation(deps: ControlDeps): grpc.UntypedServiceImplementation {
  const { state, mapper, relay, verifier, limiter, throttle, metrics, log } = deps;

  const refuse = (method: string, peer: string, err: unknown, cb?: grpc.sendUnaryData<never>) => {
    const s = toStatus(err, log, { method, peer });
    if (err instanceof CoordinatorError) {
      // One line per refusal with the source address, for fail2ban and people alike.
      // Register has a limiter of its own, for every attempt.
      if (err.kind === 'unauthenticated' && method !== 'Register')
        throttle.failed('control', peer, method, s.details);
      else refusal(log, 'control', peer, method, s.details);
      metrics.refusedCalls.inc({ method, reason: err.kind });
    }
    cb?.(grpcError(s) as grpc.ServiceError, null);
    return s;
  };

  return {
    async register(call: grpc.ServerUnaryCall<RegisterRequest, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const peer = peerAddress(call.getPeer());
      try {
        if (!limiter.take(peer)) {
          metrics.rejectedRegistrations.inc({ reason: 'rate-limited' });
          throw new CoordinatorError(
            'exhausted',
            'too many registration attempts from this address; wait and retry',
          );
        }
        const req = call.request;
        const machineKey = key32('machine_key', req.machineKey);
        const nodeKey = key32('node_key', req.nodeKey);
        verifier.verifyRegister(call.metadata, REGISTER, rawBytes(req), machineKey);
        const { node, existing } = await state.register({
          authKey: text('auth_key', req.authKey, 128),
          machineKey: Buffer.from(machineKey).toString('hex'),
          nodeKey: encodeWgKey(nodeKey),
          hostname: text('hostname', req.hostname, LIMITS.hostname),
          os: text('os', req.os, LIMITS.os),
          version: text('version', req.version, LIMITS.version),
          requestedTags: tags('requested_tags', req.requestedTags),
          endpoints: list('endpoints', req.endpoints, LIMITS.endpoints, isEndpoint, 'host:port'),
          advertisedRoutes: list('advertised_routes', req.advertisedRoutes, LIMITS.routes, isCidr, 'a CIDR'),
        });
        metrics.registrations.inc({ result: existing ? 'existing' : 'new' });
        log.info(
          { peer, node: node.id, name: node.name, project: node.project, existing },
          'node registered',
        );
        cb(null, create(RegisterResponseSchema, { node: nodeMessage(state, node), existing }));
      } catch (err) {
        if (err instanceof CoordinatorError) metrics.rejectedRegistrations.inc({ reason: err.kind });
        metrics.registrations.inc({ result: 'refused' });
        refuse('Register', peer, err, cb as grpc.sendUnaryData<never>);
      }
    },

    sync(call: grpc.ServerDuplexStream<SyncRequest, SyncResponse>) {
      const peer = peerAddress(call.getPeer());
      let node: ReturnType<CallVerifier['verifyNode']>;
      try {
        throttle.check('control', peer, 'Sync');
        node = verifier.verifyNode(call.metadata, SYNC, new Uint8Array());
      } catch (err) {
        const s = refuse('Sync', peer, err);
        call.emit('error', grpcError(s));
        return;
      }
      const nodeId = node.id;
      const features = call.metadata.get(NETMAP_FEATURES_HEADER);
      let closed = false;
      const session: Session = {
        nodeId,
        impliedPeerFields: hasNetmapFeature(features, IMPLIED_PEER_FIELDS),
        sharedPeers: hasNetmapFeature(features, SHARED_PEERS),
        // The mapper hands over encoded messages; the service's serializer passes them through.
        send: (msg, sent) => {
          if (closed) sent?.();
          else call.write(msg as unknown as SyncResponse, () => sent?.());
        },
        close: (reason, why) => {
          if (closed) return;
          closed = true;
          mapper.detach(session);
          // UNAUTHENTICATED makes the agent register again, with its auth key if need be.
          const code = why === 'gone' ? grpc.status.UNAUTHENTICATED : grpc.status.UNAVAILABLE;
          call.emit('error', { code, details: reason });
        },
      };
      const end = () => {
        if (!closed) {
          closed = true;
          mapper.detach(session);
          call.end();
        }
        if (!mapper.hasSession(nodeId)) state.setOnline(nodeId, false);
      };
      call.on('data', (req: SyncRequest) => {
        state.touch(nodeId);
        void handleUpstream(nodeId, peer, req).catch((err) => refuse('Sync', peer, err));
      });
      call.on('end', end);
      call.on('cancelled', end);
      call.on('error', end);
      call.on('close', end);
      mapper.attach(session);
      state.setOnline(nodeId, true);
    },

    relay(call: grpc.ServerDuplexStream<RelayRequest, RelayResponse>) {
      const peer = peerAddress(call.getPeer());
      let nodeId: string;
      try {
        throttle.check('control', peer, 'Relay');
        nodeId = verifier.verifyNode(call.metadata, RELAY, new Uint8Array()).id;
      } catch (err) {
        call.emit('error', grpcError(refuse('Relay', peer, err)));
        return;
      }
      relay.attach(nodeId, call);
      call.on('data', (frame: RelayRequest) => {
        if (relay.forward(nodeId, frame) === 'denied')
          log.debug({ node: nodeId, to: frame.peerId }, 'relay refused a datagram');
      });
      const end = () => relay.detach(nodeId, call);
      call.on('end', () => {
        end();
        call.end();
      });
      call.on('cancelled', end);
      call.on('error', end);
      call.on('close', end);
    },

    async logout(call: grpc.ServerUnaryCall<LogoutRequest, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const peer = peerAddress(call.getPeer());
      try {
        throttle.check('control', peer, 'Logout');
        const node = verifier.verifyNode(call.metadata, LOGOUT, rawBytes(call.request));
        await state.logout(node.id);
        log.info({ peer, node: node.id, name: node.name, ephemeral: node.ephemeral }, 'node logged out');
        cb(null, create(LogoutResponseSchema, {}));
      } catch (err) {
        refuse('Logout', peer, err, cb as grpc.sendUnaryData<never>);
      }
    },

    async rotateNodeKey(
      call: grpc.ServerUnaryCall<RotateNodeKeyRequest, unknown>,
      cb: grpc.sendUnaryData<unknown>,
    ) {
      const peer = peerAddress(call.getPeer());
      try {
        throttle.check('control', peer, 'RotateNodeKey');
        const node = verifier.verifyNode(call.metadata, ROTATE, rawBytes(call.request));
        const updated = await state.rotateNodeKey(
          node.id,
          encodeWgKey(key32('node_key', call.request.nodeKey)),
        );
        cb(null, create(RotateNodeKeyResponseSchema, { node: nodeMessage(state, updated) }));
      } catch (err) {
        refuse('RotateNodeKey', peer, err, cb as grpc.sendUnaryData<never>);
      }
    },
  };

  async function handleUpstream(nodeId: string, peer: string, req: SyncRequest): Promise<void> {
    const m = req.message;
    if (m.case === 'hello' || m.case === 'endpoints') {
      const eps = list('endpoints', m.value.endpoints, LIMITS.endpoints, isEndpoint, 'host:port');
      if (m.case === 'hello') {
        await state.updateVersion(nodeId, text('version', m.value.version, LIMITS.version));
        await state.updateLockdownPorts(nodeId, lockdownPorts(m.value.lockdownPorts));
      }
      await state.updateEndpoints(nodeId, eps);
      state.setObservedEndpoint(nodeId, observedEndpoint(peer, eps));
    } else if (m.case === 'update') {
      const r = updateReport(m.value);
      state.reportUpdate(nodeId, r.version, r.state, r.reason);
      if (r.state === 'failed')
        log.warn({ node: nodeId, version: r.version, reason: r.reason }, 'agent update failed');
      else log.info({ node: nodeId, version: r.version }, 'agent updating');
    } else if (m.case === 'health' && !m.value.ok) {
      log.warn({ node: nodeId, message: text('health', m.value.message, 512) }, 'agent reports a problem');
    } else if (m.case === undefined) {
      throw unauthenticated('empty sync message');
    }
  }
}

function updateReport(r: UpdateReport): { version: string; state: 'updating' | 'failed'; reason: string } {
  const version = text('update.version', r.version, LIMITS.version);
  if (!isSemVer(version)) throw invalid('update.version must be a semantic version');
  const reason = text('update.reason', r.reason, LIMITS.updateReason);
  if (r.state === UpdateState.UPDATING) return { version, state: 'updating', reason: '' };
  if (r.state === UpdateState.FAILED) {
    if (!reason) throw invalid('a failed update needs a reason');
    return { version, state: 'failed', reason };
  }
  throw invalid('update.state must be UPDATING or FAILED');
}

/** Where peers may reach the agent from outside: the address it connected from, with its WireGuard port. */
function observedEndpoint(peer: string, reported: string[]): string | undefined {
  const port = reported[0]?.split(':').pop();
  if (!port || peer.startsWith('unix') || peer === '127.0.0.1' || peer === '::1') return undefined;
  return peer.includes(':') ? `[${peer}]:${port}` : `${peer}:${port}`;
}
